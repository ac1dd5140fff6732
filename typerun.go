package bulkexport

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
	"go.opentelemetry.io/otel/metric"
)

// The three file streams of a type.
const (
	streamOutput = iota
	streamDeleted
	streamError
)

// typeRun exports one resource type of a job. It is the ResourceWriter the
// Source writes to: three NDJSON streams (output, deleted, error) whose
// files are committed as they fill, and recorded in the job at each
// checkpoint and at the end.
type typeRun struct {
	r   *jobRun
	typ string // the type, or organizedKey for organized output
	ctx context.Context

	// Organized output (organizeOutputBy): the organizing type and the
	// types a block may hold.
	by      string
	allowed map[string]bool

	// partition is the Source's token of a unit's part (Query.Partition).
	partition string

	streams [3]stream
	scratch []byte
	n       int // Write calls, to check ctx now and then

	lastCheckpoint time.Time

	started  atomic.Bool
	done     atomic.Bool
	written  atomic.Int64 // resources written (recorded or not)
	estimate atomic.Int64
}

var _ BlockWriter = (*typeRun)(nil)

// organizedKey names the single run of an organized export in checkpoints
// and file names.
const organizedKey = "organized"

// newOrganizedRun returns the run of an organizeOutputBy export: one
// stream of resource blocks holding every type.
func newOrganizedRun(r *jobRun, by string, types []string) *typeRun {
	t := newTypeRun(r, organizedKey)
	t.by = by
	t.allowed = map[string]bool{by: true}
	for _, typ := range types {
		t.allowed[typ] = true
	}
	t.streams[streamOutput].fileType = ""
	return t
}

func newTypeRun(r *jobRun, typ string) *typeRun {
	t := &typeRun{r: r, typ: typ}
	cp := r.cp.Types[typ]
	if cp == nil {
		cp = &typeCheckpoint{}
		r.cp.Types[typ] = cp
	}
	t.done.Store(cp.Done)
	t.written.Store(cp.Written)
	t.streams[streamOutput] = stream{fileType: typ}
	t.streams[streamDeleted] = stream{fileType: "Bundle"}
	t.streams[streamError] = stream{fileType: "OperationOutcome"}
	var reopened [3]*reopenedFile
	if p := r.reopened[typ]; p != nil {
		reopened = *p
		delete(r.reopened, typ)
	}
	for i := range t.streams {
		s := &t.streams[i]
		s.stem, s.seq, s.kind = streamStem(typ, i), cp.Seq[i], i
		s.metricOpts = r.w.tel.fileOpts(typ, i)
		if f := reopened[i]; f != nil {
			// The file the last checkpoint left open, continued by
			// jobRun.reopen: the stream goes on writing to it.
			s.fw, s.name, s.count, s.size, s.synced = f.fw, f.name, f.count, f.size, true
		}
	}
	return t
}

// streamStem is the file name stem (see FileName) of a type's stream.
func streamStem(typ string, kind int) string {
	switch kind {
	case streamDeleted:
		return typ + ".deleted"
	case streamError:
		return typ + ".error"
	}
	return typ
}

// stem names the type's files after key (a unit's key) instead of the
// type.
func (t *typeRun) stem(key string) {
	t.streams[streamOutput].stem = key
	t.streams[streamDeleted].stem = key + ".deleted"
	t.streams[streamError].stem = key + ".error"
}

// export runs the Source for this type and records the result.
func (t *typeRun) export(ctx context.Context) (err error) {
	// The type's span is in the context the Source gets, so that the
	// host's own spans (database queries) nest under it.
	ctx, span := t.r.w.tel.startType(ctx, t.r.id, t.r.level, t.typ)
	t.ctx = ctx
	t.started.Store(true)
	t.lastCheckpoint = t.r.w.opts.Now()
	written := t.written.Load()
	defer func() {
		if err != nil {
			for i := range t.streams {
				t.streams[i].stop()
			}
		}
		t.r.w.tel.endType(span, t.written.Load()-written, err)
	}()
	q := t.query()
	var err2 error
	if t.by != "" {
		org, _ := t.r.w.src.(Organizer)
		if org == nil {
			return &Error{Status: 400, Code: fhirbulk.IssueNotSupported, Param: "organizeOutputBy", Message: "the source cannot organize output"}
		}
		types := make([]string, 0, len(t.allowed))
		for typ := range t.allowed {
			types = append(types, typ)
		}
		slices.Sort(types)
		err2 = org.ExportBlocks(ctx, q, t.by, types, t)
	} else {
		// The estimate is for progress only: it is taken beside the
		// export, not before it, and given up when the export ends first.
		stopCount := t.count(ctx, q)
		err2 = t.r.w.src.Export(ctx, q, t.typ, t)
		stopCount()
	}
	if err := err2; err != nil {
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		return &typeError{typ: t.typ, err: err}
	}
	if err := ctx.Err(); err != nil {
		return context.Cause(ctx)
	}
	if err := t.record(ctx, "", true); err != nil {
		return err
	}
	t.done.Store(true)
	return nil
}

// count asks a Counter Source for the type's estimate on a goroutine of
// its own; the function it returns cancels the count if it still runs and
// waits for it.
func (t *typeRun) count(ctx context.Context, q *Query) (stop func()) {
	c, ok := t.r.w.src.(Counter)
	if !ok {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	cq := *q
	go func() {
		defer close(done)
		if n, err := c.Count(ctx, &cq, t.typ); err == nil && ctx.Err() == nil {
			t.estimate.Store(n)
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

func (t *typeRun) query() *Query {
	t.r.mu.Lock()
	defer t.r.mu.Unlock()
	return t.r.queryLocked(t.typ, t.r.cp.Types[t.typ].Cursor, t.partition)
}

// query is what Export gets for typ (from cursor, in partition).
func (r *jobRun) query(typ, cursor, partition string) *Query {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.queryLocked(typ, cursor, partition)
}

func (r *jobRun) queryLocked(typ, cursor, partition string) *Query {
	j := r.job
	req := &j.Request
	q := &Query{
		JobID:                 j.ID,
		Owner:                 j.Owner,
		Level:                 j.Level,
		GroupID:               j.GroupID,
		Patients:              req.Patients,
		Since:                 req.Since,
		Until:                 req.Until,
		TypeFilters:           req.FiltersFor(typ),
		Elements:              req.ElementsFor(typ),
		IncludeAssociatedData: req.IncludeAssociatedData,
		TransactionTime:       j.TransactionTime,
		Cursor:                cursor,
		Partition:             partition,
	}
	return q
}

// Write implements ResourceWriter.
func (t *typeRun) Write(resource []byte) error {
	if t.n++; t.n&255 == 0 {
		if err := t.ctx.Err(); err != nil {
			return context.Cause(t.ctx)
		}
	}
	if t.allowed == nil && t.r.w.opts.TrustSource {
		return t.writeTrusted(resource)
	}
	want := t.typ
	if t.allowed != nil {
		want = "organized output"
	}
	line, compacted, err := checkResourceIn(resource, want, t.allowed, t.scratch)
	if err != nil {
		return t.Issue(fhirbulk.Issue{Severity: fhirbulk.SeverityError, Code: fhirbulk.IssueStructure,
			Diagnostics: fmt.Sprintf("a %s resource was left out: %v", t.typ, err)})
	}
	if compacted {
		t.scratch = line[:0] // reuse the compaction buffer
	}
	if err := t.streams[streamOutput].write(t, line); err != nil {
		return err
	}
	t.written.Add(1)
	return nil
}

// writeTrusted writes a resource of a trusted Source (see
// WorkerOptions.TrustSource): only what keeps the file NDJSON is checked.
func (t *typeRun) writeTrusted(resource []byte) error {
	n := len(resource)
	if n < 2 || resource[0] != '{' || resource[n-1] != '}' || bytes.IndexByte(resource, '\n') >= 0 || bytes.IndexByte(resource, '\r') >= 0 {
		return t.Issue(fhirbulk.Issue{Severity: fhirbulk.SeverityError, Code: fhirbulk.IssueStructure,
			Diagnostics: fmt.Sprintf("a %s resource was left out: not one line of a JSON object", t.typ)})
	}
	if err := t.streams[streamOutput].write(t, resource); err != nil {
		return err
	}
	t.written.Add(1)
	return nil
}

// StartBlock implements BlockWriter: it writes the block's header, and
// starts a new file first when the current one is nearly full, so that
// blocks are split across files only when one block alone is too big.
func (t *typeRun) StartBlock(ref string) error {
	if t.by == "" {
		return errors.New("bulkexport: StartBlock outside an organized export")
	}
	typ, id, ok := strings.Cut(ref, "/")
	if !ok || !validTypeName(typ) || !validID(id) {
		return fmt.Errorf("bulkexport: StartBlock: %q is not a Type/id reference", ref)
	}
	s := &t.streams[streamOutput]
	opts := &t.r.w.opts
	if s.fw != nil && (s.count*10 >= opts.MaxFileResources*9 || s.size*10 >= opts.MaxFileBytes*9) {
		if err := s.commit(t); err != nil {
			return err
		}
	}
	h := make([]byte, 0, 120)
	h = append(h, `{"resourceType":"Parameters","parameter":[{"name":"header","valueReference":{"reference":`...)
	h = strconv.AppendQuote(h, ref)
	h = append(h, `}}]}`...)
	s.header = nil
	if err := s.write(t, h); err != nil {
		return err
	}
	s.header = h
	return nil
}

// Deleted implements ResourceWriter.
func (t *typeRun) Deleted(id string, at time.Time) error {
	if !validID(id) {
		return t.Issue(fhirbulk.Issue{Severity: fhirbulk.SeverityWarning, Code: fhirbulk.IssueValue,
			Diagnostics: fmt.Sprintf("a deleted %s with the invalid id %q was left out", t.typ, id)})
	}
	b := make([]byte, 0, 160)
	b = append(b, `{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"DELETE","url":`...)
	b = strconv.AppendQuote(b, t.typ+"/"+id)
	b = append(b, `}`...)
	if !at.IsZero() {
		b = append(b, `,"response":{"status":"204","lastModified":`...)
		b = strconv.AppendQuote(b, fhirbulk.FormatInstant(at))
		b = append(b, `}`...)
	}
	b = append(b, `}]}`...)
	return t.streams[streamDeleted].write(t, b)
}

// Issue implements ResourceWriter.
func (t *typeRun) Issue(issue fhirbulk.Issue) error {
	b, err := json.Marshal(fhirbulk.OperationOutcome{ResourceType: "OperationOutcome", Issue: []fhirbulk.Issue{issue}})
	if err != nil {
		return err
	}
	return t.streams[streamError].write(t, b)
}

// Checkpoint implements ResourceWriter.
func (t *typeRun) Checkpoint(cursor string) error {
	if err := t.ctx.Err(); err != nil {
		return context.Cause(t.ctx)
	}
	if cursor == "" {
		return nil
	}
	now := t.r.w.opts.Now()
	if now.Sub(t.lastCheckpoint) < t.r.w.opts.CheckpointInterval {
		return nil
	}
	t.lastCheckpoint = now
	return t.record(t.ctx, cursor, false)
}

// record records every committed file in the job, with the cursor to
// resume from (or done at the end). At the end it commits the open files
// first. At a checkpoint it syncs them instead and records them as open
// (see typeCheckpoint.Open), so that files are cut by the size limits
// only; a Storage that cannot sync (not a SyncedOpener, or its writer not
// a SyncWriter) gets them committed, as at the end.
func (t *typeRun) record(ctx context.Context, cursor string, done bool) error {
	_, canReopen := t.r.w.storage.(SyncedOpener)
	var open []openFile
	for i := range t.streams {
		s := &t.streams[i]
		// A checkpoint falls between resource blocks: a file cut after
		// it starts with a new block.
		s.header = nil
		if sw, ok := s.fw.(SyncWriter); ok && canReopen && !done {
			handle, err := sw.Sync()
			if err != nil {
				return err
			}
			s.synced = true
			open = append(open, openFile{Stream: i, Handle: handle, Name: s.name, Count: s.count, Size: s.size})
			continue
		}
		if err := s.commit(t); err != nil {
			return err
		}
	}
	written := t.written.Load()
	err := t.r.update(ctx, func(j *Job) {
		cp := t.r.cp.Types[t.typ]
		cp.Cursor = cursor
		cp.Done = done
		cp.Written = written
		cp.Open = open
		for i := range t.streams {
			cp.Seq[i] = t.streams[i].seq
		}
		// A retried update may find its files already listed (the first
		// try landed, its answer was lost): list each file once.
		j.Output = appendNew(j, j.Output, t.streams[streamOutput].pending)
		j.Deleted = appendNew(j, j.Deleted, t.streams[streamDeleted].pending)
		j.Errors = appendNew(j, j.Errors, t.streams[streamError].pending)
	})
	if err != nil {
		return err
	}
	for i := range t.streams {
		t.streams[i].pending = t.streams[i].pending[:0]
	}
	return nil
}

// appendNew appends to list the files of add that j does not list yet.
func appendNew(j *Job, list, add []File) []File {
	for _, f := range add {
		if !j.hasFile(f.Name) {
			list = append(list, f)
		}
	}
	return list
}

// stream is a sequence of NDJSON files of one kind.
type stream struct {
	fileType   string
	stem       string // the file names' stem (see FileName)
	seq        int
	kind       int                // streamOutput, streamDeleted or streamError
	metricOpts []metric.AddOption // attributes of the file metrics

	fw    FileWriter
	name  string
	count int64
	size  int64
	// synced: fw has been synced (SyncWriter) and a recorded checkpoint
	// may name it, so a run that stops releases it instead of aborting.
	synced bool

	pending []File // committed, not yet recorded in the job

	// header is the current resource block's header line (organized
	// output): a file that starts in the middle of a block repeats it, and
	// the previous file names the new one in ContinuesIn.
	header []byte
}

var newline = []byte{'\n'}

func (s *stream) write(t *typeRun, line []byte) error {
	opts := &t.r.w.opts
	continued := false
	if s.fw != nil && (s.count >= opts.MaxFileResources || s.size+int64(len(line))+1 > opts.MaxFileBytes) {
		if err := s.commit(t); err != nil {
			return err
		}
		continued = s.header != nil
	}
	if s.fw == nil {
		if n := t.r.files.Add(1); n > int64(opts.MaxFilesPerJob) {
			return &Error{Status: http.StatusRequestEntityTooLarge, Code: fhirbulk.IssueTooCostly,
				Message: fmt.Sprintf("the export would need more than %d files; narrow it with _type, _since or _typeFilter", opts.MaxFilesPerJob)}
		}
		s.seq++
		name := FileName(s.stem, s.seq, t.r.fence)
		fw, err := t.r.w.storage.Create(t.ctx, t.r.id, name)
		if err != nil {
			return err
		}
		s.fw, s.name = fw, name
		if continued {
			s.pending[len(s.pending)-1].ContinuesIn = name
		}
		if s.header != nil {
			if err := s.put(s.header); err != nil {
				return err
			}
		}
	}
	return s.put(line)
}

// put appends one line to the open file.
func (s *stream) put(line []byte) error {
	if _, err := s.fw.Write(line); err != nil {
		return err
	}
	if _, err := s.fw.Write(newline); err != nil {
		return err
	}
	s.count++
	s.size += int64(len(line)) + 1
	return nil
}

// commit makes the open file final and queues it for recording.
func (s *stream) commit(t *typeRun) error {
	if s.fw == nil {
		return nil
	}
	fw := s.fw
	s.fw, s.synced = nil, false
	tel := t.r.w.tel
	span := tel.startCommit(t.ctx, t.typ, s.kind, s)
	err := fw.Commit()
	tel.committed(t.ctx, span, s, err)
	if err != nil {
		_ = fw.Abort()
		return err
	}
	s.pending = append(s.pending, File{Type: s.fileType, Name: s.name, Count: s.count, Size: s.size})
	s.count, s.size = 0, 0
	return nil
}

// stop ends the open file of a run that stops before the end of its type.
// A file that a checkpoint may have recorded as open is released, not
// aborted: the next run of the job continues it (and a failed job's
// files are deleted with the job anyway).
func (s *stream) stop() {
	if s.fw == nil {
		return
	}
	if sw, ok := s.fw.(SyncWriter); ok && s.synced {
		_ = sw.Release()
	} else {
		_ = s.fw.Abort()
	}
	s.fw, s.synced = nil, false
}
