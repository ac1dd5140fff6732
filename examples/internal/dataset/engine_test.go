package dataset

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// interrupting is a Source that stops its worker (cancels the context the
// worker runs under) once a number of resources have been written: a
// shutdown in the middle of an export.
type interrupting struct {
	*Dataset
	after   int64
	written atomic.Int64
	stop    context.CancelFunc
}

func (s *interrupting) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	return s.Dataset.Export(ctx, q, typ, &stopWriter{ResourceWriter: w, s: s})
}

type stopWriter struct {
	bulkexport.ResourceWriter
	s *interrupting
}

func (w *stopWriter) Write(b []byte) error {
	if w.s.written.Add(1) == w.s.after {
		w.s.stop()
	}
	return w.ResourceWriter.Write(b)
}

// TestResumeWithWorker runs the dataset under the library's Worker, stops
// the worker in the middle of the export, and lets a second worker resume
// the job from its checkpoints: every resource must be in the output
// exactly once.
func TestResumeWithWorker(t *testing.T) {
	t.Parallel()
	// Several types at once matter: a shutdown can then cancel one type's
	// checkpoint while its job update is under way.
	for _, typeConcurrency := range []int{1, 3} {
		t.Run(fmt.Sprintf("types=%d", typeConcurrency), func(t *testing.T) {
			t.Parallel()
			testResumeWithWorker(t, typeConcurrency)
		})
	}
}

func testResumeWithWorker(t *testing.T, typeConcurrency int) {
	ds := New(60)
	store := bulkexport.NewMemoryStore()
	storage, err := bulkexport.NewDirStorage(t.TempDir())
	require.NoError(t, err)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	opts := &bulkexport.WorkerOptions{
		PollInterval:       5 * time.Millisecond,
		CheckpointInterval: time.Nanosecond, // record every checkpoint
		MaxFileResources:   25,              // several files per type
		TypeConcurrency:    typeConcurrency,
		Logger:             quiet,
	}
	ctx := context.Background()
	now := time.Now()
	job := &bulkexport.Job{
		ID:    bulkexport.NewJobID(),
		Level: fhirbulk.LevelGroup, GroupID: "odd",
		Request: bulkexport.Request{
			Types:       []string{"Patient", "Observation", "Condition", "MedicationRequest"},
			TypeFilters: []bulkexport.TypeFilter{{Type: "Condition", Query: "clinical-status=active"}},
		},
		State:     bulkexport.StateQueued,
		CreatedAt: now, UpdatedAt: now,
	}
	require.NoError(t, store.Create(ctx, job, bulkexport.CreateParams{}))

	// First worker: stopped after 70 resources.
	ctx1, stop1 := context.WithCancel(ctx)
	src := &interrupting{Dataset: ds, after: 70, stop: stop1}
	w1, err := bulkexport.NewWorker(store, src, storage, opts)
	require.NoError(t, err)
	require.NoError(t, w1.Run(ctx1))
	j, err := store.Get(ctx, job.ID)
	require.NoError(t, err)
	require.Equal(t, bulkexport.StateQueued, j.State, "the interrupted job goes back to the queue")
	require.NotEmpty(t, j.Output, "the first run recorded files")

	// Second worker: resumes and completes the job.
	ctx2, stop2 := context.WithCancel(ctx)
	w2, err := bulkexport.NewWorker(store, ds, storage, opts)
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- w2.Run(ctx2) }()
	for range 400 { // a bounded wait, not a timing assertion
		if j, err = store.Get(ctx, job.ID); err == nil && j.State.Terminal() {
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	stop2()
	require.NoError(t, <-done)
	require.NoError(t, err)
	require.Equal(t, bulkexport.StateCompleted, j.State, "%+v", j.Failure)
	require.Equal(t, 1, j.Attempts, "a hand-back on shutdown is not an attempt")

	got := map[string][]string{}
	for _, f := range j.Output {
		r, err := storage.Open(ctx, job.ID, f.Name)
		require.NoError(t, err)
		sc := bufio.NewScanner(r)
		n := int64(0)
		for sc.Scan() {
			var res struct{ ResourceType, ID string }
			require.NoError(t, json.Unmarshal(sc.Bytes(), &res))
			require.Equal(t, f.Type, res.ResourceType)
			got[f.Type] = append(got[f.Type], res.ID)
			n++
		}
		require.NoError(t, sc.Err())
		r.Close()
		require.Equal(t, f.Count, n, f.Name)
	}
	for _, typ := range job.Request.Types {
		q := &bulkexport.Query{Level: job.Level, GroupID: job.GroupID, TransactionTime: j.TransactionTime,
			TypeFilters: job.Request.FiltersFor(typ)}
		want, err := ds.Expected(q, typ)
		require.NoError(t, err)
		require.NotEmpty(t, want)
		require.Equal(t, want, got[typ], typ)
	}
}
