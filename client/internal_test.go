package client

import (
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

func TestParseRetryAfter(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for h, want := range map[string]time.Duration{
		"0":                                0,
		"1":                                time.Second,
		" 120 ":                            2 * time.Minute,
		"Thu, 01 Jan 2026 00:01:00 GMT":    time.Minute,
		"Wed, 31 Dec 2025 23:00:00 GMT":    0,                // past
		"Thursday, 01-Jan-26 00:00:30 GMT": 30 * time.Second, // RFC 850
		"99999999999999":                   (1 << 31) * time.Second,
	} {
		d, ok := parseRetryAfter(h, now)
		require.True(t, ok, h)
		require.Equal(t, want, d, h)
	}
	for _, h := range []string{"", "soon", "-5", "1.5"} {
		_, ok := parseRetryAfter(h, now)
		require.False(t, ok, h)
	}
}

func TestIntervals(t *testing.T) {
	t.Parallel()
	c, err := New("", &Options{MinPollInterval: 10 * time.Millisecond, MaxPollInterval: 80 * time.Millisecond,
		RetryMinBackoff: 4 * time.Millisecond, RetryMaxBackoff: 16 * time.Millisecond})
	require.NoError(t, err)
	require.Equal(t, 10*time.Millisecond, c.pollInterval(0, 0))
	require.Equal(t, 40*time.Millisecond, c.pollInterval(0, 2))
	require.Equal(t, 80*time.Millisecond, c.pollInterval(0, 50))
	require.Equal(t, 10*time.Millisecond, c.pollInterval(time.Millisecond, 0))
	require.Equal(t, 30*time.Millisecond, c.pollInterval(30*time.Millisecond, 0))
	require.Equal(t, 80*time.Millisecond, c.pollInterval(2*time.Minute, 0))
	for n := 0; n < 10; n++ {
		d := c.backoff(n, 0)
		step := growth(4*time.Millisecond, 16*time.Millisecond, n)
		require.GreaterOrEqual(t, d, step/2)
		require.LessOrEqual(t, d, step)
		require.Equal(t, 80*time.Millisecond, c.backoff(n, time.Hour), "Retry-After is capped by MaxPollInterval")
	}

	d, err := New("", nil)
	require.NoError(t, err)
	require.Equal(t, DefaultMinPollInterval, d.opts.MinPollInterval)
	require.Equal(t, DefaultMaxPollInterval, d.opts.MaxPollInterval)
	require.Equal(t, DefaultMaxRetries, d.opts.MaxRetries)
	require.Equal(t, DefaultParallel, d.opts.Parallel)
	n, err := New("", &Options{MaxRetries: -1})
	require.NoError(t, err)
	require.Zero(t, n.opts.MaxRetries)
}

func TestLineCounter(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]int64{
		"":                  0,
		"\n":                0,
		"{}":                1,
		"{}\n":              1,
		"{}\n{}":            2,
		"{}\r\n{}\r\n":      2,
		"{}\n\n  \n{}\n":    2,
		" \t\r\n":           0,
		"{\"a\":1}\n{\"b\"": 2,
	} {
		// in one piece and byte by byte
		var lc, bytewise lineCounter
		lc.Write([]byte(in))
		for i := 0; i < len(in); i++ {
			bytewise.Write([]byte{in[i]})
		}
		require.Equal(t, want, lc.Total(), "%q", in)
		require.Equal(t, want, bytewise.Total(), "%q bytewise", in)
	}
}

func TestContentRange(t *testing.T) {
	t.Parallel()
	s, total, ok := parseContentRange("bytes 100-199/58737")
	require.True(t, ok)
	require.EqualValues(t, 100, s)
	require.EqualValues(t, 58737, total)
	s, total, ok = parseContentRange("bytes 5-9/*")
	require.True(t, ok)
	require.EqualValues(t, 5, s)
	require.EqualValues(t, -1, total)
	for _, h := range []string{"", "bytes */10", "items 1-2/3", "bytes x-1/2", "bytes 1-2/x"} {
		_, _, ok := parseContentRange(h)
		require.False(t, ok, h)
	}
	n, ok := parseUnsatisfiedRange("bytes */1234")
	require.True(t, ok)
	require.EqualValues(t, 1234, n)
	_, ok = parseUnsatisfiedRange("bytes 0-1/2")
	require.False(t, ok)
}

func TestFiles(t *testing.T) {
	t.Parallel()
	m := &fhirbulk.Manifest{
		Output: []fhirbulk.ManifestFile{
			{Type: "Patient", URL: "https://x/files/Patient.000001.ndjson"},
			{Type: "Patient", URL: "https://y/other/Patient.000001.ndjson?sig=1"},
			{Type: "Observation", URL: "https://s3/bucket/abc%20def"},
			{Type: "Observation", URL: "https://x/"},
			{Type: "Binary", URL: "https://x/manifest.json"},
			{Type: "Patient", URL: "https://x/..%2F..%2Fetc%2Fpasswd"},
		},
		Deleted: []fhirbulk.ManifestFile{{Type: "Bundle", URL: "https://x/files/patient.000001.ndjson"}},
		Error:   []fhirbulk.ManifestFile{{Type: "OperationOutcome", URL: "https://x/files/OperationOutcome.000001.ndjson"}},
	}
	var names, kinds []string
	for _, f := range Files(m, "/out") {
		require.Equal(t, "/out", filepath.Dir(f.Path))
		names = append(names, filepath.Base(f.Path))
		kinds = append(kinds, f.Kind)
	}
	require.Equal(t, []string{
		"Patient.000001.ndjson", "Patient.000001-2.ndjson", "abc_def.ndjson", "Observation.000004.ndjson",
		"manifest.json.ndjson", "passwd.ndjson", "patient.000001-3.ndjson", "OperationOutcome.000001.ndjson",
	}, names)
	require.Equal(t, []string{"output", "output", "output", "output", "output", "output", "deleted", "error"}, kinds)
}

func TestRedirectsStripAuthorization(t *testing.T) {
	t.Parallel()
	u := func(s string) *url.URL { p, _ := url.Parse(s); return p }
	hc := safeRedirects(&http.Client{})
	for _, tc := range []struct {
		chain []string
		keep  bool
	}{
		{[]string{"https://a/x", "https://a/y"}, true},
		{[]string{"https://a/x", "https://a:443/y"}, true},
		{[]string{"https://a/x", "https://b/y"}, false},
		{[]string{"https://a/x", "https://sub.a/y"}, false},
		{[]string{"https://a/x", "http://a/y"}, false},
		{[]string{"https://a/x", "https://a:8443/y"}, false},
		{[]string{"https://a/x", "https://b/y", "https://a/z"}, false},
	} {
		var via []*http.Request
		for _, s := range tc.chain[:len(tc.chain)-1] {
			via = append(via, &http.Request{URL: u(s)})
		}
		req := &http.Request{URL: u(tc.chain[len(tc.chain)-1]), Header: http.Header{"Authorization": {"Bearer x"}}}
		require.NoError(t, hc.CheckRedirect(req, via))
		require.Equal(t, tc.keep, req.Header.Get("Authorization") != "", strings.Join(tc.chain, " → "))
	}

	// The caller's CheckRedirect still runs; without one, 10 hops at most.
	calls := 0
	own := safeRedirects(&http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { calls++; return http.ErrUseLastResponse }})
	require.ErrorIs(t, own.CheckRedirect(&http.Request{URL: u("https://a"), Header: http.Header{}}, []*http.Request{{URL: u("https://a")}}), http.ErrUseLastResponse)
	require.Equal(t, 1, calls)
	via := make([]*http.Request, 10)
	for i := range via {
		via[i] = &http.Request{URL: u("https://a")}
	}
	require.Error(t, hc.CheckRedirect(&http.Request{URL: u("https://a"), Header: http.Header{}}, via))

	// The copy leaves the caller's client alone.
	orig := &http.Client{}
	_ = safeRedirects(orig)
	require.Nil(t, orig.CheckRedirect)
}

func TestErrorText(t *testing.T) {
	t.Parallel()
	e := &Error{Op: "status", URL: "http://x/s", StatusCode: 404,
		Outcome: fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueDeleted, "the export job was cancelled")}
	require.Equal(t, "status http://x/s: 404 Not Found: error deleted: the export job was cancelled", e.Error())
	require.Equal(t, fhirbulk.IssueDeleted, e.Issue().Code)
	e = &Error{Op: "download", URL: "http://x/f", StatusCode: 502, Body: "bad gateway"}
	require.Equal(t, "download http://x/f: 502 Bad Gateway: bad gateway", e.Error())
	require.Nil(t, e.Issue())
	require.True(t, e.Transient())

	multi := &fhirbulk.OperationOutcome{ResourceType: "OperationOutcome", Issue: []fhirbulk.Issue{
		{Severity: fhirbulk.SeverityWarning, Code: fhirbulk.IssueInvalid},
		{Severity: fhirbulk.SeverityError, Code: fhirbulk.IssueTimeout},
	}}
	e = &Error{StatusCode: 500, Outcome: multi}
	require.True(t, e.Transient(), "only the error issues decide")
	require.Equal(t, fhirbulk.IssueTimeout, e.Issue().Code)
	multi.Issue = append(multi.Issue, fhirbulk.Issue{Severity: fhirbulk.SeverityFatal, Code: fhirbulk.IssueProcessing})
	require.False(t, e.Transient())
	e = &Error{StatusCode: 503, Outcome: &fhirbulk.OperationOutcome{Issue: []fhirbulk.Issue{{Severity: fhirbulk.SeverityInformation, Code: fhirbulk.IssueThrottled}}}}
	require.True(t, e.Transient())
	require.False(t, (&Error{StatusCode: 400, Outcome: e.Outcome}).Transient())
	require.True(t, (&Error{StatusCode: 429}).Transient())
	require.False(t, (&Error{}).Transient())
}
