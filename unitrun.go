package bulkexport

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Partitioned jobs (see Partitioner and UnitStore).
//
// The job's claim holder, the coordinator, asks the Source for the parts
// of every type, stores them as units (AddUnits, once per job), and then
// only watches: it renews the job's lease, sums the units' progress into
// the job's, lists each unit's files in the job as the unit ends, and
// completes the job (with the usual verification) when every unit is done,
// or fails it when one failed. Units are claimed by any worker's unit loop
// (this one's included) and run exactly as a job run runs one type: the
// same typeRun writes the files, the same compare-and-set updates record
// them with the resume cursor, but in the unit, under the unit's claim and
// fence. The unit's key is the stem of its file names, so no two units
// (nor two claims of a unit) ever write the same name.

// unitHold is what a unit run keeps of its unit.
type unitHold struct {
	us     UnitStore
	key    string
	parent *Job // the job as the unit run found it: its request and times
	u      *Unit
}

// partitioning reports whether this worker partitions jobs: its store
// keeps units, its Source splits types, and Partitions allows it.
func (w *Worker) partitioning() bool {
	_, us := w.store.(UnitStore)
	_, p := w.src.(Partitioner)
	return us && p && w.opts.Partitions > 1
}

// partitionable reports whether the claimed job runs as units: a job
// that has a plan always does; a new job does when the worker partitions
// and the job has no organized output and nothing recorded yet.
func (r *jobRun) partitionable() bool {
	if r.cp.Planned {
		return true
	}
	return r.w.partitioning() && r.job.Request.OrganizeOutputBy == "" && len(r.cp.Types) == 0 &&
		len(r.job.Output)+len(r.job.Deleted) == 0
}

// save stores j under the run's claim: the job itself, or for a unit run
// the unit j stands for (see unitJob).
func (r *jobRun) save(ctx context.Context, j *Job) error {
	if r.unit == nil {
		return r.w.store.Update(ctx, j)
	}
	u := r.unit.u.Clone()
	u.Version = j.Version
	u.Output, u.Deleted, u.Errors = j.Output, j.Deleted, j.Errors
	u.Checkpoint = j.Checkpoint
	u.LeaseOwner, u.LeaseExpiresAt, u.Attempts = j.LeaseOwner, j.LeaseExpiresAt, j.Attempts
	u.UpdatedAt = j.UpdatedAt
	u.Failure = j.Failure
	switch j.State {
	case StateQueued:
		u.State = UnitPending
	case StateCompleted:
		u.State = UnitDone
	case StateFailed:
		u.State = UnitFailed
	default:
		u.State = UnitRunning
	}
	if len(r.types) == 1 {
		u.Written = r.types[0].written.Load()
		u.Estimate = r.types[0].estimate.Load()
	}
	if err := r.unit.us.UpdateUnit(ctx, u); err != nil {
		return err
	}
	r.unit.u = u
	j.Version = u.Version
	return nil
}

// load reads the run's job afresh, or for a unit run its unit as a job.
func (r *jobRun) load(ctx context.Context) (*Job, error) {
	if r.unit == nil {
		return r.w.store.Get(ctx, r.id)
	}
	units, err := r.unit.us.Units(ctx, r.id)
	if err != nil {
		return nil, err
	}
	for _, u := range units {
		if u.Key == r.unit.key {
			return unitJob(r.unit.parent, u), nil
		}
	}
	return nil, fmt.Errorf("unit %s/%s: %w", r.id, r.unit.key, ErrNotFound)
}

// unitJob is the job a unit run works on: the parent's request, level and
// times, with the unit's state, claim, checkpoint and files. A closed unit
// (its job ended) reads as a cancelled job: the run stops and leaves the
// files to whoever ended the job.
func unitJob(parent *Job, u *Unit) *Job {
	j := parent.Clone()
	j.Output, j.Deleted, j.Errors = u.Output, u.Deleted, u.Errors
	j.Checkpoint = u.Checkpoint
	j.Version, j.Fence, j.Attempts = u.Version, u.Fence, u.Attempts
	j.LeaseOwner, j.LeaseExpiresAt = u.LeaseOwner, u.LeaseExpiresAt
	j.Failure = u.Failure
	switch u.State {
	case UnitPending:
		j.State = StateQueued
	case UnitRunning:
		j.State = StateRunning
	case UnitDone:
		j.State = StateCompleted
	case UnitFailed:
		j.State = StateFailed
	default:
		j.State = StateCancelled
	}
	return j
}

// unitLoop claims units of partitioned jobs, UnitConcurrency at a time,
// until ctx is done.
func (w *Worker) unitLoop(ctx context.Context) {
	us := w.store.(UnitStore)
	claimLoop(w, ctx, "unit claim", w.opts.UnitConcurrency, w.wakeUnits,
		func(ctx context.Context) (*Unit, error) {
			return us.ClaimUnit(ctx, ClaimParams{Worker: w.opts.ID, Lease: w.opts.Lease, Now: w.opts.Now()})
		}, w.runUnit)
}

// runUnit runs one claimed unit to its end: done, failed, handed back, or
// given up because its claim or its job is gone.
func (w *Worker) runUnit(parent context.Context, u *Unit) {
	claimed := w.opts.Now()
	log := w.log.With(slog.String("job", u.JobID), slog.String("unit", u.Key), slog.String("worker", w.opts.ID))
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	us := w.store.(UnitStore)
	job, err := w.store.Get(ctx, u.JobID)
	if err != nil || job.State.Terminal() {
		// The job ended (its units are closed, so this claim's updates
		// will conflict) or cannot be read now: the unit's lease runs
		// out and the unit is claimed again if its job still runs.
		log.LogAttrs(ctx, slog.LevelDebug, "bulkexport: unit's job unavailable", slog.Any("err", err))
		return
	}
	r := &jobRun{w: w, id: u.JobID, fence: u.Fence, level: job.Level, cancel: cancel,
		unit:      &unitHold{us: us, key: u.Key, parent: job, u: u},
		leaseBase: u.LeaseExpiresAt.Add(-w.opts.Lease), claimedAt: claimed, leaseUntil: claimed.Add(w.opts.Lease)}
	r.job = unitJob(job, u)
	if err := r.restore(); err != nil {
		r.failUnit(ctx, log, &Error{Status: http.StatusInternalServerError, Code: fhirbulk.IssueProcessing, Message: "a unit's checkpoint is unreadable", Err: err})
		return
	}
	if u.Attempts > w.opts.MaxAttempts {
		r.failUnit(ctx, log, &Error{Status: http.StatusInternalServerError, Code: fhirbulk.IssueProcessing,
			Message: fmt.Sprintf("a part of the export was interrupted %d times and was given up", u.Attempts-1)})
		return
	}
	log.LogAttrs(ctx, slog.LevelInfo, "bulkexport: unit running", slog.Int("attempt", u.Attempts))
	err = r.runUnitWork(ctx, u)
	switch {
	case ctx.Err() != nil:
		r.stopped(ctx, log, err)
	case err != nil:
		r.failUnit(ctx, log, err)
	default:
		r.completeUnit(ctx, log)
	}
}

// runUnitWork exports the unit's part of its type.
func (r *jobRun) runUnitWork(ctx context.Context, u *Unit) error {
	// The files the unit's last checkpoint left open are continued
	// (copied) first: the sweep below may remove a committed one.
	defer r.releaseReopened()
	if err := r.reopen(ctx); err != nil {
		return err
	}
	if u.Attempts > 1 {
		// Files an earlier claim of this unit committed but never
		// recorded. Temporary files are left alone: other units' writers
		// have theirs in the same place; the job's completion sweeps them.
		if err := r.sweepOrphans(ctx, false); err != nil {
			return err
		}
	}
	t := newTypeRun(r, u.Type)
	t.stem(u.Key)
	t.partition = u.Partition
	r.types = []*typeRun{t}
	if t.done.Load() {
		return nil
	}
	defer r.startHeartbeat(ctx)()
	return t.export(ctx)
}

// completeUnit verifies the unit's files and records it done.
func (r *jobRun) completeUnit(ctx context.Context, log *slog.Logger) {
	if err := r.verify(ctx); err != nil {
		if ctx.Err() != nil {
			r.stopped(ctx, log, err)
			return
		}
		r.failUnit(ctx, log, err)
		return
	}
	now := r.w.opts.Now()
	err := r.update(ctx, func(j *Job) {
		j.State = StateCompleted
		j.UpdatedAt = now
		// LeaseOwner stays: which worker finished the unit.
		j.LeaseExpiresAt = time.Time{}
	})
	switch {
	case err != nil && ctx.Err() != nil:
		r.stopped(ctx, log, err)
	case err != nil:
		log.LogAttrs(ctx, slog.LevelError, "bulkexport: could not record a unit done", slog.Any("err", err))
	default:
		_ = r.sweepOrphans(context.WithoutCancel(ctx), false)
		r.outcome = outcomeCompleted
		r.w.unitEnd(r.id)
		log.LogAttrs(ctx, slog.LevelInfo, "bulkexport: unit done", slog.Int64("resources", r.types[0].written.Load()))
	}
}

// failUnit records the unit failed, with the outcome its job will fail
// with. The files stay: the coordinator fails the job and removes them.
func (r *jobRun) failUnit(ctx context.Context, log *slog.Logger, cause error) {
	status, oo := failureOutcome(cause)
	now := r.w.opts.Now()
	err := r.update(context.WithoutCancel(ctx), func(j *Job) {
		j.State = StateFailed
		j.Failure = &Failure{Status: status, Outcome: oo}
		j.UpdatedAt = now
		j.LeaseOwner, j.LeaseExpiresAt = "", time.Time{}
	})
	if err != nil {
		log.LogAttrs(context.WithoutCancel(ctx), slog.LevelWarn, "bulkexport: could not record a unit failed", slog.Any("err", err), slog.Any("cause", cause))
		return
	}
	r.outcome = outcomeFailed
	r.w.unitEnd(r.id)
	log.LogAttrs(context.WithoutCancel(ctx), slog.LevelWarn, "bulkexport: unit failed", slog.Int("status", status), slog.Any("err", cause))
}

// unitFailure is the error a coordinator fails its job with when a unit
// failed: the unit's own status and outcome.
type unitFailure struct{ f *Failure }

func (e *unitFailure) Error() string {
	if e.f.Outcome != nil && len(e.f.Outcome.Issue) > 0 {
		return "a part of the export failed: " + e.f.Outcome.Issue[0].Diagnostics
	}
	return "a part of the export failed"
}

// coordinate is a partitioned job's run: store the plan (once per job),
// then follow the units to the end.
func (r *jobRun) coordinate(ctx context.Context, units []*Unit) error {
	us := r.w.store.(UnitStore)
	if !r.cp.Planned {
		if err := r.storePlan(ctx, us, units); err != nil {
			return err
		}
	}
	wakeUp(r.w.wakeUnits)
	// A unit of this job that ends in this process wakes the loop at
	// once; other processes' units are seen at the next tick.
	ended := make(chan struct{}, 1)
	r.w.unitEnded.Store(r.id, ended)
	defer r.w.unitEnded.Delete(r.id)
	t := time.NewTicker(r.w.opts.Heartbeat)
	defer t.Stop()
	gathered := map[string]bool{}
	for {
		units, err := us.Units(ctx, r.id)
		if err == nil {
			done, err := r.gather(ctx, units, gathered)
			if err != nil || done {
				return err
			}
		} else if ctx.Err() == nil {
			// The heartbeat's updates notice an outage that lasts.
			r.w.log.LogAttrs(ctx, slog.LevelDebug, "bulkexport: listing units failed", slog.String("job", r.id), slog.Any("err", err))
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-t.C:
		case <-ended:
		}
	}
}

// unitEnd wakes this worker's coordinator of the job, if it has one.
func (w *Worker) unitEnd(jobID string) {
	if v, ok := w.unitEnded.Load(jobID); ok {
		wakeUp(v.(chan struct{}))
	}
}

// plan asks the Source for the parts of every type. It returns nil when
// no type is split: the job then runs whole, as without a Partitioner.
func (r *jobRun) plan(ctx context.Context, types []string) ([]*Unit, error) {
	p := r.w.src.(Partitioner)
	var units []*Unit
	split := false
	for _, typ := range types {
		q := r.query(typ, "", "")
		tokens, err := p.Partitions(ctx, q, typ, r.w.opts.Partitions)
		if err != nil {
			return nil, &typeError{typ: typ, err: err}
		}
		if len(tokens) > r.w.opts.Partitions {
			return nil, &typeError{typ: typ, err: fmt.Errorf("the source split the type into %d parts, more than the %d allowed", len(tokens), r.w.opts.Partitions)}
		}
		split = split || len(tokens) > 1
		if len(tokens) == 0 {
			tokens = []string{""}
		}
		for i, tok := range tokens {
			units = append(units, &Unit{Key: fmt.Sprintf("%s.p%04d", typ, i+1), Type: typ, Partition: tok, Seq: len(units)})
		}
	}
	if !split {
		return nil, nil
	}
	return units, nil
}

// storePlan stores the units and records that the job has its plan.
func (r *jobRun) storePlan(ctx context.Context, us UnitStore, units []*Unit) error {
	if err := us.AddUnits(ctx, r.id, units); err != nil && !errors.Is(err, ErrAlreadyExists) {
		// An earlier claim that stored the plan but could not record it
		// gives ErrAlreadyExists: its plan stands.
		return err
	}
	return r.update(ctx, func(j *Job) {
		r.cp.Planned = true
		j.Progress = Progress{Percent: 0, Message: fmt.Sprintf("%d parts", len(units))}
	})
}

// gather lists the files of the units that are done in the job (in the
// order they end, for partial manifests), sums their progress, and
// reports whether every unit is done. A failed unit fails the job.
func (r *jobRun) gather(ctx context.Context, units []*Unit, gathered map[string]bool) (bool, error) {
	if len(units) == 0 {
		// The job has a plan, so its units were stored: a store that
		// lost them must not make the job complete empty.
		return false, &Error{Status: http.StatusInternalServerError, Code: fhirbulk.IssueProcessing,
			Message: "the parts of the export are missing from the job store; the export was given up"}
	}
	var fresh []*Unit
	var written, estimate float64
	done := 0
	for _, u := range units {
		switch u.State {
		case UnitFailed:
			f := u.Failure
			if f == nil {
				f = &Failure{Status: http.StatusInternalServerError, Outcome: fhirbulk.NewOutcome(fhirbulk.SeverityFatal, fhirbulk.IssueProcessing, "a part of the export failed")}
			}
			return false, &unitFailure{f: f}
		case UnitDone:
			done++
			if !gathered[u.Key] {
				fresh = append(fresh, u)
			}
		}
		written += float64(u.Written)
		estimate += float64(max(u.Estimate, u.Written))
	}
	pct := float64(int(min(float64(done)/float64(len(units))*100, 99)))
	if estimate > 0 {
		pct = float64(int(min(written/estimate*100, 99)))
	}
	r.unitProgress.Store(&Progress{Percent: pct, Message: fmt.Sprintf("%d of %d parts done", done, len(units))})
	if len(fresh) > 0 {
		var n int
		if err := r.update(ctx, func(j *Job) {
			for _, u := range fresh {
				j.Output = appendNew(j, j.Output, u.Output)
				j.Deleted = appendNew(j, j.Deleted, u.Deleted)
				j.Errors = appendNew(j, j.Errors, u.Errors)
			}
			n = len(j.Output) + len(j.Deleted) + len(j.Errors)
		}); err != nil {
			return false, err
		}
		for _, u := range fresh {
			gathered[u.Key] = true
		}
		if n > r.w.opts.MaxFilesPerJob {
			return false, &Error{Status: http.StatusRequestEntityTooLarge, Code: fhirbulk.IssueTooCostly,
				Message: fmt.Sprintf("the export would need more than %d files; narrow it with _type, _since or _typeFilter", r.w.opts.MaxFilesPerJob)}
		}
	}
	return done == len(units), nil
}
