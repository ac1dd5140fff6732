package bulkexport

import (
	"encoding/json"
	"errors"
	"fmt"
)

// JobFormatVersion is the version of the stored form of a Job, the JSON
// document that MarshalStoredJob writes and UnmarshalStoredJob reads. The
// document is a Job as encoding/json writes it (the json tags of Job and of
// the types it holds are the format) with one key more, first: "format",
// this version.
//
// Serialising stores (sqlitestore, pgstore) keep jobs in this form, so the
// json tags are an on-disk format: renaming a key, or changing what a key
// means, makes a new format version, and this constant grows. A field added
// to Job whose absence (in every job already stored) reads as its zero
// value, as intended, keeps the version. A release reads the formats up to
// its own; a job written by a newer release, in a format this one does not
// know, is refused with an error wrapping ErrUnknownJobFormat rather than
// misread.
const JobFormatVersion = 1

// ErrUnknownJobFormat is wrapped by UnmarshalStoredJob's error (and so by a
// store's Get, List or Claim) for a stored job whose format this release
// does not know: one written by a newer release of bulkexport. Upgrade the
// hosts that share the store to that release.
var ErrUnknownJobFormat = errors.New("bulkexport: stored job in an unknown format")

// jobFields is Job without its methods, so that a struct embedding it
// encodes and decodes Job's fields as encoding/json does for Job.
type jobFields Job

// storedJobOut is the stored form as MarshalStoredJob writes it.
type storedJobOut struct {
	Format int `json:"format"`
	jobFields
}

// storedJobIn is the stored form as UnmarshalStoredJob reads it: a missing
// format stays nil.
type storedJobIn struct {
	Format *int64 `json:"format"`
	jobFields
}

// MarshalStoredJob returns the stored form of j: its JSON with "format":
// JobFormatVersion as the first key. Stores that keep jobs as JSON should
// use it, and UnmarshalStoredJob to read them back.
func MarshalStoredJob(j *Job) ([]byte, error) {
	if j == nil {
		return nil, errors.New("bulkexport: MarshalStoredJob: nil job")
	}
	return json.Marshal(&storedJobOut{Format: JobFormatVersion, jobFields: jobFields(*j)})
}

// UnmarshalStoredJob decodes a job's stored form. A document without
// "format" is read as format 1 (jobs stored before the key was written). A
// format other than JobFormatVersion gives an error wrapping
// ErrUnknownJobFormat that names it, even when the rest of the document
// does not decode as this release's Job, since it need not.
func UnmarshalStoredJob(data []byte) (*Job, error) {
	var v storedJobIn
	err := json.Unmarshal(data, &v)
	// A type error leaves the rest decoded, format included: a newer
	// format's document is reported as such, not by what fails to fit.
	if v.Format != nil && *v.Format != JobFormatVersion {
		if *v.Format > JobFormatVersion {
			return nil, fmt.Errorf("%w: format %d (this release reads format %d; the job was written by a newer release)", ErrUnknownJobFormat, *v.Format, JobFormatVersion)
		}
		return nil, fmt.Errorf("%w: format %d is not a valid format version", ErrUnknownJobFormat, *v.Format)
	}
	if err != nil {
		return nil, fmt.Errorf("bulkexport: decoding a stored job: %w", err)
	}
	j := Job(v.jobFields)
	return &j, nil
}
