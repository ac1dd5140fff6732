package bulkexport_test

import (
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
		func(q url.Values) { q.Set("sig", "A"+q.Get("sig")[1:]) },
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
