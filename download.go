package bulkexport

import (
	"compress/gzip"
	"errors"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"io"
	"io/fs"
	"net/http"
	"os"
	"strings"
	"sync"
)

// serveFile answers [base]/bulkfiles/{jobID}/{name}: one file of a job the
// client owns, listed in the job's manifest. Anything else is 404, so the
// path cannot reach outside the job's files. Under DownloadRedirect the
// answer is a redirect to a presigned URL instead of the file.
func (h *Handler) serveFile(w http.ResponseWriter, r *http.Request, rest string) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		h.writeError(w, r, methodNotAllowed("GET"))
		return
	}
	w, r = h.tel.startDownload(w, r, rest) // span and byte count
	defer h.tel.endDownload(w, r)
	notFound := &Error{Status: http.StatusNotFound, Code: fhirbulk.IssueNotFound, Message: "no such export file"}
	jobID, name, ok := strings.Cut(rest, "/")
	valid := ok && validJobID(jobID) && validJobID(name) && h.opts.Storage != nil
	// A signed URL stands in for the client's credentials, for its file.
	signed := false
	if valid {
		var err error
		if signed, err = h.verifySignedFile(r, jobID, name); err != nil {
			h.writeError(w, r, err)
			return
		}
	}
	var clientID string
	if signed {
		j, err := h.store.Get(r.Context(), jobID)
		if err != nil {
			h.writeError(w, r, storeError(err))
			return
		}
		clientID = j.Owner
	} else {
		var err error
		if clientID, err = h.authenticate(r); err != nil {
			h.writeError(w, r, err)
			return
		}
	}
	if !valid {
		h.writeError(w, r, notFound)
		return
	}
	job, err := h.lookup(r, clientID, jobID)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	if !job.hasFile(name) || job.State == StateCancelled || job.State == StateFailed {
		h.writeError(w, r, notFound)
		return
	}
	if h.opts.Downloads == DownloadRedirect {
		h.redirectFile(w, r, jobID, name)
		return
	}
	f, err := h.opts.Storage.Open(r.Context(), jobID, name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			err = notFound
		} else {
			err = &Error{Status: http.StatusServiceUnavailable, Code: fhirbulk.IssueTransient, Message: "the file storage is unavailable; retry later", Err: err}
		}
		h.writeError(w, r, err)
		return
	}
	defer f.Close()
	hdr := w.Header()
	hdr.Set("Content-Type", contentTypeNDJSON)
	hdr.Set("Cache-Control", "private, no-store")
	hdr.Add("Vary", "Accept-Encoding")
	if r.Method == http.MethodGet && r.Header.Get("Range") == "" && acceptsGzip(r.Header.Get("Accept-Encoding")) {
		hdr.Set("Content-Encoding", "gzip")
		w.WriteHeader(http.StatusOK)
		zw := gzipPool.Get().(*gzip.Writer)
		zw.Reset(w)
		_, _ = io.Copy(zw, f)
		_ = zw.Close()
		gzipPool.Put(zw)
		return
	}
	var content io.ReadSeeker = f
	if of, ok := f.(interface{ OSFile() *os.File }); ok {
		// A plain *os.File lets net/http use sendfile.
		content = of.OSFile()
	}
	http.ServeContent(w, r, name, f.ModTime(), content)
}

// hasFile reports whether name is one of the job's manifest files.
func (j *Job) hasFile(name string) bool {
	for _, list := range [][]File{j.Output, j.Deleted, j.Errors} {
		for _, f := range list {
			if f.Name == name {
				return true
			}
		}
	}
	return false
}

var gzipPool = sync.Pool{New: func() any {
	zw, _ := gzip.NewWriterLevel(io.Discard, gzip.BestSpeed)
	return zw
}}

// acceptsGzip reports whether Accept-Encoding lists gzip with a non-zero
// q-value.
func acceptsGzip(ae string) bool {
	for _, part := range strings.Split(ae, ",") {
		coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		if !strings.EqualFold(strings.TrimSpace(coding), "gzip") {
			continue
		}
		params = strings.ReplaceAll(params, " ", "")
		return !strings.HasPrefix(params, "q=0") || strings.HasPrefix(params, "q=0.") && strings.Trim(params[4:], "0") != ""
	}
	return false
}
