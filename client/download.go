package client

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// errRemoteShorter: the server's file is shorter than the part already
// held locally (it is not the same file); the download starts over.
var errRemoteShorter = errors.New("the file on the server is shorter than the part already downloaded")

var errClosed = errors.New("client: read from a closed file reader")

// Open returns the NDJSON content of one manifest file. requiresAccessToken
// is the manifest's: the bearer token is sent only when it is true. The
// reader asks for gzip and decodes it; when the connection drops mid-body,
// or the server answers 429 or 5xx, it waits as Options say and carries on
// with a Range request for the rest (in identity encoding, so that the
// offset is a position in the NDJSON itself). At the end it checks the
// number of non-empty lines against the entry's count, when there is one:
// a difference is an *Error wrapping ErrCountMismatch instead of io.EOF.
// Open makes the first request; an answer it cannot use is an *Error.
func (c *Client) Open(ctx context.Context, f fhirbulk.ManifestFile, requiresAccessToken bool) (io.ReadCloser, error) {
	r := c.newFileReader(ctx, f, requiresAccessToken, 0, lineCounter{})
	if err := r.ensure(); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// File is one file of a manifest, as Download stored it.
type File struct {
	// Kind is the manifest list the file is from: "output", "deleted" or
	// "error".
	Kind string
	fhirbulk.ManifestFile
	// Path is where the file is: in the download directory, named after
	// the last segment of its URL.
	Path string
	// Lines is the number of resources (non-empty lines) and Bytes the
	// size of the NDJSON.
	Lines int64
	Bytes int64
	// Skipped is true when the file was already complete on disk.
	Skipped bool
	// Resumed is true when a partial file from an earlier run was
	// continued.
	Resumed bool
	// Retries counts the retried requests, resumes included.
	Retries int
}

// Progress reports a download's advance to Download's callback.
type Progress struct {
	// File is the file (Lines, Bytes and Retries as far as known).
	File File
	// Done is true once the file is complete.
	Done bool
}

// Files lists the files of m (output, then deleted, then error) with the
// local paths Download gives them in dir: the last segment of the URL,
// made safe, with ".ndjson" added when missing and "-2", "-3"... when two
// files would share a name. The names depend on m alone, so that a second
// run finds the files of the first.
func Files(m *fhirbulk.Manifest, dir string) []File {
	var out []File
	used := map[string]bool{"manifest.json": true}
	lists := []struct {
		kind  string
		files []fhirbulk.ManifestFile
	}{{"output", m.Output}, {"deleted", m.Deleted}, {"error", m.Error}}
	for _, l := range lists {
		for i, mf := range l.files {
			name := fileName(mf.URL)
			if name == "" {
				typ := safeName(mf.Type)
				if typ == "" {
					typ = l.kind
				}
				name = fmt.Sprintf("%s.%06d.ndjson", typ, i+1)
			}
			stem, ext := strings.TrimSuffix(name, ".ndjson"), ".ndjson"
			for n := 2; used[strings.ToLower(name)]; n++ {
				name = stem + "-" + strconv.Itoa(n) + ext
			}
			used[strings.ToLower(name)] = true
			out = append(out, File{Kind: l.kind, ManifestFile: mf, Path: filepath.Join(dir, name)})
		}
	}
	return out
}

func fileName(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		return ""
	}
	base := path.Base(u.Path)
	if base == "/" || base == "." {
		return ""
	}
	name := safeName(base)
	if name == "" {
		return ""
	}
	if !strings.HasSuffix(name, ".ndjson") {
		name += ".ndjson"
	}
	return name
}

// safeName keeps letters, digits, '.', '-' and '_', and no leading dot.
func safeName(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			b[i] = '_'
		}
	}
	s = strings.TrimLeft(string(b), ".")
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

// Download stores every file of m (output, deleted and error) in dir,
// which it creates, at most Options.Parallel at once (see Open for
// retries, resumes, gzip and the count check). Each file is written to
// NAME.part and renamed to NAME when complete, so a later run over the same
// manifest and dir skips complete files (checked against count, or
// against the size the server reports to HEAD when the manifest has no
// count) and resumes partial ones with Range. The first failure stops the
// other downloads (their parts stay for the next run); the files completed
// so far are returned with the error. progress, if not nil, is called as
// data arrives; calls are serialised.
func (c *Client) Download(ctx context.Context, m *fhirbulk.Manifest, dir string, progress func(Progress)) ([]File, error) {
	if m == nil {
		return nil, errors.New("client: Download: nil manifest")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	files := Files(m, dir)
	var mu sync.Mutex
	report := func(f *File, done bool) {
		if progress != nil {
			mu.Lock()
			defer mu.Unlock()
			progress(Progress{File: *f, Done: done})
		}
	}
	done := make([]bool, len(files))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(c.opts.Parallel)
	for i := range files {
		g.Go(func() error {
			if err := c.downloadFile(gctx, &files[i], m.RequiresAccessToken, report); err != nil {
				return err
			}
			done[i] = true
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		var ok []File
		for i, f := range files {
			if done[i] {
				ok = append(ok, f)
			}
		}
		return ok, err
	}
	return files, nil
}

func (c *Client) downloadFile(ctx context.Context, f *File, token bool, report func(*File, bool)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if fi, err := os.Stat(f.Path); err == nil && fi.Mode().IsRegular() {
		complete, lines, err := c.verifyComplete(ctx, f, token, fi.Size())
		if err != nil {
			return err
		}
		if complete {
			_ = os.Remove(f.Path + ".part") // a leftover of an earlier run
			f.Skipped, f.Lines, f.Bytes = true, lines, fi.Size()
			report(f, true)
			return nil
		}
		c.debug("bulkexport client: a stored file is not complete, fetching it again", "path", f.Path)
		if err := os.Remove(f.Path); err != nil {
			return err
		}
	}
	part := f.Path + ".part"
	for attempt := 0; ; attempt++ {
		err := c.fetchPart(ctx, f, part, token, report)
		if errors.Is(err, errRemoteShorter) && attempt == 0 {
			c.debug("bulkexport client: the partial file does not match, starting over", "path", part)
			if err := os.Remove(part); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		break
	}
	if err := os.Rename(part, f.Path); err != nil {
		return err
	}
	report(f, true)
	return nil
}

// fetchPart appends the rest of the file to part.
func (c *Client) fetchPart(ctx context.Context, f *File, part string, token bool, report func(*File, bool)) error {
	out, err := os.OpenFile(part, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer out.Close()
	var lines lineCounter
	size, err := io.Copy(&lines, out)
	if err != nil {
		return err
	}
	f.Resumed = size > 0
	f.Bytes, f.Lines = size, lines.Total()
	r := c.newFileReader(ctx, f.ManifestFile, token, size, lines)
	defer r.Close()
	r.progress = func(n int64) {
		f.Bytes += n
		report(f, false)
	}
	_, err = io.Copy(out, r)
	f.Lines, f.Retries = r.lines.Total(), f.Retries+r.retries
	if err != nil {
		return err
	}
	return out.Close()
}

// verifyComplete checks a stored file: its lines against the manifest's
// count, or without a count its size against the server's (HEAD). When the
// server cannot tell, the file is taken as complete: Download renames a
// file into place only once it is.
func (c *Client) verifyComplete(ctx context.Context, f *File, token bool, size int64) (bool, int64, error) {
	in, err := os.Open(f.Path)
	if err != nil {
		return false, 0, err
	}
	var lines lineCounter
	_, err = io.Copy(&lines, in)
	in.Close()
	if err != nil {
		return false, 0, err
	}
	if f.Count != nil {
		return *f.Count == lines.Total(), lines.Total(), nil
	}
	hc := c.fileHC
	if token {
		hc = c.hc
	}
	r := &request{op: "download", method: http.MethodHead, url: f.URL, token: token, hc: hc,
		header: http.Header{"Accept-Encoding": {"identity"}, "Accept": {"application/fhir+ndjson"}}}
	resp, _, err := c.send(ctx, r)
	if err != nil {
		if ctx.Err() != nil {
			return false, 0, err
		}
		return true, lines.Total(), nil
	}
	enc := resp.Header.Get("Content-Encoding")
	if resp.StatusCode == http.StatusOK && resp.ContentLength >= 0 && (enc == "" || enc == "identity") {
		return resp.ContentLength == size, lines.Total(), nil
	}
	return true, lines.Total(), nil
}

// fileReader is the resuming reader behind Open and Download.
type fileReader struct {
	c     *Client
	ctx   context.Context
	mf    fhirbulk.ManifestFile
	token bool
	hc    *http.Client

	off   int64 // bytes of NDJSON delivered, the prefix held before included
	lines lineCounter
	total int64 // the NDJSON's size when known, else -1

	resp     *http.Response
	body     io.Reader // resp.Body, decoded
	complete bool      // nothing more to read (EOF, or 416 at off)

	noRange  bool // the server mishandled Range: fetch it whole and skip
	failures int  // failed attempts since the last progress
	retries  int
	err      error // sticky
	progress func(n int64)
}

func (c *Client) newFileReader(ctx context.Context, mf fhirbulk.ManifestFile, token bool, off int64, lines lineCounter) *fileReader {
	hc := c.fileHC
	if token {
		hc = c.hc
	}
	return &fileReader{c: c, ctx: ctx, mf: mf, token: token, hc: hc, off: off, lines: lines, total: -1}
}

func (r *fileReader) Read(p []byte) (int, error) {
	for {
		if r.err != nil {
			return 0, r.err
		}
		if err := r.ensure(); err != nil {
			r.err = err
			return 0, err
		}
		if r.complete {
			r.err = r.finish()
			return 0, r.err
		}
		n, err := r.body.Read(p)
		if n > 0 {
			r.off += int64(n)
			r.lines.Write(p[:n])
			r.failures = 0
			if r.progress != nil {
				r.progress(int64(n))
			}
		}
		if err == nil {
			if n > 0 {
				return n, nil
			}
			continue
		}
		r.closeBody()
		if err == io.EOF && (r.total < 0 || r.off >= r.total) {
			r.complete = true
			r.err = r.finish()
			return n, r.err
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF // shorter than Content-Length or Content-Range said
		}
		if rerr := r.retry(r.readError(err)); rerr != nil {
			r.err = rerr
			return n, rerr
		}
		r.c.debug("bulkexport client: resuming download", "url", r.mf.URL, "offset", r.off, "err", err)
		if n > 0 {
			return n, nil
		}
	}
}

// readError wraps a failure while reading a body: a network failure, to
// be retried, unless the context ended or the data is corrupt.
func (r *fileReader) readError(err error) error {
	e := &Error{Op: "download", Method: http.MethodGet, URL: r.mf.URL, Err: err}
	var corrupt flate.CorruptInputError
	switch {
	case r.ctx.Err() != nil:
		e.Err = errors.Join(r.ctx.Err(), err)
	case errors.Is(err, gzip.ErrChecksum), errors.Is(err, gzip.ErrHeader), errors.As(err, &corrupt):
	default:
		e.network = true
	}
	return e
}

// ensure connects when there is no body, retrying as Options say.
func (r *fileReader) ensure() error {
	for r.body == nil && !r.complete {
		if err := r.connect(); err != nil {
			if rerr := r.retry(err); rerr != nil {
				return rerr
			}
		}
	}
	return nil
}

// retry decides whether err is worth another attempt and waits for it.
// It returns err when it is not.
func (r *fileReader) retry(err error) error {
	var e *Error
	if !errors.As(err, &e) || r.ctx.Err() != nil {
		return err
	}
	if !(e.network || e.retryNow || e.StatusCode == http.StatusTooManyRequests || e.StatusCode >= 500) {
		return err
	}
	if r.failures >= r.c.opts.MaxRetries {
		return err
	}
	var d = r.c.backoff(r.failures, e.RetryAfter)
	if e.retryNow {
		d = 0
	}
	r.failures++
	r.retries++
	if serr := sleep(r.ctx, d); serr != nil {
		return errors.Join(serr, err)
	}
	return nil
}

// connect makes one request for the rest of the file.
func (r *fileReader) connect() error {
	h := http.Header{"Accept": {"application/fhir+ndjson"}}
	ranged := r.off > 0 && !r.noRange
	if ranged {
		// Ranges of a gzip stream are useless for resuming: ask for the
		// identity encoding.
		h.Set("Range", "bytes="+strconv.FormatInt(r.off, 10)+"-")
		h.Set("Accept-Encoding", "identity")
	} else {
		h.Set("Accept-Encoding", "gzip")
	}
	rq := &request{op: "download", method: http.MethodGet, url: r.mf.URL, header: h, token: r.token, hc: r.hc}
	req, err := r.c.newRequest(r.ctx, rq)
	if err != nil {
		return err
	}
	resp, err := r.hc.Do(req)
	if err != nil {
		return r.c.networkError(r.ctx, rq, err)
	}
	protocolError := func(format string, args ...any) *Error {
		return &Error{Op: rq.op, Method: rq.method, URL: rq.url, StatusCode: resp.StatusCode, Err: fmt.Errorf(format, args...)}
	}
	enc := strings.ToLower(strings.TrimSpace(resp.Header.Get("Content-Encoding")))
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, total, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ranged || !ok || start != r.off || (enc != "" && enc != "identity") {
			resp.Body.Close()
			r.noRange = true
			e := protocolError("unusable partial content (Content-Range %q, Content-Encoding %q); fetching the whole file",
				resp.Header.Get("Content-Range"), enc)
			e.retryNow = true
			return e
		}
		if total >= 0 {
			r.total = total
		}
		r.resp, r.body = resp, resp.Body
		return nil
	case http.StatusOK:
		var body io.Reader = resp.Body
		switch enc {
		case "", "identity":
			if resp.ContentLength >= 0 {
				r.total = resp.ContentLength
			}
		case "gzip", "x-gzip":
			zr, err := gzip.NewReader(resp.Body)
			if err != nil {
				resp.Body.Close()
				return r.readError(err)
			}
			body = zr
		default:
			resp.Body.Close()
			return protocolError("unsupported Content-Encoding %q", enc)
		}
		if r.off > 0 {
			// The whole file came: skip the part already held.
			if _, err := io.CopyN(io.Discard, body, r.off); err != nil {
				resp.Body.Close()
				if err == io.EOF {
					return &Error{Op: rq.op, Method: rq.method, URL: rq.url, StatusCode: resp.StatusCode, Err: errRemoteShorter}
				}
				return r.readError(err)
			}
		}
		r.resp, r.body = resp, body
		return nil
	case http.StatusRequestedRangeNotSatisfiable:
		resp.Body.Close()
		if total, ok := parseUnsatisfiedRange(resp.Header.Get("Content-Range")); ranged && ok && total == r.off {
			// Everything was already there.
			r.total, r.complete = total, true
			return nil
		}
		return &Error{Op: rq.op, Method: rq.method, URL: rq.url, StatusCode: resp.StatusCode, Err: errRemoteShorter}
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	return r.c.httpError(rq, resp, body)
}

// finish checks the line count at the end of the file.
func (r *fileReader) finish() error {
	if r.mf.Count != nil {
		if got := r.lines.Total(); got != *r.mf.Count {
			return &Error{Op: "download", Method: http.MethodGet, URL: r.mf.URL,
				Err: fmt.Errorf("%w: %d resources, the manifest says %d", ErrCountMismatch, got, *r.mf.Count)}
		}
	}
	return io.EOF
}

func (r *fileReader) closeBody() {
	if r.resp != nil {
		r.resp.Body.Close()
		r.resp, r.body = nil, nil
	}
}

// Close releases the connection.
func (r *fileReader) Close() error {
	r.closeBody()
	if r.err == nil {
		r.err = errClosed
	}
	return nil
}

// parseContentRange reads "bytes START-END/TOTAL" (TOTAL may be "*": -1).
func parseContentRange(h string) (start, total int64, ok bool) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(h), "bytes ")
	if !ok {
		return 0, 0, false
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, false
	}
	s, _, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, false
	}
	start, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil || start < 0 {
		return 0, 0, false
	}
	total = -1
	if tot = strings.TrimSpace(tot); tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil {
			return 0, 0, false
		}
	}
	return start, total, true
}

// parseUnsatisfiedRange reads the "bytes */TOTAL" of a 416.
func parseUnsatisfiedRange(h string) (int64, bool) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(h), "bytes */")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(rest), 10, 64)
	return n, err == nil && n >= 0
}

// lineCounter counts NDJSON resources: lines holding anything but
// blanks. It is an io.Writer that never fails.
type lineCounter struct {
	n      int64
	inLine bool // the current line has content
}

func (lc *lineCounter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		seg := p
		if i >= 0 {
			seg = p[:i]
		}
		if !lc.inLine && len(bytes.TrimLeft(seg, " \t\r")) > 0 {
			lc.inLine = true
		}
		if i < 0 {
			break
		}
		if lc.inLine {
			lc.n++
		}
		lc.inLine = false
		p = p[i+1:]
	}
	return n, nil
}

// Total is the count, a last line without a newline included.
func (lc *lineCounter) Total() int64 {
	if lc.inLine {
		return lc.n + 1
	}
	return lc.n
}
