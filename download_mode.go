package bulkexport

import (
	"context"
	"fmt"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"net/http"
	"time"
)

// DownloadMode picks how clients download the export files
// (Options.Downloads).
type DownloadMode int

const (
	// DownloadProxy lists the handler's own file URLs in the manifest
	// ([base]/bulkfiles/{job}/{file}), and the handler streams each file
	// from the Storage, after the same authentication and client binding
	// as polling. requiresAccessToken is true when Authenticate is set. It
	// serves Range requests and gzip, and works with any Storage. The
	// default.
	DownloadProxy DownloadMode = iota

	// DownloadSigned lists presigned Storage URLs in the manifest (the
	// Storage must implement URLSigner): capability URLs that work on
	// their own until Options.SignedURLExpiry, so requiresAccessToken is
	// false and clients fetch the files straight from the object store,
	// without their token. The manifest is built on each poll, so every
	// poll hands out fresh URLs: a client whose links expired fetches the
	// manifest again, as the IG allows.
	DownloadSigned

	// DownloadRedirect lists the handler's own file URLs in the manifest,
	// as DownloadProxy does (requiresAccessToken is true when Authenticate
	// is set), but the file endpoint, after authenticating the client and
	// checking that the job is its own, answers 307 Temporary Redirect to
	// a fresh presigned Storage URL (the Storage must implement URLSigner)
	// instead of streaming the file. The object store serves the bytes;
	// the client's token stays with this server, as HTTP clients drop
	// Authorization on redirects to another host (Go's http.Client does,
	// and so does Inferno's bulk data test kit).
	DownloadRedirect
)

// DefaultSignedURLExpiry is the default Options.SignedURLExpiry: 5
// minutes, the longest lifetime SMART Backend Services advises for access
// tokens, which capability URLs are to follow.
const DefaultSignedURLExpiry = 5 * time.Minute

// String returns the mode's name.
func (m DownloadMode) String() string {
	switch m {
	case DownloadProxy:
		return "proxy"
	case DownloadSigned:
		return "signed"
	case DownloadRedirect:
		return "redirect"
	}
	return fmt.Sprintf("DownloadMode(%d)", int(m))
}

// initDownloads picks the signer of a new Handler's download URLs;
// Options.validate has checked the combination.
func (h *Handler) initDownloads() {
	switch {
	case h.opts.Downloads == DownloadProxy && len(h.opts.SigningKeys) > 0:
		// The handler signs its own file URLs: capability URLs that need
		// no token.
		h.signer = hmacSigner{h}
		h.token = false
	case h.opts.Downloads != DownloadProxy:
		h.signer = h.opts.Storage.(URLSigner)
		if h.opts.Downloads == DownloadSigned {
			h.token = false
		}
	}
}

// errCannotSign answers a request that needed a presigned URL the Storage
// could not make.
func errCannotSign(err error) error {
	return &Error{Status: http.StatusServiceUnavailable, Code: fhirbulk.IssueTransient,
		Message: "the file storage cannot sign download URLs now; retry later", Err: err}
}

// manifestFor is manifest page k (see manifestPage) with the file URLs the
// download mode calls for: under DownloadSigned, fresh presigned URLs, and
// the answer must not be cached.
func (h *Handler) manifestFor(w http.ResponseWriter, r *http.Request, job *Job, k int) (body any, ok bool, err error) {
	body, ok = h.manifestPage(job, k)
	if !ok || !h.signsManifest() {
		return body, ok, nil
	}
	if err := h.signManifest(r.Context(), job, body); err != nil {
		return nil, false, err
	}
	w.Header().Set("Cache-Control", "no-store")
	return body, true, nil
}

// ManifestContext is Manifest with the file URLs the download mode calls
// for: under DownloadSigned, presigned Storage URLs made with ctx (an error
// when the Storage cannot sign); otherwise the handler's file URLs.
func (h *Handler) ManifestContext(ctx context.Context, job *Job) (*fhirbulk.Manifest, error) {
	m := h.Manifest(job)
	if !h.signsManifest() {
		return m, nil
	}
	if err := h.signManifest(ctx, job, m); err != nil {
		return nil, err
	}
	return m, nil
}

// signManifest replaces the handler's file URLs in a manifest page (a
// *Manifest or *manifestSTU4) with presigned Storage URLs. Each file is
// signed once, so that continuesInFile equals the url of the file it
// names.
func (h *Handler) signManifest(ctx context.Context, job *Job, body any) error {
	var lists [][]fhirbulk.ManifestFile
	switch m := body.(type) {
	case *fhirbulk.Manifest:
		lists = [][]fhirbulk.ManifestFile{m.Output, m.Deleted, m.Error, m.Outcome}
	case *manifestSTU4:
		lists = [][]fhirbulk.ManifestFile{m.Output, m.Deleted, m.Outcome}
	default:
		return fmt.Errorf("bulkexport: cannot sign a manifest of type %T", body)
	}
	// The manifest's URLs come from FileURL: map them back to names.
	names := make(map[string]string)
	for _, files := range [][]File{job.Output, job.Deleted, job.Errors} {
		for _, f := range files {
			names[h.FileURL(job.ID, f.Name)] = f.Name
		}
	}
	signer := h.signer
	signed := make(map[string]string)
	sign := func(u *string) error {
		if *u == "" {
			return nil
		}
		if s, ok := signed[*u]; ok {
			*u = s
			return nil
		}
		name, ok := names[*u]
		if !ok {
			return fmt.Errorf("bulkexport: manifest URL %q names no file of job %s", *u, job.ID)
		}
		s, err := signer.SignedURL(ctx, job.ID, name, h.opts.SignedURLExpiry)
		if err != nil {
			return errCannotSign(fmt.Errorf("bulkexport: signing %s/%s: %w", job.ID, name, err))
		}
		signed[*u] = s
		*u = s
		return nil
	}
	for _, files := range lists {
		for i := range files {
			if err := sign(&files[i].URL); err != nil {
				return err
			}
			if err := sign(&files[i].ContinuesInFile); err != nil {
				return err
			}
		}
	}
	return nil
}

// redirectFile answers a file request under DownloadRedirect: 307 to a
// fresh presigned URL of the file. The caller has authenticated the client
// and checked that the file is one of its job's.
func (h *Handler) redirectFile(w http.ResponseWriter, r *http.Request, jobID, name string) {
	u, err := h.signer.SignedURL(r.Context(), jobID, name, h.opts.SignedURLExpiry)
	if err != nil {
		h.writeError(w, r, errCannotSign(fmt.Errorf("bulkexport: signing %s/%s: %w", jobID, name, err)))
		return
	}
	hdr := w.Header()
	hdr.Set("Location", u)
	// The URL is a credential of this client's: no cache may keep it.
	hdr.Set("Cache-Control", "private, no-store")
	hdr.Set("Referrer-Policy", "no-referrer")
	w.WriteHeader(http.StatusTemporaryRedirect)
}

// signsManifest reports whether manifests list signed URLs: presigned
// Storage URLs (DownloadSigned) or the handler's own URLs signed with
// Options.SigningKeys.
func (h *Handler) signsManifest() bool {
	return h.opts.Downloads == DownloadSigned || (h.opts.Downloads == DownloadProxy && h.signer != nil)
}
