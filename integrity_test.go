package bulkexport_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// The engine's data promise, tested under store faults: a job either
// completes with every listed file present, holding what the manifest
// says, every resource exactly once, or fails with nothing listed.

var errStoreDown = errors.New("teststore: connection refused")

// flakyStore injects failures into a JobStore.
type flakyStore struct {
	bulkexport.JobStore

	// down fails every call.
	down atomic.Bool
	// failEvery fails every n-th Update (0: none).
	failEvery int64
	// landed applies a failing Update before reporting the error, as when
	// a connection drops after the commit.
	landed bool
	// failTerminal fails (landed) the first Update that moves a job to a
	// terminal state.
	failTerminal atomic.Bool
	// failNext fails that many Updates from now on, one after another.
	failNext atomic.Int64

	updates atomic.Int64
	failed  atomic.Int64
}

func (s *flakyStore) Update(ctx context.Context, j *bulkexport.Job) error {
	if s.down.Load() {
		s.failed.Add(1)
		return errStoreDown
	}
	if j.State.Terminal() && s.failTerminal.CompareAndSwap(true, false) {
		s.failed.Add(1)
		if err := s.JobStore.Update(ctx, j.Clone()); err != nil {
			return err
		}
		return errStoreDown
	}
	if s.failNext.Add(-1) >= 0 {
		s.failed.Add(1)
		return errStoreDown
	}
	s.failNext.Store(0)
	n := s.updates.Add(1)
	if s.failEvery == 0 || n%s.failEvery != 0 {
		return s.JobStore.Update(ctx, j)
	}
	s.failed.Add(1)
	if s.landed {
		c := j.Clone()
		if err := s.JobStore.Update(ctx, c); err != nil {
			return err
		}
	}
	return errStoreDown
}

func (s *flakyStore) Get(ctx context.Context, id string) (*bulkexport.Job, error) {
	if s.down.Load() {
		return nil, errStoreDown
	}
	return s.JobStore.Get(ctx, id)
}

func (s *flakyStore) Claim(ctx context.Context, p bulkexport.ClaimParams) (*bulkexport.Job, error) {
	if s.down.Load() {
		return nil, errStoreDown
	}
	return s.JobStore.Claim(ctx, p)
}

func (s *flakyStore) List(ctx context.Context, f bulkexport.Filter) ([]*bulkexport.Job, error) {
	if s.down.Load() {
		return nil, errStoreDown
	}
	return s.JobStore.List(ctx, f)
}

// requireExactlyOnce checks that the export holds each of want's ids once.
func requireExactlyOnce(t *testing.T, res *bulkexporttest.Result, typ string, want int) {
	t.Helper()
	ids := res.IDs(typ)
	require.Len(t, ids, want, "%s resources", typ)
	slices.Sort(ids)
	require.Len(t, slices.Compact(ids), want, "every %s exactly once", typ)
}

// TestStoreErrorsRetried: failed checkpoint and heartbeat updates, lost or
// landed, are retried within the lease; the job completes with everything.
func TestStoreErrorsRetried(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		landed bool
	}{
		{"lost", false},  // the update never reached the store
		{"landed", true}, // it did, but its answer was lost
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src := clinicalSource(t, 60)
			store := &flakyStore{JobStore: bulkexport.NewMemoryStore(), failEvery: 3, landed: tc.landed}
			srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
			statusURL := srv.Kickoff(t, "/$export?_type=Patient,Observation")
			w, err := bulkexport.NewWorker(store, src, srv.Storage, &bulkexport.WorkerOptions{
				PollInterval: 10 * time.Millisecond, Heartbeat: 10 * time.Millisecond,
				MaxFileResources: 7, CheckpointInterval: time.Nanosecond,
			})
			require.NoError(t, err)
			runWorker(t, w)
			res := srv.Collect(t, statusURL)
			requireExactlyOnce(t, res, "Patient", 60)
			requireExactlyOnce(t, res, "Observation", 120)
			require.Positive(t, store.failed.Load(), "no fault was injected")

			job := lastJob(t, srv)
			require.Equal(t, 1, job.Attempts, "the retries stayed within one claim")
			names, err := srv.Storage.List(context.Background(), job.ID)
			require.NoError(t, err)
			require.Len(t, names, len(res.Manifest.Output), "no unlisted file")
		})
	}
}

// TestLandedCompletion: the update that completes the job lands, but its
// answer is lost. The retry meets the completed job under the run's own
// fence and takes it as done, rather than as a lost lease.
func TestLandedCompletion(t *testing.T) {
	t.Parallel()
	src := clinicalSource(t, 20)
	store := &flakyStore{JobStore: bulkexport.NewMemoryStore()}
	store.failTerminal.Store(true)
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
	statusURL := srv.Kickoff(t, "/$export?_type=Patient")
	var logs syncBuffer
	w, err := bulkexport.NewWorker(store, src, srv.Storage, &bulkexport.WorkerOptions{
		PollInterval: 10 * time.Millisecond, Heartbeat: 10 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	require.NoError(t, err)
	runWorker(t, w)
	res := srv.Collect(t, statusURL)
	requireExactlyOnce(t, res, "Patient", 20)
	require.False(t, store.failTerminal.Load(), "no fault was injected")
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "job completed") },
		10*time.Second, 5*time.Millisecond, "the run did not log its completion: %s", logs.String())
	require.NotContains(t, logs.String(), "could not record")
}

// syncBuffer is a bytes.Buffer safe for concurrent writers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// logWatch is a slog.Handler that closes a channel at the first record
// whose message contains a substring.
type logWatch struct {
	substr string
	once   *sync.Once
	seen   chan struct{}
}

func newLogWatch(substr string) logWatch {
	return logWatch{substr: substr, once: new(sync.Once), seen: make(chan struct{})}
}

func (h logWatch) Enabled(context.Context, slog.Level) bool { return true }
func (h logWatch) Handle(_ context.Context, r slog.Record) error {
	if strings.Contains(r.Message, h.substr) {
		h.once.Do(func() { close(h.seen) })
	}
	return nil
}
func (h logWatch) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h logWatch) WithGroup(string) slog.Handler      { return h }

// startOutageRun kicks off an Observation export over a flakyStore and
// runs a worker with the given lease and heartbeat, a checkpoint after
// every resource and files of 7; the export pauses after 30 resources
// (pause), and gaveUp sees the run give its claim up for a store outage.
func startOutageRun(t *testing.T, lease, heartbeat time.Duration) (srv *bulkexporttest.Server, store *flakyStore,
	pause *bulkexporttest.Pause, statusURL string, gaveUp logWatch) {
	t.Helper()
	src := clinicalSource(t, 40)
	pause = src.Pause("Observation", 30)
	store = &flakyStore{JobStore: bulkexport.NewMemoryStore()}
	srv = bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
	statusURL = srv.Kickoff(t, "/$export?_type=Observation")
	gaveUp = newLogWatch("unreachable for the whole lease")
	w, err := bulkexport.NewStalledWorker(store, src, srv.Storage, &bulkexport.WorkerOptions{
		Lease: lease, PollInterval: 10 * time.Millisecond, Heartbeat: heartbeat,
		MaxFileResources: 7, CheckpointInterval: time.Nanosecond, Logger: slog.New(gaveUp),
	})
	require.NoError(t, err)
	runWorker(t, w)
	return srv, store, pause, statusURL, gaveUp
}

// TestStoreOutagePastLease: the store is down for longer than the lease.
// The run gives its claim up without touching the recorded files, and the
// job, still running in the store, is resumed from its checkpoint once the
// store is back and the lease has run out.
func TestStoreOutagePastLease(t *testing.T) {
	t.Parallel()
	srv, store, pause, statusURL, gaveUp := startOutageRun(t, 300*time.Millisecond, 10*time.Millisecond)
	<-pause.Reached()

	ctx := context.Background()
	before, err := store.JobStore.Get(ctx, lastJob(t, srv).ID)
	require.NoError(t, err)
	require.NotEmpty(t, before.Output, "files were recorded before the outage")
	store.down.Store(true)
	pause.Release()
	select {
	case <-gaveUp.seen:
	case <-time.After(time.Minute): // bounds a hang, not a timing assertion
		t.Fatal("the run did not give its claim up")
	}

	// The run stopped; the job is as it was last recorded, and so are its
	// files.
	during, err := store.JobStore.Get(ctx, before.ID)
	require.NoError(t, err)
	require.Equal(t, bulkexport.StateRunning, during.State)
	require.NotEmpty(t, during.Output)
	for _, f := range during.Output {
		fr, err := srv.Storage.Open(ctx, during.ID, f.Name)
		require.NoError(t, err, "a recorded file was removed")
		require.Equal(t, f.Size, fr.Size())
		require.NoError(t, fr.Close())
	}

	store.down.Store(false)
	res := srv.Collect(t, statusURL)
	requireExactlyOnce(t, res, "Observation", 80)
	job := lastJob(t, srv)
	require.Equal(t, 2, job.Attempts, "the job was claimed again")
	require.Greater(t, job.Fence, during.Fence)
}

// TestStoreOutageRetriedToLeaseEnd: the store refuses seven updates in a
// row, about 1.6 s of back-off, in a 2.5 s lease. The run retries until
// just before its lease runs out, rather than giving up as soon as its next
// back-off would cross the lease's end: it keeps its claim (one attempt)
// and completes.
func TestStoreOutageRetriedToLeaseEnd(t *testing.T) {
	t.Parallel()
	// No heartbeat: the checkpoints alone renew the lease, so that the
	// failed updates start right after a renewal.
	srv, store, pause, statusURL, gaveUp := startOutageRun(t, 2500*time.Millisecond, time.Hour)
	<-pause.Reached()
	store.failNext.Store(7)
	pause.Release()

	res := srv.Collect(t, statusURL)
	requireExactlyOnce(t, res, "Observation", 80)
	require.EqualValues(t, 7, store.failed.Load(), "the faults were injected")
	select {
	case <-gaveUp.seen:
		t.Fatal("the run gave its claim up within the lease")
	default:
	}
	require.Equal(t, 1, lastJob(t, srv).Attempts, "the retries stayed within one claim")
}

// TestCompletionVerifiesFiles: a listed file that went missing or short
// before the end fails the job; nothing is listed and its files are gone.
func TestCompletionVerifiesFiles(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		break_ func(path string) error
	}{
		{"missing", os.Remove},
		{"short", func(path string) error {
			fi, err := os.Stat(path)
			if err != nil {
				return err
			}
			return os.Truncate(path, fi.Size()/2)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src := clinicalSource(t, 20)
			pause := src.Pause("Observation", 30)
			srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src})
			statusURL := srv.Kickoff(t, "/$export?_type=Observation")
			w, err := bulkexport.NewWorker(srv.Store, src, srv.Storage, &bulkexport.WorkerOptions{
				PollInterval: 10 * time.Millisecond, MaxFileResources: 7, CheckpointInterval: time.Nanosecond,
			})
			require.NoError(t, err)
			runWorker(t, w)
			<-pause.Reached()
			job := lastJob(t, srv)
			require.NotEmpty(t, job.Output)
			require.NoError(t, tc.break_(filepath.Join(srv.Storage.Root(), job.ID, job.Output[0].Name)))
			pause.Release()

			code, body := srv.Wait(t, statusURL)
			require.Equal(t, http.StatusInternalServerError, code, "%s", body)
			require.Contains(t, string(body), "OperationOutcome")
			job = lastJob(t, srv)
			require.Equal(t, bulkexport.StateFailed, job.State)
			require.Empty(t, job.Output, "a failed job lists no file")
			// The files go once the failure is recorded, just after the
			// poll can see it.
			require.Eventually(t, func() bool { // bounds a wait, not a timing assertion
				names, err := srv.Storage.List(context.Background(), job.ID)
				require.NoError(t, err)
				return len(names) == 0
			}, 10*time.Second, time.Millisecond, "the failed job's files are removed")
		})
	}
}

// TestStaleRunCannotTouchCommittedFiles: worker A stalls past its lease,
// worker B takes the job over and completes it; then A wakes up and goes
// on writing and checkpointing. Nothing A does changes the completed
// export: its files carry its own fence, and its records are refused.
func TestStaleRunCannotTouchCommittedFiles(t *testing.T) {
	t.Parallel()
	clock := bulkexporttest.NewClock(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	src := clinicalSource(t, 40)
	block := make(chan struct{})
	reached := make(chan struct{})
	var once atomic.Bool
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		// The clock moves on, so that every resource is a checkpoint. A
		// stalls with a full open file (35 resources written, 7 to a
		// file): when it wakes, its first write commits that file under
		// its own fence, before its next checkpoint is refused.
		clock.Advance(time.Millisecond)
		if typ == "Observation" && n == 35 && once.CompareAndSwap(false, true) {
			close(reached)
			<-block // A stalls here, then carries on
		}
		return nil
	}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Clock: clock})
	statusURL := srv.Kickoff(t, "/$export?_type=Observation")
	opts := bulkexport.WorkerOptions{
		Now: clock.Now, Lease: time.Minute, Heartbeat: time.Hour, PollInterval: 10 * time.Millisecond,
		MaxFileResources: 7, CheckpointInterval: time.Nanosecond,
	}
	a, err := bulkexport.NewStalledWorker(srv.Store, src, srv.Storage, &opts)
	require.NoError(t, err)
	ctxA, cancelA := context.WithCancel(context.Background())
	doneA := make(chan error, 1)
	go func() { doneA <- a.Run(ctxA) }()
	<-reached
	fenceA := lastJob(t, srv).Fence

	clock.Advance(2 * time.Minute)
	b, err := bulkexport.NewStalledWorker(srv.Store, src, srv.Storage, &opts)
	require.NoError(t, err)
	runWorker(t, b)
	first := srv.Collect(t, statusURL)
	requireExactlyOnce(t, first, "Observation", 80)
	completed := lastJob(t, srv)
	require.Greater(t, completed.Fence, fenceA)

	// A wakes up and writes the rest of its type, committing files under
	// its own fence; every record it tries is refused.
	close(block)
	require.Eventually(t, func() bool { // bounds a wait, not a timing assertion
		names, err := srv.Storage.List(context.Background(), completed.ID)
		require.NoError(t, err)
		for _, n := range names {
			if f, _ := bulkexport.FileFence(n); f == fenceA && !slices.ContainsFunc(completed.Output, func(o bulkexport.File) bool { return o.Name == n }) {
				return true
			}
		}
		return false
	}, 30*time.Second, 5*time.Millisecond, "the stale run committed no file")
	cancelA()
	require.NoError(t, <-doneA)

	after := lastJob(t, srv)
	require.Equal(t, completed.Version, after.Version, "the stale run changed the job")
	require.Equal(t, completed.Output, after.Output)
	second := srv.Collect(t, statusURL)
	require.Equal(t, first.Output, second.Output, "the completed export changed")
}

// downStore fails every call, as a job store whose database is unreachable.
type downStore struct{ bulkexport.JobStore }

func (downStore) Get(context.Context, string) (*bulkexport.Job, error) { return nil, errStoreDown }
func (downStore) Create(context.Context, *bulkexport.Job, bulkexport.CreateParams) error {
	return errStoreDown
}
func (downStore) List(context.Context, bulkexport.Filter) ([]*bulkexport.Job, error) {
	return nil, errStoreDown
}

// TestStoreDownAnswers503RetryAfter: while the job store is unreachable,
// kick-offs, polls and cancels answer 503 with a transient
// OperationOutcome and a Retry-After, so that clients back off and retry
// rather than give up or loop.
func TestStoreDownAnswers503RetryAfter(t *testing.T) {
	t.Parallel()
	h, err := bulkexport.NewHandler(downStore{bulkexport.NewMemoryStore()}, &bulkexport.Options{BaseURL: "http://x/fhir", Logger: discardLogger()})
	require.NoError(t, err)
	srv := httptest.NewServer(h)
	defer srv.Close()
	for _, tc := range []struct{ method, path string }{
		{http.MethodGet, "/fhir/$export"},
		{http.MethodGet, "/fhir/$export-poll-status?_jobId=0123456789abcdef0123456789abcdef"},
		{http.MethodDelete, "/fhir/$export-poll-status?_jobId=0123456789abcdef0123456789abcdef"},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			req, err := http.NewRequest(tc.method, srv.URL+tc.path, nil)
			require.NoError(t, err)
			req.Header.Set("Prefer", "respond-async")
			req.Header.Set("Accept", "application/fhir+json")
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			resp.Body.Close()
			require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, "%s", body)
			require.Equal(t, "5", resp.Header.Get("Retry-After"))
			require.Contains(t, string(body), `"code":"transient"`)
		})
	}
}
