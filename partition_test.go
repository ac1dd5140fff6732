package bulkexport_test

import (
	"context"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// fastWorker returns a worker options value for partition tests.
func fastWorker(id string) *bulkexport.WorkerOptions {
	return &bulkexport.WorkerOptions{ID: id, PollInterval: 5 * time.Millisecond, Heartbeat: 10 * time.Millisecond,
		MaxFileResources: 7, CheckpointInterval: time.Nanosecond, UnitConcurrency: 2, Partitions: 4}
}

// TestPartitionedExport: one job split into parts, run by three workers
// sharing a store. Every resource comes exactly once, the files of a type
// are listed part by part, and each unit is done.
func TestPartitionedExport(t *testing.T) {
	t.Parallel()
	src := bulkexporttest.PartitionedSource{Source: clinicalSource(t, 90), Parts: 3}
	store := bulkexport.NewMemoryStore()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
	statusURL := srv.Kickoff(t, "/$export?_type=Patient,Observation,Condition")
	workers := map[string]bool{}
	for _, id := range []string{"w1", "w2", "w3"} {
		w, err := bulkexport.NewWorker(store, src, srv.Storage, fastWorker(id))
		require.NoError(t, err)
		runWorker(t, w)
	}
	res := srv.Collect(t, statusURL)
	requireExactlyOnce(t, res, "Patient", 90)
	requireExactlyOnce(t, res, "Observation", 180)
	requireExactlyOnce(t, res, "Condition", 90)

	job := lastJob(t, srv)
	units, err := store.Units(context.Background(), job.ID)
	require.NoError(t, err)
	require.Len(t, units, 9, "three parts of three types")
	for _, u := range units {
		require.Equal(t, bulkexport.UnitDone, u.State, u.Key)
		require.Positive(t, u.Written, u.Key)
		workers[u.LeaseOwner] = true
		for _, f := range u.Output {
			require.True(t, strings.HasPrefix(f.Name, u.Key+"."), "file %s of unit %s", f.Name, u.Key)
		}
	}
	// Files are listed by type, then part, then number.
	var names []string
	for _, f := range res.Manifest.Output {
		names = append(names, f.URL[strings.LastIndex(f.URL, "/")+1:])
	}
	require.True(t, slices.IsSorted(names), "manifest order %v", names)
	stored, err := srv.Storage.List(context.Background(), job.ID)
	require.NoError(t, err)
	require.Len(t, stored, len(res.Manifest.Output), "no unlisted file")
}

// TestPartitionedUnitCrashResumes: the worker running a unit stalls past
// its lease (its heartbeats stop); another worker claims the unit, resumes
// it from its checkpoint, and the job completes exactly once.
func TestPartitionedUnitCrashResumes(t *testing.T) {
	t.Parallel()
	base := clinicalSource(t, 60)
	pause := base.Pause("Observation", 45)
	src := bulkexporttest.PartitionedSource{Source: base, Parts: 2}
	store := bulkexport.NewMemoryStore()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
	statusURL := srv.Kickoff(t, "/$export?_type=Patient,Observation")
	o := fastWorker("stalled")
	o.Lease, o.Heartbeat = 300*time.Millisecond, time.Hour
	stalled, err := bulkexport.NewStalledWorker(store, src, srv.Storage, o)
	require.NoError(t, err)
	runWorker(t, stalled)
	waitReached(t, pause)
	// The stalled worker's claims run out; a healthy worker takes over.
	o2 := fastWorker("healthy")
	o2.Lease = 300 * time.Millisecond
	healthy, err := bulkexport.NewWorker(store, src, srv.Storage, o2)
	require.NoError(t, err)
	runWorker(t, healthy)
	res := srv.Collect(t, statusURL)
	pause.Release()
	requireExactlyOnce(t, res, "Patient", 60)
	requireExactlyOnce(t, res, "Observation", 120)
	units, err := store.Units(context.Background(), lastJob(t, srv).ID)
	require.NoError(t, err)
	reclaimed := false
	for _, u := range units {
		require.Equal(t, bulkexport.UnitDone, u.State)
		reclaimed = reclaimed || u.Attempts > 1
	}
	require.True(t, reclaimed, "no unit was claimed twice")
}

// TestPartitionedUnitFailureFailsJob: one part's export fails; the job
// fails with that part's outcome and lists no file, and its other units
// are closed.
func TestPartitionedUnitFailureFailsJob(t *testing.T) {
	t.Parallel()
	base := clinicalSource(t, 60)
	base.FailOn("Observation", 20, &bulkexport.Error{Status: http.StatusForbidden, Message: "the part is not yours"})
	src := bulkexporttest.PartitionedSource{Source: base, Parts: 3}
	store := bulkexport.NewMemoryStore()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
	statusURL := srv.Kickoff(t, "/$export?_type=Patient,Observation")
	w, err := bulkexport.NewWorker(store, src, srv.Storage, fastWorker("w1"))
	require.NoError(t, err)
	runWorker(t, w)
	status, body := srv.Wait(t, statusURL)
	require.Equal(t, http.StatusForbidden, status, string(body))
	require.Contains(t, string(body), "the part is not yours")
	job := lastJob(t, srv)
	require.Empty(t, job.Output)
	units, err := store.Units(context.Background(), job.ID)
	require.NoError(t, err)
	for _, u := range units {
		require.True(t, u.State.Final(), "unit %s is %s after its job failed", u.Key, u.State)
	}
	require.Eventually(t, func() bool {
		names, err := srv.Storage.List(context.Background(), job.ID)
		return err == nil && len(names) == 0
	}, 5*time.Second, 10*time.Millisecond, "the failed job's files are removed")
}

// TestPartitionedCancel: a DELETE mid-export stops every unit; the units
// are closed and the files removed.
func TestPartitionedCancel(t *testing.T) {
	t.Parallel()
	base := clinicalSource(t, 60)
	pause := base.Pause("Observation", 10)
	src := bulkexporttest.PartitionedSource{Source: base, Parts: 2}
	store := bulkexport.NewMemoryStore()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
	statusURL := srv.Kickoff(t, "/$export?_type=Patient,Observation")
	w, err := bulkexport.NewWorker(store, src, srv.Storage, fastWorker("w1"))
	require.NoError(t, err)
	runWorker(t, w)
	waitReached(t, pause)
	job := srv.Job(t, statusURL)
	srv.Cancel(t, statusURL)
	pause.Release()
	require.Eventually(t, func() bool {
		units, err := store.Units(context.Background(), job.ID)
		if err != nil {
			return false
		}
		for _, u := range units {
			if !u.State.Final() {
				return false
			}
		}
		return true
	}, 5*time.Second, 10*time.Millisecond)
}

func waitReached(t *testing.T, p *bulkexporttest.Pause) {
	t.Helper()
	select {
	case <-p.Reached():
	case <-time.After(10 * time.Second):
		t.Fatal("the export never reached the pause")
	}
}

// flakyUnitStore is a flakyStore whose unit calls fail alike: while down,
// and every failEvery-th update of a job or a unit (landed or not).
type flakyUnitStore struct {
	*flakyStore
	us bulkexport.UnitStore
}

func newFlakyUnitStore(failEvery int64, landed bool) *flakyUnitStore {
	m := bulkexport.NewMemoryStore()
	return &flakyUnitStore{flakyStore: &flakyStore{JobStore: m, failEvery: failEvery, landed: landed}, us: m}
}

func (s *flakyUnitStore) AddUnits(ctx context.Context, jobID string, units []*bulkexport.Unit) error {
	if s.down.Load() {
		return errStoreDown
	}
	return s.us.AddUnits(ctx, jobID, units)
}

func (s *flakyUnitStore) ClaimUnit(ctx context.Context, p bulkexport.ClaimParams) (*bulkexport.Unit, error) {
	if s.down.Load() {
		return nil, errStoreDown
	}
	return s.us.ClaimUnit(ctx, p)
}

func (s *flakyUnitStore) Units(ctx context.Context, jobID string) ([]*bulkexport.Unit, error) {
	if s.down.Load() {
		return nil, errStoreDown
	}
	return s.us.Units(ctx, jobID)
}

func (s *flakyUnitStore) UpdateUnit(ctx context.Context, u *bulkexport.Unit) error {
	if s.down.Load() {
		s.failed.Add(1)
		return errStoreDown
	}
	n := s.updates.Add(1)
	if s.failEvery == 0 || n%s.failEvery != 0 {
		return s.us.UpdateUnit(ctx, u)
	}
	s.failed.Add(1)
	if s.landed {
		if err := s.us.UpdateUnit(ctx, u.Clone()); err != nil {
			return err
		}
	}
	return errStoreDown
}

// TestPartitionedStoreErrorsRetried: with partitioning on, failed job and
// unit updates, lost or landed, are retried within the leases; the job
// completes with everything exactly once and no unlisted file.
func TestPartitionedStoreErrorsRetried(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		landed bool
	}{{"lost", false}, {"landed", true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src := bulkexporttest.PartitionedSource{Source: clinicalSource(t, 60), Parts: 3}
			store := newFlakyUnitStore(3, tc.landed)
			srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
			statusURL := srv.Kickoff(t, "/$export?_type=Patient,Observation")
			for _, id := range []string{"w1", "w2"} {
				w, err := bulkexport.NewWorker(store, src, srv.Storage, fastWorker(id))
				require.NoError(t, err)
				runWorker(t, w)
			}
			res := srv.Collect(t, statusURL)
			requireExactlyOnce(t, res, "Patient", 60)
			requireExactlyOnce(t, res, "Observation", 120)
			require.Positive(t, store.failed.Load(), "no fault was injected")
			job := lastJob(t, srv)
			names, err := srv.Storage.List(context.Background(), job.ID)
			require.NoError(t, err)
			require.Len(t, names, len(res.Manifest.Output), "no unlisted file")
		})
	}
}

// TestPartitionedStoreOutagePastLease: the store is down for longer than
// the lease while parts are being exported. Every run gives its claim up
// without touching recorded files; once the store is back, the job and its
// units are claimed again and resume from their checkpoints, exactly once.
func TestPartitionedStoreOutagePastLease(t *testing.T) {
	t.Parallel()
	base := clinicalSource(t, 60)
	pause := base.Pause("Observation", 25)
	src := bulkexporttest.PartitionedSource{Source: base, Parts: 2}
	store := newFlakyUnitStore(0, false)
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
	statusURL := srv.Kickoff(t, "/$export?_type=Patient,Observation")
	gaveUp := newLogWatch("unreachable for the whole lease")
	o := fastWorker("w1")
	o.Lease, o.Logger = 300*time.Millisecond, slog.New(gaveUp)
	w, err := bulkexport.NewWorker(store, src, srv.Storage, o)
	require.NoError(t, err)
	runWorker(t, w)
	waitReached(t, pause)
	store.down.Store(true)
	pause.Release()
	select {
	case <-gaveUp.seen:
	case <-time.After(time.Minute): // bounds a hang, not a timing assertion
		t.Fatal("no run gave its claim up")
	}
	// Keep the store down until every lease has run out (each run retries
	// until its own lease ends), so that every claim is given up.
	time.Sleep(3 * o.Lease)
	store.down.Store(false)
	res := srv.Collect(t, statusURL)
	requireExactlyOnce(t, res, "Patient", 60)
	requireExactlyOnce(t, res, "Observation", 120)
	units, err := store.us.Units(context.Background(), lastJob(t, srv).ID)
	require.NoError(t, err)
	reclaimed := false
	for _, u := range units {
		t.Logf("unit %s: %s, attempts %d", u.Key, u.State, u.Attempts)
		reclaimed = reclaimed || u.Attempts > 1
	}
	require.True(t, reclaimed, "a unit was claimed again after the outage")
}

// lossyUnitStore is a MemoryStore that forgets every unit once asked to.
type lossyUnitStore struct {
	*bulkexport.MemoryStore
	lose atomic.Bool
}

func (s *lossyUnitStore) Units(ctx context.Context, jobID string) ([]*bulkexport.Unit, error) {
	if s.lose.Load() {
		return nil, nil
	}
	return s.MemoryStore.Units(ctx, jobID)
}

// TestPartitionedLostUnitsFailJob: a store that loses a planned job's
// units makes the job fail, never complete with nothing.
func TestPartitionedLostUnitsFailJob(t *testing.T) {
	t.Parallel()
	base := clinicalSource(t, 60)
	pause := base.Pause("Observation", 5)
	src := bulkexporttest.PartitionedSource{Source: base, Parts: 2}
	store := &lossyUnitStore{MemoryStore: bulkexport.NewMemoryStore()}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
	statusURL := srv.Kickoff(t, "/$export?_type=Observation")
	w, err := bulkexport.NewWorker(store, src, srv.Storage, fastWorker("w1"))
	require.NoError(t, err)
	runWorker(t, w)
	waitReached(t, pause)
	store.lose.Store(true)
	pause.Release()
	status, body := srv.Wait(t, statusURL)
	require.Equal(t, http.StatusInternalServerError, status, string(body))
	require.Contains(t, string(body), "parts of the export are missing")
}

// TestPartitionedUnitAttemptsCapped: a part claimed more often than
// MaxAttempts (its runs keep dying) fails the job, as a job would. The
// part's earlier claims are made directly in the store, by a worker that
// never ran it.
func TestPartitionedUnitAttemptsCapped(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	src := bulkexporttest.PartitionedSource{Source: clinicalSource(t, 60), Parts: 2}
	store := bulkexport.NewMemoryStore()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Store: store})
	statusURL := srv.Kickoff(t, "/$export?_type=Observation")
	job := srv.Job(t, statusURL)
	require.NoError(t, store.AddUnits(ctx, job.ID, []*bulkexport.Unit{
		{Key: "Observation.p0001", Type: "Observation", Partition: "0-1000", Seq: 0},
	}))
	now := time.Now()
	for h := 3; h >= 1; h-- { // three claims of the first part, each left to expire
		u, err := store.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "ghost", Lease: time.Millisecond, Now: now.Add(-time.Duration(h) * time.Hour)})
		require.NoError(t, err)
		require.Equal(t, "Observation.p0001", u.Key)
	}
	o := fastWorker("w1")
	o.MaxAttempts = 3
	w, err := bulkexport.NewWorker(store, src, srv.Storage, o)
	require.NoError(t, err)
	runWorker(t, w)
	status, body := srv.Wait(t, statusURL)
	require.Equal(t, http.StatusInternalServerError, status, string(body))
	require.Contains(t, string(body), "a part of the export was interrupted 3 times")
	units, err := store.Units(ctx, job.ID)
	require.NoError(t, err)
	require.Equal(t, bulkexport.UnitFailed, units[0].State)
}
