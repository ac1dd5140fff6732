package bulkexport_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// TestStaleRunFailureLogsLeaseLost: worker A stalls past its lease, worker
// B takes the job over and completes it; then A wakes up and its Source
// fails. A must not fail the job (it is B's), and must say that it gave
// the job up: a stale run never ends without a word.
func TestStaleRunFailureLogsLeaseLost(t *testing.T) {
	t.Parallel()
	clock := bulkexporttest.NewClock(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	src := clinicalSource(t, 40)
	block := make(chan struct{})
	reached := make(chan struct{})
	var once atomic.Bool
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		clock.Advance(time.Millisecond) // every resource is a checkpoint
		if typ == "Observation" && n == 30 && once.CompareAndSwap(false, true) {
			close(reached)
			<-block // A stalls here, then its Source fails
			return errors.New("source: connection reset")
		}
		return nil
	}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Clock: clock})
	statusURL := srv.Kickoff(t, "/$export?_type=Observation")
	opts := bulkexport.WorkerOptions{
		Now: clock.Now, Lease: time.Minute, Heartbeat: time.Hour, PollInterval: 10 * time.Millisecond,
		MaxFileResources: 7, CheckpointInterval: time.Nanosecond, Logger: discardLogger(),
	}
	optsA := opts
	lost := newLogWatch("lease lost")
	optsA.Logger = slog.New(lost)
	a, err := bulkexport.NewStalledWorker(srv.Store, src, srv.Storage, &optsA)
	require.NoError(t, err)
	ctxA, cancelA := context.WithCancel(context.Background())
	doneA := make(chan error, 1)
	go func() { doneA <- a.Run(ctxA) }()
	defer func() {
		cancelA()
		require.NoError(t, <-doneA)
	}()
	<-reached

	clock.Advance(2 * time.Minute)
	b, err := bulkexport.NewStalledWorker(srv.Store, src, srv.Storage, &opts)
	require.NoError(t, err)
	runWorker(t, b)
	first := srv.Collect(t, statusURL)
	requireExactlyOnce(t, first, "Observation", 80)
	completed := lastJob(t, srv)

	close(block)
	select {
	case <-lost.seen:
	case <-time.After(30 * time.Second): // bounds a hang, not a timing assertion
		t.Fatal("the stale run gave the job up without logging it")
	}
	after := lastJob(t, srv)
	require.Equal(t, bulkexport.StateCompleted, after.State)
	require.Equal(t, completed.Version, after.Version, "the stale run changed the job")
}

// trapStore answers one Update of the job with a version conflict, and
// the Get that follows it only when the caller's context is done.
type trapStore struct {
	bulkexport.JobStore
	armed atomic.Bool
	inGet chan struct{}
}

func (s *trapStore) Update(ctx context.Context, j *bulkexport.Job) error {
	if s.armed.Load() {
		return fmt.Errorf("trap: %w", bulkexport.ErrConflict)
	}
	return s.JobStore.Update(ctx, j)
}

func (s *trapStore) Get(ctx context.Context, id string) (*bulkexport.Job, error) {
	if s.armed.CompareAndSwap(true, false) {
		close(s.inGet)
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return s.JobStore.Get(ctx, id)
}

// TestStoppedUpdateIsNotStoreLoss: past the lease (a run that was stalled),
// one type's checkpoint meets a version conflict and is looking the job up
// when another type fails, which stops the first. That lookup's error is
// the run stopping, not the store failing: the job fails with the other
// type's error, rather than being given up as if the store were
// unreachable (to be run again).
func TestStoppedUpdateIsNotStoreLoss(t *testing.T) {
	t.Parallel()
	clock := bulkexporttest.NewClock(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	src := clinicalSource(t, 40)
	store := &trapStore{JobStore: bulkexport.NewMemoryStore(), inGet: make(chan struct{})}
	armed := make(chan struct{})
	var once, held atomic.Bool
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		clock.Advance(time.Millisecond) // every resource is a checkpoint
		switch {
		case typ == "Observation" && n == 10 && once.CompareAndSwap(false, true):
			clock.Advance(2 * time.Minute) // past the lease
			store.armed.Store(true)
			close(armed)
			select {
			case <-store.inGet:
			case <-time.After(30 * time.Second): // bounds a hang
			}
			return errors.New("source: connection reset")
		case typ == "Patient" && n == 5 && held.CompareAndSwap(false, true):
			// Patient's next checkpoint comes once the trap is set.
			select {
			case <-armed:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store, Clock: clock})
	statusURL := srv.Kickoff(t, "/$export?_type=Patient,Observation")
	storeLost := atomic.Bool{}
	watch := newLogWatch("unreachable for the whole lease")
	go func() {
		<-watch.seen
		storeLost.Store(true)
	}()
	w, err := bulkexport.NewStalledWorker(store, src, srv.Storage, &bulkexport.WorkerOptions{
		Now: clock.Now, Lease: time.Minute, Heartbeat: time.Hour, PollInterval: 10 * time.Millisecond,
		MaxFileResources: 7, CheckpointInterval: time.Nanosecond, Concurrency: 1, TypeConcurrency: 2,
		Logger: slog.New(watch),
	})
	require.NoError(t, err)
	runWorker(t, w)
	// Poll only once the trap has caught the run's lookup: a poll's lookup
	// would otherwise spring it.
	select {
	case <-store.inGet:
	case <-time.After(30 * time.Second): // bounds a hang
		t.Fatal("the run never looked the job up after its conflict")
	}
	code, body := srv.Wait(t, statusURL)
	require.False(t, storeLost.Load(), "the run took its own stop for a store outage")
	require.Equal(t, http.StatusInternalServerError, code, "%s", body)
	require.Contains(t, string(body), "the export of Observation failed")
	job := lastJob(t, srv)
	require.Equal(t, bulkexport.StateFailed, job.State)
	require.Equal(t, 1, job.Attempts, "the job was not run again")
}
