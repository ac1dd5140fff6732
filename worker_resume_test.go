package bulkexport_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// reclaimSource exports Patients p1..p10, checkpointing after each. Its
// first Export call stops after p5 and its second after p8, each until
// released, so that a test can hold two runs of one job at once.
type reclaimSource struct {
	calls    atomic.Int32
	reached  [2]chan struct{}
	release  [2]chan struct{}
	returned [2]chan error
}

func newReclaimSource() *reclaimSource {
	s := &reclaimSource{}
	for i := range 2 {
		s.reached[i], s.release[i], s.returned[i] = make(chan struct{}), make(chan struct{}), make(chan error, 1)
	}
	return s
}

func (s *reclaimSource) ResourceTypes(context.Context, fhirbulk.Level) ([]string, error) {
	return []string{"Patient"}, nil
}

func (s *reclaimSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) (err error) {
	call := int(s.calls.Add(1)) - 1
	if call > 1 {
		return fmt.Errorf("unexpected Export call %d", call+1)
	}
	defer func() { s.returned[call] <- err }()
	from := 1
	if q.Cursor != "" {
		n, err := strconv.Atoi(q.Cursor)
		if err != nil {
			return err
		}
		from = n + 1
	}
	stopAt := [2]int{5, 8}[call]
	for i := from; i <= 10; i++ {
		if err := w.Write([]byte(fmt.Sprintf(`{"resourceType":"Patient","id":"p%d"}`, i))); err != nil {
			return err
		}
		if err := w.Checkpoint(strconv.Itoa(i)); err != nil {
			return err
		}
		if i == stopAt {
			close(s.reached[call])
			select {
			case <-s.release[call]:
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
	}
	return nil
}

// TestOwnReclaimStopsOlderRun: a Worker whose heartbeat has stalled for
// longer than the lease may claim its own job again (the lease names the
// same worker). The older run must then stop at its next update, as it
// would for another worker, instead of taking the job for its own and
// recording files next to the newer run's: the export holds every
// resource exactly once.
func TestOwnReclaimStopsOlderRun(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	store := bulkexport.NewMemoryStore()
	storage, err := bulkexport.NewDirStorage(t.TempDir())
	require.NoError(t, err)
	var offset atomic.Int64 // added to the real clock: the checkpoint interval needs time to pass
	now := func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	created := now()
	require.NoError(t, store.Create(ctx, &bulkexport.Job{
		ID: "job-reclaim", Level: fhirbulk.LevelSystem, State: bulkexport.StateQueued,
		Progress: bulkexport.Progress{Percent: -1}, CreatedAt: created, UpdatedAt: created,
	}, bulkexport.CreateParams{}))
	src := newReclaimSource()
	w, err := bulkexport.NewStalledWorker(store, src, storage, &bulkexport.WorkerOptions{
		ID: "w1", Now: now, Lease: time.Minute,
		Heartbeat:          time.Hour, // the stalled heartbeat: the lease is never renewed
		PollInterval:       5 * time.Millisecond,
		Concurrency:        2, // a free slot to claim the job again with
		CheckpointInterval: time.Nanosecond,
		Logger:             slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})

	wait := func(ch <-chan struct{}, what string) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			t.Fatalf("timed out waiting for %s", what)
		}
	}
	wait(src.reached[0], "the first run to export p1..p5")
	offset.Store(int64(2 * time.Minute)) // the lease has run out; the same worker claims the job again
	wait(src.reached[1], "the second run to export p6..p8")

	// The first run wakes up: its next update must find that the job was
	// claimed again, and stop it.
	close(src.release[0])
	select {
	case err := <-src.returned[0]:
		require.Error(t, err, "the first run must stop, not export p6..p10 again")
	case <-time.After(10 * time.Second):
		t.Fatal("timed out waiting for the first run to stop")
	}
	close(src.release[1])

	var job *bulkexport.Job
	for range 1000 { // a bounded wait for the second run to complete
		job, err = store.Get(ctx, "job-reclaim")
		require.NoError(t, err)
		if job.State.Terminal() {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	require.Equal(t, bulkexport.StateCompleted, job.State)
	require.Equal(t, 2, job.Attempts)

	var names, ids []string
	for _, f := range job.Output {
		names = append(names, f.Name)
		r, err := storage.Open(ctx, job.ID, f.Name)
		require.NoError(t, err)
		sc := bufio.NewScanner(r)
		var n int64
		for sc.Scan() {
			var res struct{ ID string }
			require.NoError(t, json.Unmarshal(sc.Bytes(), &res))
			ids = append(ids, res.ID)
			n++
		}
		require.NoError(t, sc.Err())
		r.Close()
		require.Equal(t, f.Count, n, f.Name)
	}
	require.Equal(t, []string{"p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9", "p10"}, ids, "every resource exactly once")
	listed, err := storage.List(ctx, job.ID)
	require.NoError(t, err)
	slices.Sort(names)
	require.Equal(t, names, listed, "every file listed once, and no orphans")
}

// threePatients exports p1, p2 and p3.
type threePatients struct{}

func (threePatients) ResourceTypes(context.Context, fhirbulk.Level) ([]string, error) {
	return []string{"Patient"}, nil
}

func (threePatients) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	for i := 1; i <= 3; i++ {
		if err := w.Write([]byte(fmt.Sprintf(`{"resourceType":"Patient","id":"p%d"}`, i))); err != nil {
			return err
		}
	}
	return nil
}

// TestResumeRemovesTempFiles: a process killed mid-export leaves the
// temporary files of the writers it had open in the job's DirStorage
// directory (and perhaps a committed file it never recorded). The worker
// that resumes the job removes both, so that the finished job's directory
// holds exactly the files its manifest lists.
func TestResumeRemovesTempFiles(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	store := bulkexport.NewMemoryStore()
	root := t.TempDir()
	storage, err := bulkexport.NewDirStorage(root)
	require.NoError(t, err)
	t0 := time.Now().Add(-time.Hour)
	// The job as the killed process left it: running, its lease expired.
	require.NoError(t, store.Create(ctx, &bulkexport.Job{
		ID: "job-killed", Level: fhirbulk.LevelSystem, State: bulkexport.StateQueued,
		Progress: bulkexport.Progress{Percent: -1}, CreatedAt: t0, UpdatedAt: t0,
	}, bulkexport.CreateParams{}))
	j, err := store.Claim(ctx, bulkexport.ClaimParams{Worker: "killed-worker", Now: t0, Lease: time.Minute})
	require.NoError(t, err)
	j.StartedAt, j.TransactionTime = t0, t0
	require.NoError(t, store.Update(ctx, j))
	// Its leftovers: a file being written (never committed nor aborted)
	// and a committed file it never recorded. They are made through a
	// DirStorage of their own, as the killed process had: the sweep
	// leaves alone the files of writers open through its own storage.
	killed, err := bulkexport.NewDirStorage(root)
	require.NoError(t, err)
	open, err := killed.Create(ctx, j.ID, "Patient.000001.ndjson")
	require.NoError(t, err)
	_, err = open.Write([]byte(`{"resourceType":"Patient","id":"p1"}` + "\n"))
	require.NoError(t, err)
	defer open.Abort() //nolint:errcheck // the sweep has removed its file
	orphan, err := killed.Create(ctx, j.ID, "Patient.000007.ndjson")
	require.NoError(t, err)
	require.NoError(t, orphan.Commit())
	entries, err := os.ReadDir(filepath.Join(root, j.ID))
	require.NoError(t, err)
	require.Len(t, entries, 2)

	w, err := bulkexport.NewWorker(store, threePatients{}, storage, &bulkexport.WorkerOptions{
		PollInterval: 5 * time.Millisecond,
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx) }()
	defer func() {
		cancel()
		require.NoError(t, <-done)
	}()
	var job *bulkexport.Job
	for range 1000 { // a bounded wait
		job, err = store.Get(ctx, j.ID)
		require.NoError(t, err)
		if job.State.Terminal() {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	require.Equal(t, bulkexport.StateCompleted, job.State)
	require.Len(t, job.Output, 1)
	require.EqualValues(t, 3, job.Output[0].Count)
	entries, err = os.ReadDir(filepath.Join(root, j.ID))
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	require.Equal(t, []string{job.Output[0].Name}, names, "no temporary file and no orphan left")
}
