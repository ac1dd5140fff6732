package bulkexport

import (
	"bytes"
	"encoding/json"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"strconv"
)

// ManifestVersion picks the shape of the completion manifest.
type ManifestVersion int

const (
	// ManifestSTU3 is the Bulk Data IG STU2/STU3 manifest: request,
	// error[] always present, extension as a JSON object. The default.
	ManifestSTU3 ManifestVersion = iota
	// ManifestSTU4 is the STU4 ballot shape: outcome[] in place of error[],
	// no request, extension as an array of FHIR Extensions, plus
	// manifestType, outputFormat and fileSize. Kick-off is POST only.
	ManifestSTU4
)

// manifestSTU4 is the wire shape of an STU4 manifest.
type manifestSTU4 struct {
	ManifestType        string                  `json:"manifestType"`
	TransactionTime     string                  `json:"transactionTime"`
	RequiresAccessToken bool                    `json:"requiresAccessToken"`
	OutputFormat        string                  `json:"outputFormat"`
	OutputOrganizedBy   string                  `json:"outputOrganizedBy,omitempty"`
	Output              []fhirbulk.ManifestFile `json:"output"`
	Deleted             []fhirbulk.ManifestFile `json:"deleted,omitempty"`
	Outcome             []fhirbulk.ManifestFile `json:"outcome"`
	Link                []fhirbulk.ManifestLink `json:"link,omitempty"`
	Extension           json.RawMessage         `json:"extension,omitempty"`
}

// Manifest builds the whole (unpaged) manifest of a job, with absolute
// file URLs, in the STU2/STU3 shape. The URLs are the handler's file URLs;
// under DownloadSigned, ManifestContext lists the presigned ones.
func (h *Handler) Manifest(job *Job) *fhirbulk.Manifest {
	return h.stu3Manifest(job, job.Output, job.Deleted, job.Errors, nil)
}

// stu3Manifest builds an STU2/STU3 manifest (page) listing the given files.
func (h *Handler) stu3Manifest(job *Job, output, deleted, errs []File, links []fhirbulk.ManifestLink) *fhirbulk.Manifest {
	m := &fhirbulk.Manifest{
		TransactionTime:     fhirbulk.FormatInstant(job.TransactionTime),
		Request:             job.Request.URL,
		RequiresAccessToken: h.token,
		OutputOrganizedBy:   job.Request.OrganizeOutputBy,
		Output:              h.manifestFiles(job, output, false),
		Error:               h.manifestFiles(job, errs, false),
		Link:                links,
	}
	if len(deleted) > 0 {
		m.Deleted = h.manifestFiles(job, deleted, false)
	}
	if jsonKind(job.Extension) == '{' {
		m.Extension = job.Extension
	}
	return m
}

// manifestPage is page k (from 1) of a job's manifest, or ok false when
// that page cannot be served yet (or ever).
//
// Unless the client allowed partial manifests, there is one page, served
// once the job is complete. With allowPartialManifests=true, output[] is
// cut into pages of ManifestPageSize entries. Full pages are served as
// soon as their files are final, even while the job runs, and never change
// afterwards except by gaining a "next" link. The last page, served once
// the job is complete, holds the remaining output[] entries together with
// deleted[] and error[].
func (h *Handler) manifestPage(job *Job, k int) (body any, ok bool) {
	completed := job.State == StateCompleted
	output, deleted, errs := job.Output, job.Deleted, job.Errors
	next := 0
	if !job.Request.AllowPartialManifests {
		if k != 1 || !completed {
			return nil, false
		}
	} else {
		n := h.opts.ManifestPageSize
		full := len(output) / n // pages 1..full are full
		switch {
		case k <= full:
			output, deleted, errs = output[(k-1)*n:k*n], nil, nil
			if k < full || completed {
				next = k + 1
			}
		case k == full+1 && completed:
			output = output[full*n:]
		default:
			return nil, false
		}
	}
	var links []fhirbulk.ManifestLink
	if next > 0 {
		links = []fhirbulk.ManifestLink{{Relation: "next", URL: h.pageURL(job.ID, next)}}
	}
	if h.opts.ManifestVersion == ManifestSTU4 {
		m := &manifestSTU4{
			ManifestType:        fhirbulk.ManifestTypeURL,
			TransactionTime:     fhirbulk.FormatInstant(job.TransactionTime),
			RequiresAccessToken: h.token,
			OutputFormat:        job.Request.OutputFormat,
			OutputOrganizedBy:   job.Request.OrganizeOutputBy,
			Output:              h.manifestFiles(job, output, true),
			Outcome:             h.manifestFiles(job, errs, true),
			Link:                links,
		}
		if m.OutputFormat == "" {
			m.OutputFormat = FormatNDJSON
		}
		if len(deleted) > 0 {
			m.Deleted = h.manifestFiles(job, deleted, true)
			for i := range m.Deleted {
				m.Deleted[i].Type = "" // STU4 deleted items carry no type
			}
		}
		if jsonKind(job.Extension) == '[' {
			m.Extension = job.Extension
		}
		return m, true
	}
	return h.stu3Manifest(job, output, deleted, errs, links), true
}

func (h *Handler) manifestFiles(job *Job, files []File, withSize bool) []fhirbulk.ManifestFile {
	out := make([]fhirbulk.ManifestFile, len(files))
	for i, f := range files {
		count := f.Count
		out[i] = fhirbulk.ManifestFile{Type: f.Type, URL: h.FileURL(job.ID, f.Name), Count: &count}
		if f.ContinuesIn != "" {
			out[i].ContinuesInFile = h.FileURL(job.ID, f.ContinuesIn)
		}
		if withSize {
			size := f.Size
			out[i].FileSize = &size
		}
	}
	return out
}

// pageURL is the status URL of manifest page k.
func (h *Handler) pageURL(id string, k int) string {
	sep := "&"
	if h.opts.StatusURLStyle == StatusPath {
		sep = "?"
	}
	return h.statusURL(id) + sep + "_page=" + strconv.Itoa(k)
}

// jsonKind is the first non-space byte of a JSON value, or 0.
func jsonKind(raw json.RawMessage) byte {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return 0
	}
	return raw[0]
}
