package bulkexport

import (
	"encoding/json"
	"time"
)

// Manifest is the body of a completed status response (Bulk Data IG
// STU2/STU3 shape). The client package decodes the same type.
type Manifest struct {
	// TransactionTime is the instant the export's data reflects.
	TransactionTime string `json:"transactionTime"`
	// Request is the full kick-off URL.
	Request string `json:"request"`
	// RequiresAccessToken says whether downloads need the kick-off's token.
	RequiresAccessToken bool `json:"requiresAccessToken"`
	// Output lists the data files; always present, [] when empty.
	Output []ManifestFile `json:"output"`
	// Deleted lists NDJSON files of transaction Bundles with DELETE
	// entries; left out when there are none.
	Deleted []ManifestFile `json:"deleted,omitempty"`
	// Error lists NDJSON files of OperationOutcomes; always present.
	Error []ManifestFile `json:"error"`
	// Extension is a JSON object of custom fields.
	Extension json.RawMessage `json:"extension,omitempty"`
}

// ManifestFile is one entry of output[], deleted[] or error[].
type ManifestFile struct {
	Type  string `json:"type"`
	URL   string `json:"url"`
	Count *int64 `json:"count,omitempty"`
}

// Manifest builds the manifest of a job, with absolute file URLs.
func (h *Handler) Manifest(job *Job) *Manifest {
	m := &Manifest{
		TransactionTime:     FormatInstant(job.TransactionTime),
		Request:             job.Request.URL,
		RequiresAccessToken: h.token,
		Output:              h.manifestFiles(job, job.Output),
		Error:               h.manifestFiles(job, job.Errors),
		Extension:           job.Extension,
	}
	if len(job.Deleted) > 0 {
		m.Deleted = h.manifestFiles(job, job.Deleted)
	}
	return m
}

func (h *Handler) manifestFiles(job *Job, files []File) []ManifestFile {
	out := make([]ManifestFile, len(files))
	for i, f := range files {
		count := f.Count
		out[i] = ManifestFile{Type: f.Type, URL: h.FileURL(job.ID, f.Name), Count: &count}
	}
	return out
}

// FormatInstant formats t as a FHIR instant in UTC with millisecond
// precision, e.g. 2026-01-02T03:04:05.678Z.
func FormatInstant(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000Z07:00")
}
