package bulkexport

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// WorkerOptions configures a Worker. Every field has the default its
// comment gives.
type WorkerOptions struct {
	// ID names this worker in job leases. Default: hostname plus a random
	// suffix, unique per Worker.
	ID string
	// Concurrency is how many jobs run at once. Default: 2.
	Concurrency int
	// TypeConcurrency is how many resource types of one job are exported
	// at once. Default: 2.
	TypeConcurrency int
	// Lease is how long a claim holds a job without renewal. A worker that
	// dies loses its jobs to other workers after this long. Default: 30s.
	Lease time.Duration
	// Heartbeat is how often a running job's progress is saved, its lease
	// renewed when due (every Lease/3), and the store checked for a
	// cancel. Default: 500ms, so a cancel stops a job within a second.
	Heartbeat time.Duration
	// PollInterval is how long an idle worker waits before it asks the
	// store for work again. Notify wakes it earlier. Default: 1s.
	PollInterval time.Duration
	// MaxFileResources and MaxFileBytes split output files: a file is
	// closed and a new one started when either would be exceeded.
	// Defaults: 100,000 resources and 256 MiB.
	MaxFileResources int64
	MaxFileBytes     int64
	// MaxFilesPerJob fails a job that would write more files than this
	// (output, deleted and error files together) with 413 too-costly.
	// Default: 10,000.
	MaxFilesPerJob int
	// CheckpointInterval is the least time between two recorded
	// checkpoints of one type (each one makes the files written so far
	// durable: a Storage that is a SyncedOpener has the open files synced,
	// any other has them committed, which cuts them). Default: 5s.
	CheckpointInterval time.Duration
	// Retention is how long a finished job and its files are kept after
	// completion; the manifest's Expires says when. Default: 24h.
	Retention time.Duration
	// PurgeInterval is how often expired jobs and files are removed.
	// Default: 1m.
	PurgeInterval time.Duration
	// MaxAttempts fails a job that has been claimed this many times
	// without finishing (it keeps killing workers). Default: 5.
	MaxAttempts int
	// TrustSource skips the engine's check of each resource a Source
	// writes (one JSON object, of the type being exported, valid UTF-8;
	// multi-line JSON compacted): Write then only makes sure the line
	// keeps the file NDJSON (it starts with '{', ends with '}' and holds
	// no line break; anything else is left out and reported, as an
	// invalid resource is without it). It is for Sources that write JSON
	// they validated on the way in, such as a database's jsonb column, and
	// saves most of the engine's work per resource: a malformed resource
	// or one of another type from such a Source reaches the files as it
	// is. Organized output (organizeOutputBy) is always checked. Default:
	// false, every resource is checked.
	TrustSource bool
	// Partitions is the most parts a Partitioner Source may split one
	// resource type of a job into; 1 turns partitioning off. It applies
	// when the JobStore is a UnitStore and the Source a Partitioner (see
	// Partitioner). Default: 8.
	Partitions int
	// UnitConcurrency is how many units (parts of partitioned jobs, of
	// any replica's jobs) this worker exports at once, besides its
	// Concurrency jobs. Default: 2.
	UnitConcurrency int
	// Now is the clock. Default: time.Now.
	Now func() time.Time
	// Logger receives the worker's logs. Every line about a job carries
	// its id (job), client (client) and export level (export_level).
	// Default: slog.Default().
	Logger *slog.Logger
	// MeterProvider receives the worker's metrics: job transitions,
	// durations, reclaims, exported resources and bytes, purges, and the
	// store gauges of active jobs and queue depth (one List of the active
	// jobs per collection while Run runs). See docs/observability.md.
	// Default: nil, no metrics.
	MeterProvider metric.MeterProvider
	// TracerProvider receives the worker's spans: one per job run, per
	// resource type (the context Source.Export gets carries it) and per
	// file commit. Default: nil, no spans.
	TracerProvider trace.TracerProvider
}

// Worker runs export jobs: it claims queued jobs from a JobStore, asks the
// Source for their resources type by type, writes NDJSON files to Storage,
// and completes, fails or abandons the jobs. It also purges expired jobs.
// Several Workers (in one process or many) may share a store.
type Worker struct {
	store   JobStore
	src     Source
	storage Storage
	opts    WorkerOptions
	log     *slog.Logger
	tel     *telemetry
	wake    chan struct{}
	// wakeUnits wakes the unit loop when this worker stored a plan.
	wakeUnits chan struct{}
	// unitEnded holds, by job id, the channel that wakes this worker's
	// coordinator of a partitioned job when one of its units ends here.
	unitEnded sync.Map
	// later counts the work Run must wait for before it returns, besides
	// its job runs (jobRun.deleteAgain).
	later sync.WaitGroup
}

// NewWorker returns a Worker. It starts nothing: call Run.
func NewWorker(store JobStore, src Source, storage Storage, opts *WorkerOptions) (*Worker, error) {
	return newWorker(store, src, storage, opts, false)
}

// newWorker is NewWorker; stalled lets the package's tests simulate a
// worker whose heartbeats stall past its lease (export_test.go).
func newWorker(store JobStore, src Source, storage Storage, opts *WorkerOptions, stalled bool) (*Worker, error) {
	if store == nil || src == nil || storage == nil {
		return nil, errors.New("bulkexport: NewWorker needs a JobStore, a Source and a Storage")
	}
	var o WorkerOptions
	if opts != nil {
		o = *opts
	}
	o.fill()
	if err := o.validate(); err != nil && !(stalled && errors.As(err, new(*heartbeatError))) {
		return nil, err
	}
	return &Worker{store: store, src: src, storage: storage, opts: o, log: o.Logger,
		tel: newTelemetry(o.MeterProvider, o.TracerProvider, o.Logger), wake: make(chan struct{}, 1), wakeUnits: make(chan struct{}, 1)}, nil
}

// ID returns the worker's lease owner name.
func (w *Worker) ID() string { return w.opts.ID }

// Notify wakes an idle worker so that it claims new work at once, for
// instance right after a kick-off (see Options.OnQueued). It never blocks.
func (w *Worker) Notify() { wakeUp(w.wake) }

// Run claims and runs jobs, and purges expired ones, until ctx is done.
// It blocks, and returns only after every goroutine it started has
// exited. Jobs interrupted by the shutdown are handed back to the queue
// and resume from their last checkpoint. Run returns nil after a shutdown.
func (w *Worker) Run(ctx context.Context) error {
	if reg := w.tel.registerStoreGauges(w.store, w.opts.Now, w.log); reg != nil {
		defer func() { _ = reg.Unregister() }()
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		w.purgeLoop(ctx)
	}()
	if w.partitioning() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.unitLoop(ctx)
		}()
	}

	claimLoop(w, ctx, "claim", w.opts.Concurrency, w.wake,
		func(ctx context.Context) (*Job, error) {
			return w.store.Claim(ctx, ClaimParams{Worker: w.opts.ID, Lease: w.opts.Lease, Now: w.opts.Now()})
		}, w.runJob)
	wg.Wait()
	w.later.Wait()
	return nil
}

// claimLoop claims work with claim and runs each piece with run, at most
// slots at a time, until ctx is done; then it waits for the runs it
// started. With nothing to claim (ErrNoJob) it waits PollInterval, or
// less when wake fires. what names the claim in the log line of a failed
// one. Run uses it for jobs, unitLoop for units.
func claimLoop[T any](w *Worker, ctx context.Context, what string, slots int, wake <-chan struct{},
	claim func(context.Context) (T, error), run func(context.Context, T)) {
	sem := make(chan struct{}, slots)
	var wg sync.WaitGroup
	defer wg.Wait()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		v, err := claim(ctx)
		if err == nil {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				run(ctx, v)
			}()
			continue
		}
		<-sem
		if !errors.Is(err, ErrNoJob) && ctx.Err() == nil {
			w.log.LogAttrs(ctx, slog.LevelWarn, "bulkexport: "+what+" failed", slog.String("worker", w.opts.ID), slog.Any("err", err))
		}
		timer.Reset(w.opts.PollInterval)
		select {
		case <-timer.C:
		case <-wake:
			if !timer.Stop() {
				<-timer.C
			}
		case <-ctx.Done():
			return
		}
	}
}

// wakeUp sends on a wake channel (capacity 1) without blocking: a wake
// already pending is enough.
func wakeUp(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (w *Worker) purgeLoop(ctx context.Context) {
	t := time.NewTicker(w.opts.PurgeInterval)
	defer t.Stop()
	for {
		if _, err := w.Purge(ctx); err != nil && ctx.Err() == nil {
			w.log.LogAttrs(ctx, slog.LevelWarn, "bulkexport: purge failed", slog.Any("err", err))
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}

// Purge removes every job whose ExpiresAt has passed, files first, and
// returns how many it removed. Run calls it every PurgeInterval.
func (w *Worker) Purge(ctx context.Context) (int, error) {
	jobs, err := w.store.List(ctx, Filter{ExpiresBefore: w.opts.Now(), Limit: 1000})
	if err != nil {
		w.tel.purged(ctx, nil, err)
		return 0, err
	}
	var removed []*Job
	var errs []error
	for _, j := range jobs {
		if !j.State.Terminal() {
			continue
		}
		if err := w.storage.Delete(ctx, j.ID); err != nil {
			errs = append(errs, fmt.Errorf("job %s files: %w", j.ID, err))
			continue
		}
		if err := w.store.Delete(ctx, j.ID); err != nil && !errors.Is(err, ErrNotFound) {
			errs = append(errs, fmt.Errorf("job %s: %w", j.ID, err))
			continue
		}
		removed = append(removed, j)
		w.log.LogAttrs(ctx, slog.LevelInfo, "bulkexport: job purged", append(jobAttrs(j), slog.String("state", string(j.State)))...)
	}
	err = errors.Join(errs...)
	w.tel.purged(ctx, removed, err)
	return len(removed), err
}
