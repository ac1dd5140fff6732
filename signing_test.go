package bulkexport_test

import (
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

func TestSignedFileURLs(t *testing.T) {
	t.Parallel()
	oldKey := bulkexport.SigningKey{ID: "k1", Secret: []byte(strings.Repeat("a", 32))}
	newKey := bulkexport.SigningKey{ID: "k2", Secret: []byte(strings.Repeat("b", 32))}
	clock := bulkexporttest.NewClock(time.Now())
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 3),
		Clock:  clock,
		Handler: bulkexport.Options{
			Authenticate:    tokenAuth(map[string]string{"tok": "alice"}),
			SigningKeys:     []bulkexport.SigningKey{oldKey},
			SignedURLExpiry: time.Minute,
		},
	})
	srv.Header.Set("Authorization", "Bearer tok")
	res := srv.Export(t, "/$export?_type=Patient,Condition")
	require.False(t, res.Manifest.RequiresAccessToken, "signed URLs are capability URLs")
	require.Len(t, res.Manifest.Output, 2)
	patientURL, conditionURL := res.Manifest.Output[1].URL, res.Manifest.Output[0].URL
	require.Contains(t, patientURL, "sig=")

	anon := &http.Client{}
	get := func(u string) int {
		resp, err := anon.Get(u)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	require.Equal(t, http.StatusOK, get(patientURL), "no token needed")

	// Tampering: another file with this file's signature, a changed
	// expiry, a changed signature, an unknown key, extra parameters.
	pu, _ := url.Parse(patientURL)
	cu, _ := url.Parse(conditionURL)
	swapped := *cu
	swapped.RawQuery = pu.RawQuery
	require.Equal(t, http.StatusForbidden, get(swapped.String()), "a signature is for one file")
	for _, mutate := range []func(url.Values){
		func(q url.Values) { q.Set("exp", "9999999999") },
		func(q url.Values) {
			// A different first character, whatever the signature's is.
			sig := q.Get("sig")
			first := "A"
			if sig[0] == 'A' {
				first = "B"
			}
			q.Set("sig", first+sig[1:])
		},
		func(q url.Values) { q.Set("kid", "nope") },
		func(q url.Values) { q.Add("x", "1") },
		func(q url.Values) { q.Del("kid") },
	} {
		u := *pu
		q := u.Query()
		mutate(q)
		u.RawQuery = q.Encode()
		require.Equal(t, http.StatusForbidden, get(u.String()), u.RawQuery)
	}
	resp, body := srv.Send(t, http.MethodGet, strings.Split(patientURL, "?")[0], nil)
	require.Equal(t, http.StatusOK, resp.StatusCode, "the token still works without a signature: %s", body)

	// Rotation: a handler that signs with the new key still honours URLs
	// signed with the old one, until the old key is dropped.
	rotated, err := bulkexport.NewHandler(srv.Store, &bulkexport.Options{
		BaseURL: srv.BaseURL, Storage: srv.Storage, Now: clock.Now,
		Authenticate: tokenAuth(nil), SigningKeys: []bulkexport.SigningKey{newKey, oldKey},
	})
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, newRecorder(rotated, patientURL).Code)
	dropped, err := bulkexport.NewHandler(srv.Store, &bulkexport.Options{
		BaseURL: srv.BaseURL, Storage: srv.Storage, Now: clock.Now,
		Authenticate: tokenAuth(nil), SigningKeys: []bulkexport.SigningKey{newKey},
	})
	require.NoError(t, err)
	require.Equal(t, http.StatusForbidden, newRecorder(dropped, patientURL).Code)

	// Expiry.
	clock.Advance(2 * time.Minute)
	require.Equal(t, http.StatusForbidden, get(patientURL))

	// Bad keys are refused at construction.
	for _, keys := range [][]bulkexport.SigningKey{
		{{ID: "short", Secret: []byte("x")}},
		{{ID: "", Secret: []byte(strings.Repeat("c", 32))}},
		{oldKey, oldKey},
	} {
		_, err := bulkexport.NewHandler(srv.Store, &bulkexport.Options{BaseURL: srv.BaseURL, SigningKeys: keys})
		require.Error(t, err)
	}
}

// TestFileURLQueries: what a file URL's query string does, with and
// without signing. A URL counts as signed when it carries any of exp, kid
// and sig; other parameters of an unsigned URL are ignored (the token
// decides). A signed URL must carry exactly exp, kid and sig, once each,
// valid and unexpired for its file, or it gets 403.
func TestFileURLQueries(t *testing.T) {
	t.Parallel()
	key := bulkexport.SigningKey{ID: "k1", Secret: []byte(strings.Repeat("s", 32))}
	type tc struct {
		name, query string
		token       bool
		status      int
	}
	run := func(t *testing.T, fileURL string, cases []tc) {
		t.Helper()
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				u := fileURL
				if c.query != "-" {
					u += "?" + c.query
				}
				req, err := http.NewRequest(http.MethodGet, u, nil)
				require.NoError(t, err)
				if c.token {
					req.Header.Set("Authorization", "Bearer tok")
				}
				resp, err := http.DefaultClient.Do(req)
				require.NoError(t, err)
				defer resp.Body.Close()
				body, err := io.ReadAll(resp.Body)
				require.NoError(t, err)
				require.Equal(t, c.status, resp.StatusCode, "%s: %s", u, body)
				if c.status == http.StatusOK {
					require.Equal(t, "application/fhir+ndjson", resp.Header.Get("Content-Type"))
					require.Contains(t, string(body), `"resourceType":"Patient"`)
				} else {
					require.Equal(t, "application/fhir+json", resp.Header.Get("Content-Type"))
					require.Contains(t, string(body), `"OperationOutcome"`)
				}
			})
		}
	}

	t.Run("signing off", func(t *testing.T) {
		t.Parallel()
		srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
			Source:  clinicalSource(t, 2),
			Handler: bulkexport.Options{Authenticate: tokenAuth(map[string]string{"tok": "alice"})},
		})
		srv.Header.Set("Authorization", "Bearer tok")
		res := srv.Export(t, "/$export?_type=Patient")
		require.Len(t, res.Manifest.Output, 1)
		fileURL := res.Manifest.Output[0].URL
		require.NotContains(t, fileURL, "?")
		run(t, fileURL, []tc{
			{"no query", "-", true, http.StatusOK},
			{"empty query", "", true, http.StatusOK},
			{"unknown parameter", "foo=1", true, http.StatusOK},
			{"two unknown parameters", "a=b&c=d", true, http.StatusOK},
			{"unknown parameter without value", "foo", true, http.StatusOK},
			{"unknown parameter, no token", "foo=1", false, http.StatusUnauthorized},
			{"no query, no token", "-", false, http.StatusUnauthorized},
			// Without signing keys nothing is signed: exp, kid and sig
			// are unknown parameters like any other, and the token
			// decides.
			{"empty exp", "exp=", true, http.StatusOK},
			{"kid only", "kid=k1", true, http.StatusOK},
			{"whole signature, token", "exp=9999999999&kid=k1&sig=abc", true, http.StatusOK},
			{"sig only, no token", "sig=abc", false, http.StatusUnauthorized},
			{"malformed query", "foo=%zz", true, http.StatusOK},
		})
	})

	t.Run("signing on", func(t *testing.T) {
		t.Parallel()
		clock := bulkexporttest.NewClock(time.Now())
		srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
			Source: clinicalSource(t, 2),
			Clock:  clock,
			Handler: bulkexport.Options{
				Authenticate:    tokenAuth(map[string]string{"tok": "alice"}),
				SigningKeys:     []bulkexport.SigningKey{key},
				SignedURLExpiry: time.Minute,
			},
		})
		srv.Header.Set("Authorization", "Bearer tok")
		res := srv.Export(t, "/$export?_type=Patient")
		require.Len(t, res.Manifest.Output, 1)
		fileURL, signed, ok := strings.Cut(res.Manifest.Output[0].URL, "?")
		require.True(t, ok, res.Manifest.Output[0].URL)
		q, err := url.ParseQuery(signed)
		require.NoError(t, err)
		with := func(edit func(url.Values)) string {
			c := url.Values{}
			for k, v := range q {
				c[k] = append([]string(nil), v...)
			}
			edit(c)
			return c.Encode()
		}
		sig := q.Get("sig")
		tampered := string(rune('A'+(sig[0]-'A'+1)%26)) + sig[1:]
		run(t, fileURL, []tc{
			{"signed, no token", signed, false, http.StatusOK},
			{"signed, with token", signed, true, http.StatusOK},
			{"parameters reordered", "sig=" + url.QueryEscape(sig) + "&kid=" + q.Get("kid") + "&exp=" + q.Get("exp"), false, http.StatusOK},
			{"unsigned, token", "-", true, http.StatusOK},
			{"unsigned, unknown parameter, token", "foo=1", true, http.StatusOK},
			{"unsigned, unknown parameter, no token", "foo=1", false, http.StatusUnauthorized},
			{"signed plus unknown parameter", with(func(v url.Values) { v.Set("foo", "1") }), false, http.StatusForbidden},
			{"tampered sig", with(func(v url.Values) { v.Set("sig", tampered) }), false, http.StatusForbidden},
			{"tampered sig, with token", with(func(v url.Values) { v.Set("sig", tampered) }), true, http.StatusForbidden},
			{"sig twice", with(func(v url.Values) { v.Add("sig", sig) }), false, http.StatusForbidden},
			{"missing sig", with(func(v url.Values) { v.Del("sig") }), false, http.StatusForbidden},
			{"missing sig, with token", with(func(v url.Values) { v.Del("sig") }), true, http.StatusForbidden},
			{"empty sig", with(func(v url.Values) { v.Set("sig", "") }), false, http.StatusForbidden},
			{"missing exp", with(func(v url.Values) { v.Del("exp") }), false, http.StatusForbidden},
			{"later exp", with(func(v url.Values) { v.Set("exp", "9999999999") }), false, http.StatusForbidden},
			{"unknown kid", with(func(v url.Values) { v.Set("kid", "k2") }), false, http.StatusForbidden},
		})
		clock.Advance(2 * time.Minute)
		run(t, fileURL, []tc{
			{"expired, no token", signed, false, http.StatusForbidden},
			{"expired, with token", signed, true, http.StatusForbidden},
			{"expired URL's file, unsigned, token", "-", true, http.StatusOK},
		})
	})
}
