package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Status is the answer to one poll of a status URL.
type Status struct {
	// URL is the status URL polled.
	URL string
	// Complete is true when the export is done and Manifest is set.
	Complete bool
	// Progress is the X-Progress header of an export in progress.
	Progress string
	// RetryAfter is the server's advised wait before the next poll (from
	// Retry-After, delay-seconds or HTTP-date); 0 when it sent none.
	RetryAfter time.Duration
	// Manifest is the complete export's manifest, with every page reached
	// through link "next" merged into one (Output, Deleted and Error
	// appended, duplicates by URL dropped).
	Manifest *fhirbulk.Manifest
	// Expires is the Expires header of a complete export: when the files
	// stop being available. Zero when absent.
	Expires time.Time
}

// ManifestLink is one entry of a manifest's link[] (STU3 paging).
type ManifestLink = fhirbulk.ManifestLink

// manifestPage is a manifest page as served.
type manifestPage struct {
	fhirbulk.Manifest
}

func (p *manifestPage) next() string {
	for _, l := range p.Link {
		if l.Relation == "next" && l.URL != "" {
			return l.URL
		}
	}
	return ""
}

// normalize folds the STU4 outcome[] into error[], so that callers read
// one list whichever manifest version the server writes.
func (p *manifestPage) normalize() {
	p.Error = append(p.Error, p.Outcome...)
	p.Outcome = nil
}

// maxManifestPages bounds link paging.
const maxManifestPages = 100000

// Status polls statusURL once. An export in progress (202) and a complete
// one (200, with the manifest and all its pages) are a *Status; any other
// answer, including 429, is an *Error (Transient tells whether to poll
// again). Manifest pages are fetched with retries.
func (c *Client) Status(ctx context.Context, statusURL string) (*Status, error) {
	r := &request{op: "status", method: http.MethodGet, url: statusURL, token: true,
		header: http.Header{"Accept": {"application/json"}}}
	resp, body, err := c.send(ctx, r)
	if err != nil {
		return nil, err
	}
	code := resp.StatusCode
	if xs := resp.Header.Get("X-Export-Status"); code == http.StatusOK && xs != "" {
		// Prefer: separate-export-status: the job's status is in the
		// header, the HTTP status describes the poll.
		if n, err := strconv.Atoi(strings.Fields(xs + " ")[0]); err == nil && n >= 200 && n <= 599 {
			code = n
			resp.StatusCode = n
		}
	}
	switch code {
	case http.StatusAccepted:
		st := &Status{URL: statusURL, Progress: resp.Header.Get("X-Progress")}
		st.RetryAfter, _ = parseRetryAfter(resp.Header.Get("Retry-After"), c.opts.Now())
		return st, nil
	case http.StatusOK:
		st := &Status{URL: statusURL, Complete: true}
		if exp := resp.Header.Get("Expires"); exp != "" {
			st.Expires, _ = http.ParseTime(exp)
		}
		m, err := c.readManifest(ctx, r, body)
		if err != nil {
			return nil, err
		}
		st.Manifest = m
		return st, nil
	}
	return nil, c.httpError(r, resp, body)
}

// readManifest decodes the first page and follows link "next".
func (c *Client) readManifest(ctx context.Context, r *request, body []byte) (*fhirbulk.Manifest, error) {
	var page manifestPage
	if err := json.Unmarshal(body, &page); err != nil {
		return nil, &Error{Op: r.op, Method: r.method, URL: r.url, StatusCode: http.StatusOK, Err: fmt.Errorf("the manifest is not valid JSON: %w", err)}
	}
	page.normalize()
	m := page.Manifest
	m.Link = nil
	seenFiles := map[string]bool{}
	for _, list := range [][]fhirbulk.ManifestFile{m.Output, m.Deleted, m.Error} {
		for _, f := range list {
			seenFiles[f.URL] = true
		}
	}
	seenPages := map[string]bool{r.url: true}
	cur := r.url
	for n := 1; ; n++ {
		link := page.next()
		if link == "" {
			break
		}
		next, err := resolve(cur, link)
		if err != nil {
			return nil, &Error{Op: "manifest", Method: http.MethodGet, URL: cur, Err: fmt.Errorf("bad link %q: %w", link, err)}
		}
		if seenPages[next] || n >= maxManifestPages {
			return nil, &Error{Op: "manifest", Method: http.MethodGet, URL: next, Err: errors.New("the manifest's next links loop")}
		}
		seenPages[next] = true
		pr := &request{op: "manifest", method: http.MethodGet, url: next, token: true,
			header: http.Header{"Accept": {"application/json"}}}
		_, pbody, err := c.exchange(ctx, pr, func(s int) bool { return s == http.StatusOK }, anyNetworkError)
		if err != nil {
			return nil, err
		}
		page = manifestPage{}
		if err := json.Unmarshal(pbody, &page); err != nil {
			return nil, &Error{Op: pr.op, Method: pr.method, URL: next, StatusCode: http.StatusOK, Err: fmt.Errorf("the manifest page is not valid JSON: %w", err)}
		}
		page.normalize()
		// A linked page repeats the other fields; error[] may be
		// repeated (STU3) or paged (STU4), so duplicates are dropped.
		m.Output = appendNew(m.Output, page.Output, seenFiles)
		m.Deleted = appendNew(m.Deleted, page.Deleted, seenFiles)
		m.Error = appendNew(m.Error, page.Error, seenFiles)
		cur = next
	}
	if m.Output == nil {
		m.Output = []fhirbulk.ManifestFile{}
	}
	if m.Error == nil {
		m.Error = []fhirbulk.ManifestFile{}
	}
	return &m, nil
}

func appendNew(dst, src []fhirbulk.ManifestFile, seen map[string]bool) []fhirbulk.ManifestFile {
	for _, f := range src {
		if !seen[f.URL] {
			seen[f.URL] = true
			dst = append(dst, f)
		}
	}
	return dst
}

// Wait polls statusURL until the export completes and returns the final
// Status (with the manifest). Between polls it waits as the server's
// Retry-After says, within [MinPollInterval, MaxPollInterval], or backs off
// exponentially without one. A 429 is obeyed the same way and does not
// count as a failure; other transient failures (network errors, 5xx with a
// transient OperationOutcome) are retried up to MaxRetries times in a row.
// A final error (the job failed, was cancelled, expired...) ends the wait.
// onProgress, if not nil, is called with every in-progress Status. Wait
// returns when ctx is done, with an error wrapping ctx.Err().
func (c *Client) Wait(ctx context.Context, statusURL string, onProgress func(*Status)) (*Status, error) {
	polls, failures := 0, 0
	for {
		st, err := c.Status(ctx, statusURL)
		var wait time.Duration
		switch {
		case err == nil && st.Complete:
			return st, nil
		case err == nil:
			failures = 0
			if onProgress != nil {
				onProgress(st)
			}
			wait = c.pollInterval(st.RetryAfter, polls)
			polls++
		case ctx.Err() != nil:
			return nil, err
		default:
			var e *Error
			if !errors.As(err, &e) || !e.Transient() {
				return nil, err
			}
			if e.StatusCode == http.StatusTooManyRequests && e.RetryAfter > 0 {
				// Rate limiting: the server says when to come back.
				wait = c.pollInterval(e.RetryAfter, polls)
				polls++
				break
			}
			if failures >= c.opts.MaxRetries {
				return nil, err
			}
			wait = c.backoff(failures, e.RetryAfter)
			failures++
			c.debug("bulkexport client: status poll failed, retrying", "url", statusURL, "err", err, "wait", wait)
		}
		if serr := sleep(ctx, wait); serr != nil {
			return nil, fmt.Errorf("client: waiting for %s: %w", statusURL, serr)
		}
	}
}

// Cancel sends DELETE to the status URL: the server cancels a running
// export (or, by the IG's reading, removes a finished one's files). Any
// answer but 202 (or another 2xx) is an *Error; the library's server answers
// 404 for a job that has already finished or been cancelled. Transient
// failures are retried; a retry that finds the job already cancelled
// (404 with issue code "deleted") after an attempt that got no answer is
// taken as success.
func (c *Client) Cancel(ctx context.Context, statusURL string) error {
	r := &request{op: "cancel", method: http.MethodDelete, url: statusURL, token: true,
		header: http.Header{"Accept": {"application/fhir+json"}}}
	lost := false // an earlier attempt may have reached the server
	retryNetwork := func(error) bool { lost = true; return true }
	_, _, err := c.exchange(ctx, r, func(s int) bool { return s >= 200 && s < 300 }, retryNetwork)
	var e *Error
	if lost && errors.As(err, &e) && e.StatusCode == http.StatusNotFound {
		if is := e.Issue(); is != nil && is.Code == fhirbulk.IssueDeleted {
			return nil
		}
	}
	return err
}
