package client_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/client"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// fastOptions keeps every wait in the millisecond range.
func fastOptions() *client.Options {
	return &client.Options{
		MinPollInterval: time.Millisecond,
		MaxPollInterval: 5 * time.Millisecond,
		RetryMinBackoff: time.Millisecond,
		RetryMaxBackoff: 2 * time.Millisecond,
	}
}

// dataset: 6 patients (p1..p6), one or two Observations each, one
// Practitioner (not in any compartment); Groups "even" and "odd".
func dataset() *bulkexporttest.Source {
	src := bulkexporttest.NewSource()
	for i := 1; i <= 6; i++ {
		gender := "male"
		if i%2 == 0 {
			gender = "female"
		}
		src.MustAdd(fmt.Sprintf(`{"resourceType":"Patient","id":"p%d","gender":%q,"meta":{"lastUpdated":"2025-0%d-01T00:00:00Z"}}`, i, gender, i))
		for j := 1; j <= 1+i%2; j++ {
			src.MustAdd(fmt.Sprintf(`{"resourceType":"Observation","id":"o%d-%d","status":"final","subject":{"reference":"Patient/p%d"}}`, i, j, i))
		}
	}
	src.MustAdd(`{"resourceType":"Practitioner","id":"dr1"}`)
	src.AddGroup("even", "p2", "p4", "p6").AddGroup("odd", "p1", "p3", "p5")
	return src
}

// newServer starts bulkexporttest.NewServer with its logs discarded.
func newServer(t *testing.T, o *bulkexporttest.ServerOptions) *bulkexporttest.Server {
	t.Helper()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	o.Handler.Logger, o.Worker.Logger = quiet, quiet
	return bulkexporttest.NewServer(t, o)
}

func newClient(t *testing.T, base string, mod func(*client.Options)) *client.Client {
	t.Helper()
	o := fastOptions()
	if mod != nil {
		mod(o)
	}
	c, err := client.New(base, o)
	require.NoError(t, err)
	return c
}

// export runs req to completion and downloads the files; it returns the
// ids per type read back from the files.
func export(t *testing.T, c *client.Client, req *client.KickoffRequest) (*client.Status, []client.File, map[string][]string) {
	t.Helper()
	ctx := context.Background()
	job, err := c.Kickoff(ctx, req)
	require.NoError(t, err)
	require.Contains(t, job.StatusURL, "$export-poll-status")
	st, err := c.Wait(ctx, job.StatusURL, nil)
	require.NoError(t, err)
	require.True(t, st.Complete)
	require.NotNil(t, st.Manifest)
	require.False(t, st.Expires.IsZero())
	dir := t.TempDir()
	files, err := c.Download(ctx, st.Manifest, dir, nil)
	require.NoError(t, err)
	ids := map[string][]string{}
	for _, f := range files {
		require.Equal(t, "output", f.Kind)
		require.Equal(t, dir, filepath.Dir(f.Path))
		b, err := os.ReadFile(f.Path)
		require.NoError(t, err)
		require.EqualValues(t, len(b), f.Bytes)
		lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
		require.EqualValues(t, len(lines), f.Lines)
		require.NotNil(t, f.Count)
		require.Equal(t, *f.Count, f.Lines)
		for _, l := range lines {
			var r struct{ ResourceType, ID string }
			require.NoError(t, json.Unmarshal([]byte(l), &r))
			require.Equal(t, f.Type, r.ResourceType)
			ids[f.Type] = append(ids[f.Type], r.ID)
		}
		_, err = os.Stat(f.Path + ".part")
		require.ErrorIs(t, err, os.ErrNotExist)
	}
	for _, v := range ids {
		sort.Strings(v)
	}
	return st, files, ids
}

func TestExportLevels(t *testing.T) {
	t.Parallel()
	srv := newServer(t, &bulkexporttest.ServerOptions{Source: dataset()})
	c := newClient(t, srv.BaseURL, nil)

	t.Run("system", func(t *testing.T) {
		t.Parallel()
		st, files, ids := export(t, c, &client.KickoffRequest{})
		require.Len(t, files, 3)
		require.Equal(t, []string{"p1", "p2", "p3", "p4", "p5", "p6"}, ids["Patient"])
		require.Len(t, ids["Observation"], 9)
		require.Equal(t, []string{"dr1"}, ids["Practitioner"])
		require.Equal(t, srv.BaseURL+"/$export", st.Manifest.Request)
	})
	t.Run("patient", func(t *testing.T) {
		t.Parallel()
		_, _, ids := export(t, c, &client.KickoffRequest{Level: fhirbulk.LevelPatient, Types: []string{"Patient"}})
		require.Equal(t, map[string][]string{"Patient": {"p1", "p2", "p3", "p4", "p5", "p6"}}, ids)
	})
	t.Run("group", func(t *testing.T) {
		t.Parallel()
		_, _, ids := export(t, c, &client.KickoffRequest{Level: fhirbulk.LevelGroup, GroupID: "even"})
		require.Equal(t, []string{"p2", "p4", "p6"}, ids["Patient"])
		require.Equal(t, []string{"o2-1", "o4-1", "o6-1"}, ids["Observation"])
		require.NotContains(t, ids, "Practitioner")
	})
	t.Run("group POST with patient", func(t *testing.T) {
		t.Parallel()
		st, _, ids := export(t, c, &client.KickoffRequest{
			Level: fhirbulk.LevelGroup, GroupID: "odd",
			Patients: []string{"p3", "Patient/p5"},
			Types:    []string{"Patient,Observation"},
		})
		require.Equal(t, []string{"p3", "p5"}, ids["Patient"])
		require.Equal(t, []string{"o3-1", "o3-2", "o5-1", "o5-2"}, ids["Observation"])
		require.Equal(t, srv.BaseURL+"/Group/odd/$export", st.Manifest.Request, "POST: the request URL has no parameters")
	})
	t.Run("POST with every parameter", func(t *testing.T) {
		t.Parallel()
		_, _, ids := export(t, c, &client.KickoffRequest{
			Method:       http.MethodPost,
			OutputFormat: "application/fhir+ndjson",
			Since:        time.Date(2025, 2, 15, 0, 0, 0, 0, time.UTC),
			Until:        time.Date(2025, 5, 15, 0, 0, 0, 0, time.FixedZone("CEST", 2*3600)),
			Types:        []string{"Patient"},
			Elements:     []string{"Patient.gender"},
			TypeFilters:  []string{"Patient?gender=female"},
		})
		require.Equal(t, map[string][]string{"Patient": {"p4"}}, ids)
	})
	t.Run("GET with since, until, typeFilter and elements", func(t *testing.T) {
		t.Parallel()
		_, files, ids := export(t, c, &client.KickoffRequest{
			Since:       time.Date(2025, 2, 15, 0, 0, 0, 0, time.FixedZone("", -5*3600)),
			Until:       time.Date(2025, 5, 15, 0, 0, 0, 0, time.UTC),
			Types:       []string{"Patient"},
			Elements:    []string{"gender"},
			TypeFilters: []string{"Patient?gender=male"},
		})
		require.Equal(t, map[string][]string{"Patient": {"p3", "p5"}}, ids)
		b, err := os.ReadFile(files[0].Path)
		require.NoError(t, err)
		require.Contains(t, string(b), "SUBSETTED")
	})
	t.Run("lenient", func(t *testing.T) {
		t.Parallel()
		job, err := c.Kickoff(context.Background(), &client.KickoffRequest{
			Types: []string{"Patient"}, IncludeAssociatedData: []string{"_nope"}, Lenient: true,
		})
		require.NoError(t, err)
		require.NotNil(t, job.Outcome)
		require.Len(t, job.Outcome.Issue, 2)
		require.Equal(t, []string{"includeAssociatedData"}, job.Outcome.Issue[1].Expression)
		st, err := c.Wait(context.Background(), job.StatusURL, nil)
		require.NoError(t, err)
		require.Len(t, st.Manifest.Error, 1)
		files, err := c.Download(context.Background(), st.Manifest, t.TempDir(), nil)
		require.NoError(t, err)
		require.Len(t, files, 2)
		require.Equal(t, "error", files[1].Kind)
		require.EqualValues(t, 1, files[1].Lines)
	})
}

func TestKickoffErrors(t *testing.T) {
	t.Parallel()
	srv := newServer(t, &bulkexporttest.ServerOptions{Source: dataset(), NoWorker: true})
	c := newClient(t, srv.BaseURL, nil)
	ctx := context.Background()

	_, err := c.Kickoff(ctx, &client.KickoffRequest{Types: []string{"Nope"}})
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusBadRequest, e.StatusCode)
	require.Equal(t, "kick-off", e.Op)
	require.NotNil(t, e.Outcome)
	require.Equal(t, fhirbulk.IssueNotSupported, e.Issue().Code)
	require.Equal(t, []string{"_type"}, e.Issue().Expression)
	require.False(t, e.Transient())
	require.Contains(t, err.Error(), "400 Bad Request")

	_, err = c.Kickoff(ctx, &client.KickoffRequest{Level: fhirbulk.LevelGroup, GroupID: "missing"})
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusNotFound, e.StatusCode)
	require.Equal(t, fhirbulk.IssueNotFound, e.Issue().Code)

	// Refused before sending.
	for _, req := range []*client.KickoffRequest{
		{Level: fhirbulk.LevelGroup},
		{GroupID: "g"},
		{Level: "world"},
		{Patients: []string{"p1"}},
		{Level: fhirbulk.LevelPatient, Method: http.MethodGet, Patients: []string{"p1"}},
		{Method: "PUT"},
		{TypeFilters: []string{"Patient"}},
		{Since: time.Unix(10, 0), Until: time.Unix(5, 0)},
	} {
		_, err := c.Kickoff(ctx, req)
		require.ErrorIs(t, err, client.ErrInvalidRequest, "%+v", req)
	}
	nobase, err := client.New("", nil)
	require.NoError(t, err)
	_, err = nobase.Kickoff(ctx, nil)
	require.ErrorIs(t, err, client.ErrInvalidRequest)
	_, err = client.New("ftp://x/fhir", nil)
	require.Error(t, err)

	u, err := c.KickoffURL(&client.KickoffRequest{Level: fhirbulk.LevelGroup, GroupID: "a b", Types: []string{"Patient", "Observation"}})
	require.NoError(t, err)
	require.Equal(t, srv.BaseURL+"/Group/a%20b/$export?_type=Patient%2CObservation", u)
}

func TestStatusAndCancel(t *testing.T) {
	t.Parallel()
	src := dataset()
	started := make(chan struct{}, 1)
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		select {
		case started <- struct{}{}:
		default:
		}
		<-ctx.Done() // hold the export until it is cancelled
		return ctx.Err()
	}
	srv := newServer(t, &bulkexporttest.ServerOptions{Source: src})
	c := newClient(t, srv.BaseURL, nil)
	ctx := context.Background()

	job, err := c.Kickoff(ctx, &client.KickoffRequest{Types: []string{"Patient"}})
	require.NoError(t, err)
	<-started
	st, err := c.Status(ctx, job.StatusURL)
	require.NoError(t, err)
	require.False(t, st.Complete)
	require.NotEmpty(t, st.Progress)
	require.GreaterOrEqual(t, st.RetryAfter, time.Second)

	// Wait reports progress and gives up with the context.
	wctx, cancel := context.WithCancel(ctx)
	polls := 0
	_, err = c.Wait(wctx, job.StatusURL, func(s *client.Status) {
		polls++
		if polls == 3 {
			cancel()
		}
	})
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, 3, polls)

	require.NoError(t, c.Cancel(ctx, job.StatusURL))

	_, err = c.Status(ctx, job.StatusURL)
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusNotFound, e.StatusCode)
	require.Equal(t, fhirbulk.IssueDeleted, e.Issue().Code)
	require.False(t, e.Transient())
	_, err = c.Wait(ctx, job.StatusURL, nil)
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusNotFound, e.StatusCode)

	// A second cancel: 404.
	err = c.Cancel(ctx, job.StatusURL)
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusNotFound, e.StatusCode)
	require.Equal(t, "cancel", e.Op)

	// Unknown and malformed status URLs.
	_, err = c.Status(ctx, srv.BaseURL+"/$export-poll-status?_jobId=0123456789abcdef")
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusNotFound, e.StatusCode)
	require.Equal(t, fhirbulk.IssueNotFound, e.Issue().Code)
	_, err = c.Status(ctx, srv.BaseURL+"/$export-poll-status")
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusBadRequest, e.StatusCode)
	require.Equal(t, fhirbulk.IssueRequired, e.Issue().Code)
}

func TestFailedJob(t *testing.T) {
	t.Parallel()
	src := dataset()
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		return errors.New("disk on fire")
	}
	srv := newServer(t, &bulkexporttest.ServerOptions{Source: src})
	c := newClient(t, srv.BaseURL, nil)
	job, err := c.Kickoff(context.Background(), nil)
	require.NoError(t, err)
	_, err = c.Wait(context.Background(), job.StatusURL, nil)
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.GreaterOrEqual(t, e.StatusCode, 500)
	require.NotNil(t, e.Outcome)
	require.False(t, e.Transient(), "a failed job is final: %v", err)
	require.False(t, client.IsTransient(err))
}

func TestTokens(t *testing.T) {
	t.Parallel()
	srv := newServer(t, &bulkexporttest.ServerOptions{
		Source: dataset(),
		Handler: bulkexport.Options{Authenticate: func(r *http.Request) (string, error) {
			if r.Header.Get("Authorization") != "Bearer s3cret" {
				return "", bulkexport.ErrUnauthorized
			}
			return "alice", nil
		}},
	})
	c := newClient(t, srv.BaseURL, func(o *client.Options) { o.Token = "s3cret" })
	st, files, _ := export(t, c, &client.KickoffRequest{Types: []string{"Patient"}})
	require.True(t, st.Manifest.RequiresAccessToken)
	require.Len(t, files, 1)

	bad := newClient(t, srv.BaseURL, func(o *client.Options) { o.Token = "wrong" })
	_, err := bad.Status(context.Background(), st.URL)
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusUnauthorized, e.StatusCode)
	_, err = bad.Download(context.Background(), st.Manifest, t.TempDir(), nil)
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusUnauthorized, e.StatusCode)
	require.Equal(t, "download", e.Op)

	// An http.Client whose Transport adds the credentials.
	viaTransport := newClient(t, srv.BaseURL, func(o *client.Options) {
		o.HTTPClient = &http.Client{Transport: bearerTransport{"s3cret", http.DefaultTransport}}
	})
	export(t, viaTransport, &client.KickoffRequest{Types: []string{"Observation"}})
}

type bearerTransport struct {
	token string
	next  http.RoundTripper
}

func (b bearerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.token)
	return b.next.RoundTrip(r)
}

func TestOpen(t *testing.T) {
	t.Parallel()
	srv := newServer(t, &bulkexporttest.ServerOptions{Source: dataset()})
	c := newClient(t, srv.BaseURL, nil)
	ctx := context.Background()
	job, err := c.Kickoff(ctx, &client.KickoffRequest{Types: []string{"Observation"}})
	require.NoError(t, err)
	st, err := c.Wait(ctx, job.StatusURL, nil)
	require.NoError(t, err)
	require.Len(t, st.Manifest.Output, 1)
	rc, err := c.Open(ctx, st.Manifest.Output[0], false)
	require.NoError(t, err)
	dec := json.NewDecoder(rc)
	n := 0
	for dec.More() {
		var r map[string]any
		require.NoError(t, dec.Decode(&r))
		require.Equal(t, "Observation", r["resourceType"])
		n++
	}
	require.Equal(t, 9, n)
	require.NoError(t, rc.Close())

	// A file the server does not have.
	missing := st.Manifest.Output[0]
	missing.URL += "x"
	_, err = c.Open(ctx, missing, false)
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusNotFound, e.StatusCode)
}

// TestResumeAgainstServer: parts left by an earlier run are continued with
// Range requests (a part holding the whole file gets 416 and is done);
// without counts, complete files are checked with HEAD.
func TestResumeAgainstServer(t *testing.T) {
	t.Parallel()
	srv := newServer(t, &bulkexporttest.ServerOptions{Source: dataset()})
	c := newClient(t, srv.BaseURL, nil)
	ctx := context.Background()
	job, err := c.Kickoff(ctx, nil)
	require.NoError(t, err)
	st, err := c.Wait(ctx, job.StatusURL, nil)
	require.NoError(t, err)
	dir := t.TempDir()
	files, err := c.Download(ctx, st.Manifest, dir, nil)
	require.NoError(t, err)
	want := map[string][]byte{}
	for i, f := range files {
		b, err := os.ReadFile(f.Path)
		require.NoError(t, err)
		want[f.Path] = b
		require.NoError(t, os.Remove(f.Path))
		keep := len(b) // the whole file for the first one
		if i > 0 {
			keep = len(b) / (i + 1)
		}
		require.NoError(t, os.WriteFile(f.Path+".part", b[:keep], 0o644))
	}
	resumed, err := c.Download(ctx, st.Manifest, dir, nil)
	require.NoError(t, err)
	require.Len(t, resumed, len(files))
	for _, f := range resumed {
		require.True(t, f.Resumed, f.Path)
		got, err := os.ReadFile(f.Path)
		require.NoError(t, err)
		require.Equal(t, want[f.Path], got)
	}

	m := *st.Manifest
	m.Output = append([]fhirbulk.ManifestFile(nil), m.Output...)
	for i := range m.Output {
		m.Output[i].Count = nil
	}
	skipped, err := c.Download(ctx, &m, dir, nil)
	require.NoError(t, err)
	for _, f := range skipped {
		require.True(t, f.Skipped, f.Path)
	}
}
