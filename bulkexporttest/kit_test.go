package bulkexporttest_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

func patients(n int) *bulkexporttest.Source {
	src := bulkexporttest.NewSource()
	for i := range n {
		src.MustAdd(map[string]any{"resourceType": "Patient", "id": string(rune('a' + i)), "gender": "female"},
			map[string]any{"resourceType": "Observation", "id": "o-" + string(rune('a'+i)), "subject": map[string]string{"reference": "Patient/" + string(rune('a'+i))}})
	}
	return src
}

func TestFailOn(t *testing.T) {
	t.Parallel()
	src := patients(5)
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src})
	require.Same(t, src, srv.Source)

	src.FailOn("Observation", 2, &bulkexport.Error{Status: http.StatusForbidden, Code: fhirbulk.IssueForbidden, Message: "consent withdrawn"})
	code, body := srv.Wait(t, srv.Kickoff(t, "/$export"))
	require.Equal(t, http.StatusForbidden, code)
	require.Contains(t, string(body), "consent withdrawn")

	// Other types are not affected; afterN 0 fails even with nothing to write.
	res := srv.Export(t, "/$export?_type=Patient")
	require.Len(t, res.IDs("Patient"), 5)
	src.FailOn("", 0, errors.New("down"))
	src.FailOn("Observation", 0, nil)
	code, _ = srv.Wait(t, srv.Kickoff(t, "/$export?_type=Patient"))
	require.Equal(t, http.StatusInternalServerError, code)

	src.FailOn("", 0, nil)
	res = srv.Export(t, "/$export")
	require.Len(t, res.IDs("Observation"), 5)
}

func TestPauseAndCancel(t *testing.T) {
	t.Parallel()
	src := patients(6)
	pause := src.Pause("Observation", 3)
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src})
	statusURL := srv.Kickoff(t, "/$export")
	<-pause.Reached()

	resp, _ := srv.Status(t, statusURL)
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "held while paused")
	require.Equal(t, bulkexport.StateRunning, srv.Job(t, statusURL).State)

	srv.Cancel(t, statusURL)
	require.Eventually(t, func() bool {
		return srv.Job(t, statusURL).State == bulkexport.StateCancelled
	}, 10*time.Second, 5*time.Millisecond)
	resp, _ = srv.Status(t, statusURL)
	require.Equal(t, http.StatusNotFound, resp.StatusCode)

	// A pause stops one export only; Release lets later ones pass anyway.
	pause.Release()
	res := srv.Export(t, "/$export")
	require.Len(t, res.IDs("Observation"), 6)
}

func TestPauseRelease(t *testing.T) {
	t.Parallel()
	src := patients(4)
	pause := src.Pause("", 2)
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src, Worker: bulkexport.WorkerOptions{TypeConcurrency: 1}})
	statusURL := srv.Kickoff(t, "/$export?_type=Patient")
	<-pause.Reached()
	pause.Release()
	res := srv.Collect(t, statusURL)
	require.Equal(t, []string{"a", "b", "c", "d"}, res.IDs("Patient"))
}

func TestGroupResourceMembership(t *testing.T) {
	t.Parallel()
	src := patients(4).MustAdd(`{"resourceType":"Group","id":"g","type":"person","actual":true,
		"member":[{"entity":{"reference":"Patient/b"}},{"entity":{"reference":"Patient/d"}}]}`)
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src})
	res := srv.Export(t, "/Group/g/$export")
	require.Equal(t, []string{"b", "d"}, res.IDs("Patient"))
	require.Equal(t, []string{"o-b", "o-d"}, res.IDs("Observation"))
	require.NotContains(t, res.Output, "Group", "Group resources are in no compartment")

	res = srv.Export(t, "/$export?_type=Group")
	require.Equal(t, "g", res.Resources("Group")[0]["id"])
	require.Len(t, res.Resources("Group")[0]["member"], 2)
}

// hostSource is a Source that is not the fake.
type hostSource struct{}

func (hostSource) ResourceTypes(context.Context, fhirbulk.Level) ([]string, error) {
	return []string{"Patient"}, nil
}

func (hostSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	return w.Write([]byte(`{"resourceType":"Patient","id":"host-1"}`))
}

func TestNewServerWithHostSource(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: hostSource{}})
	require.Nil(t, srv.Source)
	res := srv.Export(t, "/$export")
	require.Equal(t, []string{"host-1"}, res.IDs("Patient"))

	var nilFake *bulkexporttest.Source
	srv = bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: nilFake})
	require.NotNil(t, srv.Source, "a nil *Source means the default")
}

func TestStartServerAndExportContext(t *testing.T) {
	t.Parallel()
	srv, err := bulkexporttest.StartServer(&bulkexporttest.ServerOptions{Source: patients(3)})
	require.NoError(t, err)
	res, err := srv.ExportContext(context.Background(), "/Patient/$export")
	require.NoError(t, err)
	require.Equal(t, []string{"a", "b", "c"}, res.IDs("Patient"))

	_, err = srv.ExportContext(context.Background(), "/$export?_type=Nope")
	require.ErrorContains(t, err, "400")

	root := srv.Storage.Root()
	srv.Close()
	srv.Close()
	_, err = os.Stat(root)
	require.ErrorIs(t, err, os.ErrNotExist, "Close removes the files")
}

// TestExporterAgainstHostWiring points an Exporter at a host's own mux: the
// handler under /api/fhir behind the host's authentication.
func TestExporterAgainstHostWiring(t *testing.T) {
	t.Parallel()
	src := patients(2)
	store := bulkexport.NewMemoryStore()
	storage, err := bulkexport.NewDirStorage(t.TempDir())
	require.NoError(t, err)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	w, err := bulkexport.NewWorker(store, src, storage, &bulkexport.WorkerOptions{PollInterval: 10 * time.Millisecond, Logger: quiet})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done) })

	// The handler needs the server's URL, which Serve knows before the
	// server starts.
	e := bulkexporttest.Serve(t, "/api/fhir", func(base string) http.Handler {
		h, err := bulkexport.NewHandler(store, &bulkexport.Options{
			BaseURL: base, Types: src, Storage: storage, OnQueued: func(string) { w.Notify() }, Logger: quiet,
			Authenticate: func(r *http.Request) (string, error) {
				if r.Header.Get("X-Api-Key") != "k1" {
					return "", bulkexport.ErrUnauthorized
				}
				return "client-1", nil
			},
		})
		require.NoError(t, err)
		mux := http.NewServeMux()
		mux.Handle("/api/fhir/", h)
		return mux
	})
	require.True(t, strings.HasSuffix(e.BaseURL, "/api/fhir"), e.BaseURL)
	e.Header.Set("X-Api-Key", "k1")
	res := e.Export(t, "/Patient/$export?_type=Patient")
	require.Equal(t, []string{"a", "b"}, res.IDs("Patient"))
	require.Equal(t, "client-1", mustJob(t, store, res.StatusURL).Owner)

	anon := &bulkexporttest.Exporter{BaseURL: e.BaseURL, HTTPClient: e.HTTPClient}
	resp, _ := anon.Status(t, res.StatusURL)
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)

	pause := src.Pause("", 0)
	statusURL := e.Kickoff(t, "/$export")
	<-pause.Reached()
	e.Cancel(t, statusURL)
}

// TestSendKickoffHeaders checks that Send makes a request to $export a
// kick-off (Prefer, Accept, Content-Type) unless the test removes or
// replaces those headers, and leaves other requests alone.
func TestSendKickoffHeaders(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: patients(1), NoWorker: true})

	resp, body := srv.Send(t, http.MethodGet, "/Patient/$export", nil)
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)

	resp, body = srv.Send(t, http.MethodPost, "/$export", []byte(`{"resourceType":"Parameters"}`))
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)

	resp, body = srv.Send(t, http.MethodGet, "/Patient/$export", nil, http.Header{"Prefer": nil})
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	require.Contains(t, string(body), "respond-async")

	resp, _ = srv.Send(t, http.MethodGet, "/Patient/$export", nil, http.Header{"Accept": {"text/html"}})
	require.Equal(t, http.StatusNotAcceptable, resp.StatusCode)

	// A status URL is no kick-off: no Prefer, and a full URL is kept.
	statusURL := srv.Kickoff(t, "/$export")
	resp, _ = srv.Send(t, http.MethodGet, statusURL, nil)
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
}

func mustJob(t *testing.T, store bulkexport.JobStore, statusURL string) *bulkexport.Job {
	id, err := bulkexporttest.JobID(statusURL)
	require.NoError(t, err)
	j, err := store.Get(context.Background(), id)
	require.NoError(t, err)
	return j
}

func TestJobID(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"http://h/fhir/$export-poll-status?_jobId=abc": "abc",
		"http://h/fhir/$export-poll-status/abc":        "abc",
		"http://h/fhir/$export-poll-status/abc/x":      "",
		"http://h/fhir/$export-poll-status":            "",
		"http://h/fhir/$export-poll-status/":           "",
	} {
		got, err := bulkexporttest.JobID(in)
		if want == "" {
			require.Error(t, err, in)
		} else {
			require.NoError(t, err, in)
			require.Equal(t, want, got, in)
		}
	}
}

func TestRecorder(t *testing.T) {
	t.Parallel()
	src := patients(3)
	var rec bulkexporttest.Recorder
	require.NoError(t, src.Export(context.Background(), &bulkexport.Query{Level: fhirbulk.LevelSystem}, "Patient", &rec))
	require.Equal(t, []string{"a", "b", "c"}, rec.IDs())
	require.Equal(t, []bulkexporttest.Checkpoint{{"1", 1}, {"2", 2}, {"3", 3}}, rec.Checkpoints)

	stop := errors.New("stop")
	rec = bulkexporttest.Recorder{OnWrite: func(n int) error {
		if n == 1 {
			return stop
		}
		return nil
	}}
	err := src.Export(context.Background(), &bulkexport.Query{Level: fhirbulk.LevelSystem, Cursor: "1"}, "Patient", &rec)
	require.ErrorIs(t, err, stop)
	require.Equal(t, []string{"b"}, rec.IDs())
	require.Equal(t, 2, rec.Writes())
}

func TestClock(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := bulkexporttest.NewClock(t0)
	c.Advance(time.Hour)
	require.Equal(t, t0.Add(time.Hour), c.Now())
	c.Set(t0)
	require.Equal(t, t0, c.Now())
}

// TestReadmeGroupExport is the README's "Testing your integration" example.
func TestReadmeGroupExport(t *testing.T) {
	src := bulkexporttest.NewSource().MustAdd( // or your own Source
		`{"resourceType":"Patient","id":"p1","meta":{"lastUpdated":"2025-01-01T00:00:00Z"}}`,
		`{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"}}`,
		`{"resourceType":"Group","id":"g1","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/p1"}}]}`,
	)
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src})

	res := srv.Export(t, "/Group/g1/$export?_type=Patient,Observation") // kick off, poll, download every file
	if got := res.IDs("Observation"); !slices.Equal(got, []string{"o1"}) {
		t.Errorf("Observations %v, want [o1]", got)
	}
	if p := res.Resources("Patient")[0]; p["id"] != "p1" {
		t.Errorf("Patient %v", p)
	}
}
