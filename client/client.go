// Package client is a Go client for the FHIR Bulk Data async export
// protocol (HL7 Bulk Data Access IG, STU1–STU3) and the Danish eHealth
// $export-poll-status operation: kick-off, status polling, manifest paging,
// parallel resumable downloads, and cancel.
//
// A Client talks to one FHIR server:
//
//	c, err := client.New("https://fhir.example.org/fhir", &client.Options{Token: token})
//	job, err := c.Kickoff(ctx, &client.KickoffRequest{Types: []string{"Patient", "Observation"}})
//	st, err := c.Wait(ctx, job.StatusURL, nil)           // honours Retry-After, 429, transient errors
//	files, err := c.Download(ctx, st.Manifest, dir, nil) // parallel, retried, resumed with Range
//
// Every failure the server reports is an *Error carrying the HTTP status and
// the OperationOutcome; Error.Transient says whether trying again later may
// help. The package uses the standard library, golang.org/x/sync and the
// wire types of package fhirbulk only: it does not import the server.
//
// Credentials: Options.Token is sent as a bearer token with kick-off, status
// and cancel requests, and with downloads only when the manifest's
// requiresAccessToken is true. It is never sent on a redirect to another
// host. A Transport that adds credentials itself (oauth2, SMART Backend
// Services) plugs in through Options.HTTPClient; give Options.FileHTTPClient
// a plain client when files are served from capability URLs.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Options configures a Client. The zero value is usable; each field's
// comment gives its default.
type Options struct {
	// HTTPClient sends every request except token-less downloads (see
	// FileHTTPClient). Its Transport may add credentials itself (an oauth2
	// or SMART Backend Services transport); those are then sent on every
	// request it makes, which the client cannot prevent. The client works
	// on a copy whose CheckRedirect also removes Authorization from
	// redirects to another host or scheme (the original CheckRedirect, if
	// any, still runs). Default: a client over http.DefaultTransport
	// without an overall timeout (downloads may be long; bound them with
	// the context).
	HTTPClient *http.Client

	// FileHTTPClient sends downloads of manifests whose requiresAccessToken
	// is false (capability URLs such as presigned S3 URLs, which must not
	// see the SMART token). Default: HTTPClient.
	FileHTTPClient *http.Client

	// Token, if set, is sent as "Authorization: Bearer Token" with
	// kick-off, status, manifest page and cancel requests, and with file
	// downloads when the manifest's requiresAccessToken is true. Default:
	// none.
	Token string

	// UserAgent is the User-Agent header. Default: "bulkexport-client".
	UserAgent string

	// MinPollInterval and MaxPollInterval bound the wait between two
	// status polls. A Retry-After (delay-seconds or HTTP-date) on a 202 or
	// 429 is honoured within these bounds; without one the wait starts at
	// MinPollInterval and doubles up to MaxPollInterval (the IG asks
	// clients to back off exponentially). MaxPollInterval also caps any
	// Retry-After honoured when a request is retried. Defaults: 1s and
	// 5min.
	MinPollInterval time.Duration
	MaxPollInterval time.Duration

	// MaxRetries is how many times in a row a request is retried after a
	// transient failure: a network error, a 429, a 5xx (downloads) or an
	// OperationOutcome in the IssueType "transient" branch (status, cancel,
	// kick-off). A download that makes progress starts counting again.
	// 429s while waiting for a job are rate limiting, not failures, and are
	// not counted. Default: 5; negative: no retries.
	MaxRetries int

	// RetryMinBackoff and RetryMaxBackoff bound the exponential backoff
	// between retries (jittered between half and all of the step). A
	// Retry-After on the failed answer raises the wait to it (at most
	// MaxPollInterval). Defaults: 1s and 1min.
	RetryMinBackoff time.Duration
	RetryMaxBackoff time.Duration

	// Parallel is how many files Download fetches at once. Default: 4.
	Parallel int

	// Now is the clock for HTTP-date Retry-After values. Default: time.Now.
	Now func() time.Time

	// Logger receives debug logs of retries and resumes. Default: none.
	Logger *slog.Logger
}

// Defaults of Options.
const (
	DefaultMinPollInterval = time.Second
	DefaultMaxPollInterval = 5 * time.Minute
	DefaultMaxRetries      = 5
	DefaultRetryMinBackoff = time.Second
	DefaultRetryMaxBackoff = time.Minute
	DefaultParallel        = 4
	DefaultUserAgent       = "bulkexport-client"
)

// maxBodyBytes caps the bodies the client reads whole: OperationOutcomes
// and manifest pages.
const maxBodyBytes = 64 << 20

// Client is a bulk data export client for one FHIR server. It is safe for
// concurrent use.
type Client struct {
	base   string
	opts   Options
	hc     *http.Client
	fileHC *http.Client
	log    *slog.Logger
}

// New returns a Client for the FHIR server at baseURL (such as
// "https://fhir.example.org/fhir"). baseURL may be empty for a client that
// only follows status URLs (Status, Wait, Cancel, Download); Kickoff then
// fails. opts may be nil.
func New(baseURL string, opts *Options) (*Client, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	if baseURL != "" {
		u, err := url.Parse(baseURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
			return nil, fmt.Errorf("client: the base URL must be an absolute http(s) URL without query, got %q", baseURL)
		}
	}
	setDefault(&o.MinPollInterval, DefaultMinPollInterval)
	setDefault(&o.MaxPollInterval, DefaultMaxPollInterval)
	setDefault(&o.MaxRetries, DefaultMaxRetries)
	setDefault(&o.RetryMinBackoff, DefaultRetryMinBackoff)
	setDefault(&o.RetryMaxBackoff, DefaultRetryMaxBackoff)
	setDefault(&o.Parallel, DefaultParallel)
	if o.MaxRetries < 0 {
		o.MaxRetries = 0
	}
	if o.MaxPollInterval < o.MinPollInterval {
		o.MaxPollInterval = o.MinPollInterval
	}
	if o.RetryMaxBackoff < o.RetryMinBackoff {
		o.RetryMaxBackoff = o.RetryMinBackoff
	}
	if o.UserAgent == "" {
		o.UserAgent = DefaultUserAgent
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	c := &Client{base: strings.TrimSuffix(baseURL, "/"), opts: o, log: o.Logger}
	hc := o.HTTPClient
	if hc == nil {
		hc = &http.Client{}
	}
	c.hc = safeRedirects(hc)
	c.fileHC = c.hc
	if o.FileHTTPClient != nil {
		c.fileHC = safeRedirects(o.FileHTTPClient)
	}
	return c, nil
}

func setDefault[T int | time.Duration](p *T, def T) {
	if *p == 0 {
		*p = def
	}
}

// CloseIdleConnections closes the idle connections of the HTTP clients
// (parallel downloads may leave some open), as http.Client's method does.
func (c *Client) CloseIdleConnections() {
	c.hc.CloseIdleConnections()
	c.fileHC.CloseIdleConnections()
}

// BaseURL returns the FHIR base URL the client was created with, without a
// trailing slash.
func (c *Client) BaseURL() string { return c.base }

// safeRedirects returns a copy of hc whose redirects never carry the
// Authorization header to another origin (host, port or scheme), even when
// the chain comes back.
func safeRedirects(hc *http.Client) *http.Client {
	cp := *hc
	next := hc.CheckRedirect
	cp.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if len(via) > 0 {
			origin := originOf(via[0].URL)
			for _, r := range append(via[1:len(via):len(via)], req) {
				if origin != originOf(r.URL) {
					req.Header.Del("Authorization")
					break
				}
			}
		}
		if next != nil {
			return next(req, via)
		}
		if len(via) >= 10 {
			return errors.New("stopped after 10 redirects")
		}
		return nil
	}
	return &cp
}

// originOf is scheme://host:port, with the default port made explicit.
func originOf(u *url.URL) string {
	scheme := strings.ToLower(u.Scheme)
	host, port := strings.ToLower(u.Hostname()), u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[scheme]
	}
	return scheme + "://" + net.JoinHostPort(host, port)
}

// request is one HTTP exchange the client prepares.
type request struct {
	op     string
	method string
	url    string
	body   []byte
	header http.Header
	token  bool // send Options.Token
	hc     *http.Client
}

func (c *Client) newRequest(ctx context.Context, r *request) (*http.Request, error) {
	var body io.Reader
	if r.body != nil {
		body = bytes.NewReader(r.body)
	}
	req, err := http.NewRequestWithContext(ctx, r.method, r.url, body)
	if err != nil {
		return nil, &Error{Op: r.op, Method: r.method, URL: r.url, Err: err}
	}
	for k, v := range r.header {
		req.Header[k] = v
	}
	req.Header.Set("User-Agent", c.opts.UserAgent)
	if r.token && c.opts.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.opts.Token)
	}
	return req, nil
}

// send does one exchange and reads the whole body (up to maxBodyBytes).
// Any answer comes back as a response; only network failures are errors.
func (c *Client) send(ctx context.Context, r *request) (*http.Response, []byte, error) {
	req, err := c.newRequest(ctx, r)
	if err != nil {
		return nil, nil, err
	}
	hc := r.hc
	if hc == nil {
		hc = c.hc
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, nil, c.networkError(ctx, r, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBodyBytes+1))
	if err != nil {
		return nil, nil, c.networkError(ctx, r, err)
	}
	if len(body) > maxBodyBytes {
		return nil, nil, &Error{Op: r.op, Method: r.method, URL: r.url, StatusCode: resp.StatusCode,
			Err: fmt.Errorf("the answer is larger than %d bytes", maxBodyBytes)}
	}
	return resp, body, nil
}

// networkError wraps a failure to get an answer. A cancelled or expired
// context is returned as it is (wrapped), and is not transient.
func (c *Client) networkError(ctx context.Context, r *request, err error) error {
	e := &Error{Op: r.op, Method: r.method, URL: r.url, Err: err}
	switch cerr := ctx.Err(); {
	case cerr == nil:
		e.network = true
	case !errors.Is(err, cerr):
		e.Err = errors.Join(cerr, err)
	}
	return e
}

// httpError builds the *Error of an unexpected answer.
func (c *Client) httpError(r *request, resp *http.Response, body []byte) *Error {
	e := &Error{Op: r.op, Method: r.method, URL: r.url, StatusCode: resp.StatusCode}
	if resp.StatusCode < 400 {
		e.Err = ErrUnexpectedStatus
	}
	e.RetryAfter, _ = parseRetryAfter(resp.Header.Get("Retry-After"), c.opts.Now())
	var oo fhirbulk.OperationOutcome
	if json.Unmarshal(body, &oo) == nil && oo.ResourceType == "OperationOutcome" {
		e.Outcome = &oo
	} else {
		e.Body = snippet(body)
	}
	return e
}

func snippet(body []byte) string {
	s := strings.TrimSpace(string(body))
	if len(s) > 512 {
		s = s[:512] + "…"
	}
	return s
}

// parseRetryAfter reads a Retry-After header: delay-seconds or an
// HTTP-date. ok is false when the header is absent or unreadable. A date in
// the past gives 0.
func parseRetryAfter(h string, now time.Time) (d time.Duration, ok bool) {
	h = strings.TrimSpace(h)
	if h == "" {
		return 0, false
	}
	if secs, err := strconv.ParseInt(h, 10, 64); err == nil {
		if secs < 0 {
			return 0, false
		}
		return time.Duration(min(secs, 1<<31)) * time.Second, true
	}
	if t, err := http.ParseTime(h); err == nil {
		return max(t.Sub(now), 0), true
	}
	return 0, false
}

// pollInterval is the wait before the next poll: the server's Retry-After
// within [MinPollInterval, MaxPollInterval], or without one
// MinPollInterval doubled n times, at most MaxPollInterval.
func (c *Client) pollInterval(retryAfter time.Duration, n int) time.Duration {
	if retryAfter > 0 {
		return min(max(retryAfter, c.opts.MinPollInterval), c.opts.MaxPollInterval)
	}
	return growth(c.opts.MinPollInterval, c.opts.MaxPollInterval, n)
}

// backoff is the wait before retry n+1 after a failure: exponential from
// RetryMinBackoff, at most RetryMaxBackoff, jittered; at least the
// server's Retry-After (at most MaxPollInterval).
func (c *Client) backoff(n int, retryAfter time.Duration) time.Duration {
	d := growth(c.opts.RetryMinBackoff, c.opts.RetryMaxBackoff, n)
	if d > 1 {
		d = d/2 + rand.N(d/2+1)
	}
	return max(d, min(retryAfter, c.opts.MaxPollInterval))
}

func growth(lo, hi time.Duration, n int) time.Duration {
	d := lo
	for i := 0; i < n && d < hi; i++ {
		d *= 2
	}
	return min(d, hi)
}

// sleep waits d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// exchange sends r until it gets an answer whose status accept takes,
// retrying transient failures (see Error.Transient) up to MaxRetries times.
// Network failures are retried only when retryNetwork says so: a POST
// kick-off that may have reached the server is not repeated.
func (c *Client) exchange(ctx context.Context, r *request, accept func(status int) bool, retryNetwork func(error) bool) (*http.Response, []byte, error) {
	for attempt := 0; ; attempt++ {
		resp, body, err := c.send(ctx, r)
		var retryAfter time.Duration
		if err == nil {
			if accept(resp.StatusCode) {
				return resp, body, nil
			}
			e := c.httpError(r, resp, body)
			if !e.Transient() {
				return nil, nil, e
			}
			err, retryAfter = e, e.RetryAfter
		} else if ctx.Err() != nil || !retryNetwork(err) {
			return nil, nil, err
		}
		if attempt >= c.opts.MaxRetries {
			return nil, nil, err
		}
		d := c.backoff(attempt, retryAfter)
		c.debug("bulkexport client: retrying", "op", r.op, "url", r.url, "err", err, "wait", d)
		if serr := sleep(ctx, d); serr != nil {
			return nil, nil, errors.Join(serr, err)
		}
	}
}

func anyNetworkError(error) bool { return true }

// isDialError: the connection was never made, so the server saw nothing.
func isDialError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

func (c *Client) debug(msg string, args ...any) {
	if c.log != nil {
		c.log.Debug(msg, args...)
	}
}

// resolve makes ref absolute against base (servers should send absolute
// URLs; relative ones are tolerated).
func resolve(base, ref string) (string, error) {
	b, err := url.Parse(base)
	if err != nil {
		return "", err
	}
	r, err := url.Parse(ref)
	if err != nil {
		return "", err
	}
	return b.ResolveReference(r).String(), nil
}
