package bulkexport

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
	"golang.org/x/sync/errgroup"
)

// Why a job run stops early.
var (
	errJobCancelled = errors.New("bulkexport: job cancelled")
	errLeaseLost    = errors.New("bulkexport: lease lost to another worker")
	// errStoreLost: the job store could not be reached for as long as the
	// lease lasts, so the claim must be taken as lost. The run stops
	// without touching the job's files; the job resumes from its last
	// recorded checkpoint once its lease has run out.
	errStoreLost = errors.New("bulkexport: the job store was unreachable for the whole lease")
)

// checkpoint is the engine's resume state, stored in Job.Checkpoint.
type checkpoint struct {
	// Types holds the state of every type that has recorded anything.
	Types map[string]*typeCheckpoint `json:"types,omitempty"`
	// IgnoredRecorded: the lenient-handling issues file is in Errors.
	IgnoredRecorded bool `json:"ignoredRecorded,omitempty"`
	// Planned: the job runs as units, and its plan is stored (see
	// coordinate).
	Planned bool `json:"planned,omitempty"`
}

func (c checkpoint) clone() checkpoint {
	out := c
	out.Types = make(map[string]*typeCheckpoint, len(c.Types))
	for k, v := range c.Types {
		tc := *v
		tc.Open = slices.Clone(v.Open)
		out.Types[k] = &tc
	}
	return out
}

type typeCheckpoint struct {
	// Done: every resource of the type is in recorded files.
	Done bool `json:"done,omitempty"`
	// Cursor is the Source's last recorded cursor.
	Cursor string `json:"cursor,omitempty"`
	// Seq is the next file number of the output, deleted and error streams.
	Seq [3]int `json:"seq"`
	// Written counts the resources in recorded files and in the synced
	// open files of Open.
	Written int64 `json:"written,omitempty"`
	// Open holds, when the Storage is a SyncedOpener, the files that were
	// open at the checkpoint: synced, not committed, and continued by a
	// resumed run (see jobRun.reopen). Their resources are part of the
	// recorded state, as much as those of committed files.
	Open []openFile `json:"open,omitempty"`
}

// openFile is a stream's file that a checkpoint left open (synced, not
// committed).
type openFile struct {
	// Stream is streamOutput, streamDeleted or streamError. The file's
	// number in the stream is the checkpoint's Seq for it.
	Stream int `json:"stream"`
	// Handle identifies the synced file to SyncedOpener.OpenSynced.
	Handle string `json:"handle"`
	// Name is the name it would have been committed under.
	Name string `json:"name"`
	// Count and Size are the resources and bytes synced: the prefix a
	// resumed run continues from.
	Count int64 `json:"count"`
	Size  int64 `json:"size"`
}

// jobRun is one execution of a claimed job.
type jobRun struct {
	w  *Worker
	id string // the job's id, readable without mu
	// fence is the job's Fence as this run claimed it. Every Claim sets a
	// new, larger Fence, so the run owns the job only while the stored job
	// still has this value: another worker, or this same Worker, may claim
	// the job again once the lease has run out (a process paused longer
	// than Lease), and then this run must stop. The files this run writes
	// carry the fence in their names (see FileName).
	fence  int64
	level  fhirbulk.Level // the job's level, readable without mu
	cancel context.CancelCauseFunc

	// The lease clock: the store's clock at the claim (the claimed
	// LeaseExpiresAt less the Lease) and this worker's clock then. The
	// store's now is leaseBase plus the time elapsed since claimedAt.
	leaseBase time.Time
	claimedAt time.Time
	// leaseUntil is, by this worker's clock, when the lease runs out
	// unless renewed: the last successful update plus Lease. Guarded by
	// mu.
	leaseUntil time.Time

	mu  sync.Mutex // guards job and cp; held across store updates
	job *Job
	cp  checkpoint

	types []*typeRun   // every type of the job, in export order
	files atomic.Int64 // files created, for MaxFilesPerJob

	// reopened holds, by type, the files of the last checkpoint's
	// typeCheckpoint.Open that reopen continued, until newTypeRun takes
	// them over.
	reopened map[string]*[3]*reopenedFile

	// outcome is how the run ended (outcomeCompleted, ...), once the store
	// has recorded it; "" when it could not be recorded.
	outcome string

	// unit is set for the run of one unit of a partitioned job: its
	// updates go to the unit (see save and load).
	unit *unitHold
	// partitioned: this job run coordinates units instead of exporting;
	// unitProgress is the progress it last summed from them.
	partitioned  bool
	unitProgress atomic.Pointer[Progress]
	// runCtx is Worker.Run's context: it bounds work that outlives the
	// run (deleteAgain).
	runCtx context.Context
}

func (w *Worker) runJob(parent context.Context, job *Job) {
	claimed := w.opts.Now()
	resumed := !job.StartedAt.IsZero()
	log := jobLogger(w.log, job)
	// The claim moved the job to running: the one log line and count of
	// that transition, before anything can fail it.
	spanCtx, span := w.tel.startJob(parent, job, resumed)
	log.LogAttrs(spanCtx, slog.LevelInfo, "bulkexport: job running", slog.String("worker", w.opts.ID), slog.Bool("resumed", resumed), slog.Int("attempt", job.Attempts))
	ctx, cancel := context.WithCancelCause(spanCtx)
	defer cancel(nil)
	r := &jobRun{w: w, id: job.ID, fence: job.Fence, level: job.Level, cancel: cancel, job: job, runCtx: parent,
		leaseBase: job.LeaseExpiresAt.Add(-w.opts.Lease), claimedAt: claimed, leaseUntil: claimed.Add(w.opts.Lease)}
	defer func() {
		started := r.job.StartedAt
		if started.IsZero() {
			started = claimed
		}
		w.tel.endJob(context.WithoutCancel(spanCtx), span, r, started)
	}()
	if err := r.restore(); err != nil {
		r.fail(ctx, log, &Error{Status: http.StatusInternalServerError, Code: fhirbulk.IssueProcessing, Message: "the job's checkpoint is unreadable", Err: err})
		return
	}
	if job.Attempts > w.opts.MaxAttempts {
		r.fail(ctx, log, &Error{Status: http.StatusInternalServerError, Code: fhirbulk.IssueProcessing,
			Message: fmt.Sprintf("the export was interrupted %d times and was given up", job.Attempts-1)})
		return
	}
	err := r.run(ctx, resumed)
	switch {
	case ctx.Err() != nil:
		r.stopped(ctx, log, err)
	case err != nil:
		r.fail(ctx, log, err)
	default:
		r.complete(ctx, log)
	}
}

// restore reads the checkpoint of the run's job (a unit run's job stands
// for its unit) and counts the files it has recorded, for MaxFilesPerJob.
func (r *jobRun) restore() error {
	j := r.job
	r.files.Store(int64(len(j.Output) + len(j.Deleted) + len(j.Errors)))
	if len(j.Checkpoint) > 0 {
		if err := json.Unmarshal(j.Checkpoint, &r.cp); err != nil {
			return err
		}
	}
	if r.cp.Types == nil {
		r.cp.Types = map[string]*typeCheckpoint{}
	}
	return nil
}

// stopped ends a run whose context is done: its claim was lost, the job
// was cancelled, or the worker is shutting down (the parent context is
// done), and then the job is handed back. err is what stopped the work.
func (r *jobRun) stopped(ctx context.Context, log *slog.Logger, err error) {
	cause := context.Cause(ctx)
	switch {
	case errors.Is(cause, errLeaseLost), errors.Is(cause, errStoreLost):
		r.lost(ctx, log, cause, err)
	case errors.Is(cause, errJobCancelled):
		r.cleanup(ctx, log)
		// The handler that took the DELETE logged the transition.
		log.LogAttrs(context.WithoutCancel(ctx), slog.LevelDebug, "bulkexport: job stopped after cancel")
	default:
		r.release(ctx, log)
	}
}

// lost logs that the run gave its claim up: another worker owns the job
// (why wraps errLeaseLost), or the store could not be reached for the
// whole lease (errStoreLost). err is what stopped the work.
func (r *jobRun) lost(ctx context.Context, log *slog.Logger, why, err error) {
	r.outcome = outcomeLeaseLost
	ctx = context.WithoutCancel(ctx)
	if errors.Is(why, errStoreLost) {
		log.LogAttrs(ctx, slog.LevelWarn, "bulkexport: the job store was unreachable for the whole lease; the job resumes from its last checkpoint", slog.Any("err", err))
		return
	}
	log.LogAttrs(ctx, slog.LevelWarn, "bulkexport: lease lost; another worker owns the job")
}

// run does the work: set up, then export every type.
func (r *jobRun) run(ctx context.Context, resumed bool) error {
	w := r.w
	now := w.opts.Now()
	if err := r.update(ctx, func(j *Job) {
		if j.TransactionTime.IsZero() {
			j.TransactionTime = now
			j.StartedAt = now
		}
		j.Progress = Progress{Percent: 0, Message: "starting"}
		j.UpdatedAt = now
	}); err != nil {
		return err
	}
	// Whatever reopen continued and no type took over is released when
	// the run ends.
	defer r.releaseReopened()
	// The files left open by the last checkpoint are continued (copied)
	// before the sweep, which removes the files they were copied from.
	if err := r.reopen(ctx); err != nil {
		return err
	}
	r.partitioned = r.partitionable()
	// A partitioned job's files are its units' until they end: only its
	// completion sweeps.
	if resumed && !r.partitioned {
		if err := r.sweepOrphans(ctx, true); err != nil {
			return err
		}
	}
	if err := r.recordIgnored(ctx); err != nil {
		return err
	}
	types, err := r.typesToExport(ctx)
	if err != nil {
		return err
	}
	if r.partitioned {
		var units []*Unit
		if !r.cp.Planned {
			if units, err = r.plan(ctx, types); err != nil {
				return err
			}
		}
		if units != nil || r.cp.Planned {
			return r.runCoordinator(ctx, units)
		}
		// No type is split: the job runs whole.
		r.partitioned = false
		if resumed {
			if err := r.sweepOrphans(ctx, true); err != nil {
				return err
			}
		}
	}
	if by := r.job.Request.OrganizeOutputBy; by != "" {
		r.types = append(r.types, newOrganizedRun(r, by, types))
	} else {
		for _, typ := range types {
			r.types = append(r.types, newTypeRun(r, typ))
		}
	}

	defer r.startHeartbeat(ctx)()

	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(w.opts.TypeConcurrency)
	for _, t := range r.types {
		if t.done.Load() {
			continue
		}
		g.Go(func() error { return t.export(gctx) })
	}
	return g.Wait()
}

// reopenedFile is a file that reopen continued for a stream.
type reopenedFile struct {
	fw          FileWriter
	name        string
	count, size int64
}

// errOpenFileLost is the failure of a job whose recorded open file cannot
// be continued.
func errOpenFileLost(err error) error {
	return &Error{Status: http.StatusInternalServerError, Code: fhirbulk.IssueProcessing,
		Message: "a file the export had left open could not be recovered; the export was given up", Err: err}
}

// reopen continues the files that the last recorded checkpoint left open
// (typeCheckpoint.Open): each is copied, up to its recorded size, into a
// new file under this run's fence (SyncedOpener.OpenSynced), which is
// synced and recorded in place of the old one before anything else
// happens, so that the sweep may remove the old file and a crash of this
// run finds the new one. Resources written after the checkpoint lie
// beyond the recorded size: the Source exports them again from the
// cursor. A file that is gone or shorter than recorded fails the job: the
// resources it held are lost, and the export would not be complete.
func (r *jobRun) reopen(ctx context.Context) error {
	r.reopened = map[string]*[3]*reopenedFile{}
	typs := make([]string, 0, len(r.cp.Types))
	for typ, cp := range r.cp.Types {
		if len(cp.Open) > 0 {
			typs = append(typs, typ)
		}
	}
	if len(typs) == 0 {
		return nil
	}
	slices.Sort(typs)
	so, ok := r.w.storage.(SyncedOpener)
	if !ok {
		return errOpenFileLost(errors.New("the job's checkpoint holds open files, and the Storage cannot reopen them"))
	}
	opened := map[string][]openFile{}
	for _, typ := range typs {
		files := &[3]*reopenedFile{}
		r.reopened[typ] = files
		cp := r.cp.Types[typ]
		for _, of := range cp.Open {
			if of.Stream < 0 || of.Stream >= len(files) || files[of.Stream] != nil {
				return errOpenFileLost(fmt.Errorf("%s: bad open file record %+v", typ, of))
			}
			f, handle, err := r.reopenFile(ctx, so, streamStem(r.stemBase(typ), of.Stream), cp.Seq[of.Stream], of)
			if f != nil {
				files[of.Stream] = f
			}
			if err != nil {
				return err
			}
			opened[typ] = append(opened[typ], openFile{Stream: of.Stream, Handle: handle, Name: f.name, Count: of.Count, Size: of.Size})
		}
	}
	return r.update(ctx, func(*Job) {
		for typ, open := range opened {
			r.cp.Types[typ].Open = open
		}
	})
}

// stemBase is what the file names of typ's streams start with: the type,
// or in a unit run the unit's key (see typeRun.stem).
func (r *jobRun) stemBase(typ string) string {
	if r.unit != nil {
		return r.unit.key
	}
	return typ
}

// reopenFile continues one open file of the last checkpoint under a new
// name, and syncs the copy. It returns the new file (also when the sync
// failed, to be released) and the copy's handle.
func (r *jobRun) reopenFile(ctx context.Context, so SyncedOpener, stem string, seq int, of openFile) (*reopenedFile, string, error) {
	name := FileName(stem, seq, r.fence)
	fw, err := so.OpenSynced(ctx, r.id, of.Handle, of.Size, name)
	if errors.Is(err, fs.ErrNotExist) {
		// The run that recorded the file may have committed it, when it
		// filled, and crashed before its next checkpoint recorded that:
		// the synced file is then the committed one.
		fw, err = r.copyCommitted(ctx, of, name)
	}
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, ErrSyncedShort):
		return nil, "", errOpenFileLost(fmt.Errorf("file %s: %w", of.Name, err))
	case err != nil:
		return nil, "", err
	}
	// The file counts against MaxFilesPerJob again: the job lists it
	// only once it is committed.
	r.files.Add(1)
	f := &reopenedFile{fw: fw, name: name, count: of.Count, size: of.Size}
	sw, ok := fw.(SyncWriter)
	if !ok {
		return f, "", errOpenFileLost(fmt.Errorf("file %s: the Storage's reopened writer cannot sync", of.Name))
	}
	handle, err := sw.Sync()
	return f, handle, err
}

// copyCommitted starts the file name with the first of.Size bytes of the
// committed file of.Name: the open file that a crashed run committed (it
// filled) but never recorded as committed. The sweep then removes that
// file, as any other that no checkpoint recorded. A missing file gives an
// error wrapping fs.ErrNotExist, a short one ErrSyncedShort.
func (r *jobRun) copyCommitted(ctx context.Context, of openFile, name string) (FileWriter, error) {
	fr, err := r.w.storage.Open(ctx, r.id, of.Name)
	if err != nil {
		return nil, err
	}
	defer fr.Close()
	if fr.Size() < of.Size {
		return nil, fmt.Errorf("%w: committed %d bytes, recorded %d", ErrSyncedShort, fr.Size(), of.Size)
	}
	fw, err := r.w.storage.Create(ctx, r.id, name)
	if err != nil {
		return nil, err
	}
	if _, err := io.CopyN(fw, fr, of.Size); err != nil {
		_ = fw.Abort()
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("%w: %w", ErrSyncedShort, err)
		}
		return nil, err
	}
	return fw, nil
}

// releaseReopened ends the files that reopen continued and no type took
// over. They may be recorded as open already, so they are released (kept
// for the next run), not aborted.
func (r *jobRun) releaseReopened() {
	for _, files := range r.reopened {
		for _, f := range files {
			if f == nil {
				continue
			}
			if sw, ok := f.fw.(SyncWriter); ok {
				_ = sw.Release()
			} else {
				_ = f.fw.Abort()
			}
		}
	}
	r.reopened = nil
}

// startHeartbeat runs the heartbeat until the function it returns is
// called.
func (r *jobRun) startHeartbeat(ctx context.Context) (stop func()) {
	hbDone := make(chan struct{})
	hbCtx, stopHB := context.WithCancel(ctx)
	go func() {
		defer close(hbDone)
		r.heartbeat(hbCtx)
	}()
	return func() {
		stopHB()
		<-hbDone
	}
}

// runCoordinator runs coordinate under the heartbeat.
func (r *jobRun) runCoordinator(ctx context.Context, units []*Unit) error {
	if _, ok := r.w.store.(UnitStore); !ok {
		return &Error{Status: http.StatusInternalServerError, Code: fhirbulk.IssueProcessing, Message: "the job was split into parts, and its store keeps none"}
	}
	defer r.startHeartbeat(ctx)()
	return r.coordinate(ctx, units)
}

// typesToExport is _type (in the client's order) or every type of the
// level.
func (r *jobRun) typesToExport(ctx context.Context) ([]string, error) {
	req := &r.job.Request
	all, err := r.w.src.ResourceTypes(ctx, r.job.Level)
	if err != nil {
		return nil, err
	}
	if len(req.Types) == 0 {
		return all, nil
	}
	var out []string
	for _, t := range req.Types {
		if slices.Contains(all, t) {
			out = append(out, t)
		}
	}
	return out, nil
}

// update applies fn to the job and saves it. On a version conflict it
// reloads the job: if it is still ours and running, fn is applied again to
// the fresh copy; otherwise the run is stopped (cancelled or lease lost).
func (r *jobRun) update(ctx context.Context, fn func(*Job)) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.updateLocked(ctx, fn)
}

func (r *jobRun) updateLocked(ctx context.Context, fn func(*Job)) error {
	// fn may advance the checkpoint; if the update does not land, the
	// checkpoint must fall back with it, or a later update would record a
	// cursor past files that were never recorded.
	saved := r.cp.clone()
	backoff := 25 * time.Millisecond
	// ambiguous is set once a store error left it unknown whether an
	// attempt landed.
	ambiguous := false
	for conflicts := 0; ; {
		r.cp = saved.clone()
		j := r.job.Clone()
		fn(j)
		if j.State == StateRunning && j.LeaseOwner == r.w.opts.ID {
			// Every update the holder makes renews its lease, on the
			// store's timebase.
			j.LeaseExpiresAt = r.leaseNow().Add(r.w.opts.Lease)
		}
		if b, err := json.Marshal(r.cp); err == nil {
			j.Checkpoint = b
		}
		now := r.w.opts.Now()
		err := r.save(ctx, j)
		if err == nil {
			r.job = j
			r.leaseUntil = now.Add(r.w.opts.Lease)
			return nil
		}
		r.cp = saved
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		if !errors.Is(err, ErrConflict) && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrInvalidTransition) {
			// The store failed (unreachable, restarting, disk full): the
			// update may or may not have landed. Retry until the lease
			// would have run out; a retry of an update that did land meets
			// a version conflict, and is then checked against the fresh
			// copy below (every fn is idempotent on it).
			if werr := r.retryWait(ctx, &backoff); werr != nil {
				if errors.Is(werr, errStoreLost) {
					return fmt.Errorf("%w: %w", errStoreLost, err)
				}
				return werr
			}
			ambiguous = true
			continue
		}
		fresh, gerr := r.load(ctx)
		switch {
		case errors.Is(gerr, ErrNotFound), gerr == nil && fresh.State == StateCancelled:
			r.cancel(errJobCancelled)
			return errJobCancelled
		case gerr != nil:
			if ctx.Err() != nil {
				// The run is stopping (another type failed, the job was
				// cancelled, the worker shuts down): not a store failure.
				return context.Cause(ctx)
			}
			// Could not tell why: try the update again (it counts as a
			// store failure).
			if werr := r.retryWait(ctx, &backoff); werr != nil {
				if errors.Is(werr, errStoreLost) {
					return fmt.Errorf("%w: %w", errStoreLost, gerr)
				}
				return werr
			}
			continue
		case ambiguous && fresh.Fence == r.fence && fresh.State == j.State && j.State != StateRunning:
			// An earlier attempt of this very transition landed before
			// the store failed to say so: no other claim can have moved
			// the job under this run's fence.
			r.job = fresh
			return nil
		case !r.owns(fresh) || conflicts >= 10:
			r.cancel(errLeaseLost)
			return errLeaseLost
		}
		conflicts++
		r.job = fresh
	}
}

// retryWait waits before the next try of a failed store call: *backoff,
// which it then doubles (up to a second), but never past the last moment
// at which a try can still renew the lease (leaseRetryMargin before it
// runs out), so that an outage shorter than the lease does not lose the
// claim. When that moment has passed it cancels the run with errStoreLost
// and returns errStoreLost. Called with r.mu held.
func (r *jobRun) retryWait(ctx context.Context, backoff *time.Duration) error {
	last := r.leaseUntil.Add(-min(r.w.opts.Lease/10, leaseRetryMargin))
	wait := min(*backoff, last.Sub(r.w.opts.Now()))
	if wait <= 0 {
		r.cancel(errStoreLost)
		return errStoreLost
	}
	if err := sleepCtx(ctx, wait); err != nil {
		return err
	}
	*backoff = min(*backoff*2, time.Second)
	return nil
}

// leaseRetryMargin is how long before the lease runs out the last retry of
// a failed store update is made, at most (a tenth of the lease when that
// is less): time for it to land while the lease still holds.
const leaseRetryMargin = 250 * time.Millisecond

// leaseNow is the store's lease clock now, as this run reckons it: the
// store's clock at the claim plus the time elapsed since (see
// JobStore.Claim).
func (r *jobRun) leaseNow() time.Time {
	return r.leaseBase.Add(r.w.opts.Now().Sub(r.claimedAt))
}

// sleepCtx waits d, or less if ctx is done.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// owns reports whether the stored job j still belongs to this run: running
// under this run's claim (its worker and its fence).
func (r *jobRun) owns(j *Job) bool {
	return j.State == StateRunning && j.LeaseOwner == r.w.opts.ID && j.Fence == r.fence
}

// heartbeat saves progress, renews the lease and notices cancels.
func (r *jobRun) heartbeat(ctx context.Context) {
	t := time.NewTicker(r.w.opts.Heartbeat)
	defer t.Stop()
	lastRenew := r.w.opts.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := r.w.opts.Now()
		p := r.progress()
		r.mu.Lock()
		changed := p != r.job.Progress
		r.mu.Unlock()
		if changed || now.Sub(lastRenew) >= r.w.opts.Lease/3 {
			err := r.update(ctx, func(j *Job) {
				j.Progress = p
				j.UpdatedAt = now // the update renews the lease
			})
			if err == nil {
				lastRenew = now
			}
			continue
		}
		j, err := r.load(ctx)
		switch {
		case errors.Is(err, ErrNotFound), err == nil && j.State == StateCancelled:
			r.cancel(errJobCancelled)
		case err == nil && !r.owns(j):
			r.cancel(errLeaseLost)
		}
	}
}

// progress computes the percentage: each type weighs the same, and counts
// in proportion to its estimate when the Source is a Counter.
func (r *jobRun) progress() Progress {
	if r.partitioned {
		if p := r.unitProgress.Load(); p != nil {
			return *p
		}
		return r.job.Progress
	}
	if len(r.types) == 0 {
		return Progress{Percent: 0, Message: "starting"}
	}
	var sum float64
	var active []string
	for _, t := range r.types {
		switch {
		case t.done.Load():
			sum++
		case t.started.Load():
			active = append(active, t.typ)
			if est := t.estimate.Load(); est > 0 {
				sum += min(float64(t.written.Load())/float64(est), 0.99)
			}
		}
	}
	pct := float64(int(min(sum/float64(len(r.types))*100, 99)))
	msg := strings.Join(active, ", ")
	if len(msg) > 80 {
		msg = msg[:77] + "..."
	}
	return Progress{Percent: pct, Message: msg}
}

// sweepOrphans deletes files that earlier runs committed but never
// recorded: a resumed type rewrites everything after its last checkpoint.
// Only files of older claims (a smaller fence in their names) are removed:
// a file with a newer fence belongs to a run that took the job over from
// this one, which must not touch it. With temp set, a Storage that
// implements TempSweeper also drops the uncommitted temporary files that
// crashed runs left behind; the run checks that it still owns the job
// first, since a newer owner's files in progress are temporary too.
func (r *jobRun) sweepOrphans(ctx context.Context, temp bool) error {
	if ts, ok := r.w.storage.(TempSweeper); ok && temp {
		fresh, err := r.load(ctx)
		if err != nil {
			return err
		}
		if !r.owns(fresh) {
			r.cancel(errLeaseLost)
			return errLeaseLost
		}
		if err := ts.SweepTemp(ctx, r.id); err != nil {
			return err
		}
	}
	fd, ok := r.w.storage.(FileDeleter)
	if !ok {
		return nil
	}
	names, err := r.w.storage.List(ctx, r.id)
	if err != nil {
		return err
	}
	r.mu.Lock()
	var orphans []string
	for _, n := range names {
		if r.orphan(n) {
			orphans = append(orphans, n)
		}
	}
	r.mu.Unlock()
	for _, n := range orphans {
		if err := fd.DeleteFile(ctx, r.id, n); err != nil {
			return err
		}
	}
	return nil
}

// orphan reports whether the file n is one sweepOrphans removes: not
// listed, and written by an older claim of this job (or of this unit, for
// a unit run, whose files are those with its key as stem). Once a
// partitioned job has every unit's files listed, whatever else it holds
// is an orphan.
func (r *jobRun) orphan(n string) bool {
	if r.job.hasFile(n) {
		return false
	}
	if r.partitioned {
		return true
	}
	if r.unit != nil && !strings.HasPrefix(n, r.unit.key+".") {
		return false
	}
	fence, _ := FileFence(n)
	return fence < r.fence
}

// recordIgnored writes the lenient-handling issues as the first error file.
func (r *jobRun) recordIgnored(ctx context.Context) error {
	ignored := r.job.Request.Ignored
	if len(ignored) == 0 || r.cp.IgnoredRecorded {
		return nil
	}
	name := FileName("request.error", 0, r.fence)
	fw, err := r.w.storage.Create(ctx, r.id, name)
	if err != nil {
		return err
	}
	var size int64
	for _, is := range ignored {
		b, _ := json.Marshal(fhirbulk.OperationOutcome{ResourceType: "OperationOutcome", Issue: []fhirbulk.Issue{is}})
		b = append(b, '\n')
		if _, err := fw.Write(b); err != nil {
			_ = fw.Abort()
			return err
		}
		size += int64(len(b))
	}
	if err := fw.Commit(); err != nil {
		return err
	}
	return r.update(ctx, func(j *Job) {
		r.cp.IgnoredRecorded = true
		if !j.hasFile(name) {
			j.Errors = append(j.Errors, File{Type: "OperationOutcome", Name: name, Count: int64(len(ignored)), Size: size})
		}
	})
}

// complete marks the job completed, once every file it lists has been
// checked to exist with its recorded size. A job whose files do not check
// out fails instead: a completed export never lists a missing or short
// file.
func (r *jobRun) complete(ctx context.Context, log *slog.Logger) {
	if err := r.verify(ctx); err != nil {
		if ctx.Err() != nil {
			// Cancelled, lease lost or shut down while verifying: the
			// files stay; whoever owns the job next decides.
			r.stopped(ctx, log, err)
			return
		}
		r.fail(ctx, log, err)
		return
	}
	now := r.w.opts.Now()
	err := r.update(ctx, func(j *Job) {
		j.State = StateCompleted
		j.Progress = Progress{Percent: 100, Message: "completed"}
		j.CompletedAt = now
		j.UpdatedAt = now
		j.ExpiresAt = now.Add(r.w.opts.Retention)
		j.LeaseOwner, j.LeaseExpiresAt = "", time.Time{}
		if !j.Request.AllowPartialManifests {
			// Partial manifests may already have listed the files in the
			// order they were recorded; that order must not change.
			sortFiles(j.Output)
			sortFiles(j.Deleted)
			sortFiles(j.Errors)
		}
	})
	switch {
	case errors.Is(err, errJobCancelled):
		r.cleanup(ctx, log)
	case err != nil && ctx.Err() != nil:
		// The claim was lost, or the worker shuts down (the job is
		// handed back).
		r.stopped(ctx, log, err)
	case err != nil:
		log.LogAttrs(ctx, slog.LevelError, "bulkexport: could not record completion", slog.Any("err", err))
	default:
		// Files that stale runs committed after the last sweep are never
		// listed; remove what can be removed now (the purge takes the
		// rest with the job). So are temporary files: those of a
		// partitioned job's units' crashed runs, and those that stale
		// runs released (see SyncWriter.Release). No newer run can own a
		// temporary file of a completed job.
		_ = r.sweepOrphans(context.WithoutCancel(ctx), false)
		if ts, ok := r.w.storage.(TempSweeper); ok {
			_ = ts.SweepTemp(context.WithoutCancel(ctx), r.id)
		}
		r.outcome = outcomeCompleted
		r.w.tel.transition(ctx, StateCompleted, r.level)
		var n int64
		for _, f := range r.job.Output {
			n += f.Count
		}
		log.LogAttrs(ctx, slog.LevelInfo, "bulkexport: job completed", slog.Int("files", len(r.job.Output)), slog.Int64("resources", n),
			slog.Duration("took", now.Sub(r.job.StartedAt)))
	}
}

// verify checks that every file the job lists exists in Storage with the
// size recorded for it.
func (r *jobRun) verify(ctx context.Context) error {
	r.mu.Lock()
	var files []File
	for _, list := range [][]File{r.job.Output, r.job.Deleted, r.job.Errors} {
		files = append(files, list...)
	}
	r.mu.Unlock()
	for _, f := range files {
		if err := ctx.Err(); err != nil {
			return err
		}
		fr, err := r.w.storage.Open(ctx, r.id, f.Name)
		if err != nil {
			return &Error{Status: http.StatusInternalServerError, Code: fhirbulk.IssueProcessing,
				Message: "a file of the export could not be read back; the export was given up", Err: fmt.Errorf("file %s: %w", f.Name, err)}
		}
		size := fr.Size()
		_ = fr.Close()
		if size != f.Size {
			return &Error{Status: http.StatusInternalServerError, Code: fhirbulk.IssueProcessing,
				Message: "a file of the export does not hold what was recorded; the export was given up",
				Err:     fmt.Errorf("file %s: %d bytes, recorded %d", f.Name, size, f.Size)}
		}
	}
	return nil
}

func sortFiles(fs []File) {
	slices.SortFunc(fs, func(a, b File) int { return strings.Compare(a.Name, b.Name) })
}

// fail marks the job failed with an OperationOutcome and removes its files.
func (r *jobRun) fail(ctx context.Context, log *slog.Logger, cause error) {
	status, oo := failureOutcome(cause)
	now := r.w.opts.Now()
	err := r.update(context.WithoutCancel(ctx), func(j *Job) {
		j.Output, j.Deleted, j.Errors = nil, nil, nil // never listed
		j.State = StateFailed
		j.Failure = &Failure{Status: status, Outcome: oo}
		j.Progress.Message = "failed"
		j.CompletedAt = now
		j.UpdatedAt = now
		j.ExpiresAt = now.Add(r.w.opts.Retention)
		j.LeaseOwner, j.LeaseExpiresAt = "", time.Time{}
	})
	if errors.Is(err, errJobCancelled) || errors.Is(err, errLeaseLost) || errors.Is(err, errStoreLost) {
		if errors.Is(err, errJobCancelled) {
			r.cleanup(ctx, log)
		} else {
			// A stale run (its lease ran out while it was stopped) whose
			// work failed: the job is another worker's now.
			r.lost(ctx, log, err, cause)
		}
		return
	}
	ctx = context.WithoutCancel(ctx)
	if err != nil {
		// Not recorded: the job is still running under this claim, and
		// will be taken over once the lease runs out. Its files must stay
		// as they are, since the next run resumes from them.
		log.LogAttrs(ctx, slog.LevelError, "bulkexport: could not record failure; the job will be retried after its lease", slog.Any("err", err), slog.Any("cause", cause))
		return
	}
	log.LogAttrs(ctx, slog.LevelWarn, "bulkexport: job failed", slog.Int("status", status), slog.Any("err", cause))
	r.outcome = outcomeFailed
	r.w.tel.transition(ctx, StateFailed, r.level)
	if err := r.w.storage.Delete(ctx, r.id); err != nil {
		log.LogAttrs(ctx, slog.LevelWarn, "bulkexport: could not remove the files of a failed job", slog.Any("err", err))
	}
	r.deleteAgain()
}

// deleteAgain removes a partitioned job's files once more, a lease after
// it failed or was cancelled: runs of its units in other processes learn
// that their units were closed at their next store update, and may commit
// a file until then; after a lease none of them writes (one that is
// paused for longer leaves orphans, which the purge removes with the
// job). It does nothing for a job that runs whole, whose only writer is
// this run. Worker.Run waits for it, or cancels it when it stops first.
func (r *jobRun) deleteAgain() {
	if !r.partitioned || r.runCtx == nil {
		return
	}
	w := r.w
	w.later.Add(1)
	go func() {
		defer w.later.Done()
		t := time.NewTimer(w.opts.Lease + w.opts.Heartbeat)
		defer t.Stop()
		select {
		case <-t.C:
			_ = w.storage.Delete(context.WithoutCancel(r.runCtx), r.id)
		case <-r.runCtx.Done():
		}
	}()
}

// failureOutcome is the status and outcome a failed job reports. Only an
// *Error's message reaches the client; other errors may carry internal
// detail and are only logged.
func failureOutcome(err error) (int, *fhirbulk.OperationOutcome) {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e.Status, e.Outcome()
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound, fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueNotFound, "a resource the export depends on was not found")
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden, fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueForbidden, "the export is not allowed")
	}
	msg := "the export failed"
	var uf *unitFailure
	if errors.As(err, &uf) {
		return uf.f.Status, uf.f.Outcome.Clone()
	}
	var te *typeError
	if errors.As(err, &te) {
		msg = "the export of " + te.typ + " failed"
	}
	return http.StatusInternalServerError, fhirbulk.NewOutcome(fhirbulk.SeverityFatal, fhirbulk.IssueProcessing, msg)
}

// typeError ties an error to the type whose export raised it.
type typeError struct {
	typ string
	err error
}

func (e *typeError) Error() string { return e.typ + ": " + e.err.Error() }
func (e *typeError) Unwrap() error { return e.err }

// cleanup removes a cancelled job's files.
func (r *jobRun) cleanup(ctx context.Context, log *slog.Logger) {
	r.outcome = outcomeCancelled
	if r.unit != nil {
		// The unit's job ended: whoever ended it removes the files.
		return
	}
	ctx = context.WithoutCancel(ctx)
	if err := r.w.storage.Delete(ctx, r.id); err != nil {
		log.LogAttrs(ctx, slog.LevelWarn, "bulkexport: could not remove the files of a cancelled job", slog.Any("err", err))
	}
	r.deleteAgain()
}

// release hands an interrupted job back to the queue on shutdown; it
// resumes from its last checkpoint.
func (r *jobRun) release(ctx context.Context, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	err := r.update(ctx, func(j *Job) {
		j.State = StateQueued
		// A hand-back is not an attempt: the claim's is returned.
		j.Attempts = max(j.Attempts-1, 0)
		j.LeaseOwner, j.LeaseExpiresAt = "", time.Time{}
		j.Progress.Message = "interrupted; waiting to resume"
		j.UpdatedAt = r.w.opts.Now()
	})
	if errors.Is(err, errJobCancelled) {
		r.cleanup(ctx, log)
		return
	}
	if err != nil {
		log.LogAttrs(ctx, slog.LevelWarn, "bulkexport: could not hand the job back; its lease will expire", slog.Any("err", err))
		return
	}
	r.outcome = outcomeRequeued
	if r.unit != nil {
		return
	}
	r.w.tel.transition(ctx, StateQueued, r.level)
	log.LogAttrs(ctx, slog.LevelInfo, "bulkexport: job handed back on shutdown")
}
