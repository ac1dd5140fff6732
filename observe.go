package bulkexport

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
)

// Observability: the metrics and spans of the Handler and the Worker,
// through the OpenTelemetry API only. The host brings the SDK and the
// exporters (Options.MeterProvider, Options.TracerProvider and the same in
// WorkerOptions); without them every instrument is a no-op. Every name
// below is listed, with its unit, attributes and meaning, in
// docs/observability.md.

// instrumentationScope names the meters and tracers.
const instrumentationScope = "github.com/bulkfhir/bulkexport"

// Metric names.
const (
	metricJobTransitions = "bulkexport.job.transitions"
	metricJobDuration    = "bulkexport.job.duration"
	metricJobsActive     = "bulkexport.jobs.active"
	metricQueueDepth     = "bulkexport.queue.depth"
	metricJobReclaims    = "bulkexport.job.reclaims"
	metricExportRes      = "bulkexport.export.resources"
	metricExportBytes    = "bulkexport.export.bytes"
	metricPollRequests   = "bulkexport.poll.requests"
	metricDownloadBytes  = "bulkexport.download.bytes"
	metricPurgeRuns      = "bulkexport.purge.runs"
	metricPurgedJobs     = "bulkexport.purge.jobs"
)

// Span names.
const (
	spanKickoff  = "bulkexport.kickoff"
	spanJob      = "bulkexport.job"
	spanType     = "bulkexport.export.type"
	spanCommit   = "bulkexport.file.commit"
	spanDownload = "bulkexport.download"
)

// Attribute keys, shared by metrics and spans.
const (
	attrJobID        = attribute.Key("bulkexport.job.id")
	attrClientID     = attribute.Key("bulkexport.client.id")
	attrLevel        = attribute.Key("bulkexport.job.level")
	attrState        = attribute.Key("bulkexport.job.state")
	attrOutcome      = attribute.Key("bulkexport.job.outcome")
	attrAttempt      = attribute.Key("bulkexport.job.attempt")
	attrResumed      = attribute.Key("bulkexport.job.resumed")
	attrType         = attribute.Key("bulkexport.resource.type")
	attrFileKind     = attribute.Key("bulkexport.file.kind")
	attrFileName     = attribute.Key("bulkexport.file.name")
	attrFileRes      = attribute.Key("bulkexport.file.resources")
	attrFileBytes    = attribute.Key("bulkexport.file.bytes")
	attrTypeRes      = attribute.Key("bulkexport.export.resources")
	attrPurgeOutcome = attribute.Key("bulkexport.purge.outcome")
	attrStatusCode   = attribute.Key("http.response.status_code")
	attrSentBytes    = attribute.Key("bulkexport.download.bytes")
)

// Job outcomes (bulkexport.job.outcome).
const (
	outcomeCompleted = "completed"
	outcomeFailed    = "failed"
	outcomeCancelled = "cancelled"
	outcomeRequeued  = "requeued"   // handed back on shutdown (span only)
	outcomeLeaseLost = "lease_lost" // another worker took the job (span only)
)

// fileKinds are the bulkexport.file.kind values of the three streams.
var fileKinds = [3]string{streamOutput: "output", streamDeleted: "deleted", streamError: "error"}

// jobDurationBuckets are the bucket bounds (seconds) advised for
// bulkexport.job.duration: exports take from a second to a day.
var jobDurationBuckets = []float64{1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400}

// activeGaugeLimit caps the List behind the store gauges.
const activeGaugeLimit = 10_000

// telemetry holds the instruments and the tracer of a Handler or Worker.
type telemetry struct {
	tracer trace.Tracer
	traced bool // a real TracerProvider: worth starting spans
	meter  metric.Meter
	// metered: a real MeterProvider, worth wrapping ResponseWriters to
	// read status codes and byte counts.
	metered bool

	transitions   metric.Int64Counter
	duration      metric.Float64Histogram
	reclaims      metric.Int64Counter
	resources     metric.Int64Counter
	bytes         metric.Int64Counter
	polls         metric.Int64ObservableCounter
	downloadBytes metric.Int64Counter
	purgeRuns     metric.Int64Counter
	purgedJobs    metric.Int64Counter
	active        metric.Int64ObservableGauge
	queueDepth    metric.Int64ObservableGauge

	// pollCounts counts status requests by status code; a callback
	// reports them as bulkexport.poll.requests. A poll costs one atomic
	// add, not a synchronous instrument's Add. nil unless metered.
	pollCounts *[1000]atomic.Int64
	// pollReg is that callback's registration, undone by Handler.Close.
	pollReg metric.Registration
}

// newTelemetry creates the instruments. A nil provider means no-op. An
// instrument the provider refuses is logged and replaced by a no-op one.
func newTelemetry(mp metric.MeterProvider, tp trace.TracerProvider, log *slog.Logger) *telemetry {
	t := &telemetry{}
	switch tp.(type) {
	case nil, tracenoop.TracerProvider, *tracenoop.TracerProvider:
		t.tracer = tracenoop.Tracer{}
	default:
		t.tracer, t.traced = tp.Tracer(instrumentationScope), true
	}
	switch mp.(type) {
	case nil, metricnoop.MeterProvider, *metricnoop.MeterProvider:
		mp = metricnoop.MeterProvider{}
	default:
		t.metered = true
	}
	m := mp.Meter(instrumentationScope)
	t.meter = m
	var errs []error
	counter := func(name, unit, desc string) metric.Int64Counter {
		c, err := m.Int64Counter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		if err != nil || c == nil {
			errs = append(errs, err)
			return metricnoop.Int64Counter{}
		}
		return c
	}
	gauge := func(name, unit, desc string) metric.Int64ObservableGauge {
		g, err := m.Int64ObservableGauge(name, metric.WithUnit(unit), metric.WithDescription(desc))
		if err != nil || g == nil {
			errs = append(errs, err)
			return metricnoop.Int64ObservableGauge{}
		}
		return g
	}
	t.transitions = counter(metricJobTransitions, "{transition}",
		"Jobs entering a state, counted by the component that moved them (handler: queued, cancelled; worker: running, completed, failed, queued when handed back).")
	t.reclaims = counter(metricJobReclaims, "{claim}",
		"Claims of a job that had been claimed before (a crashed or stopped worker's job, resumed from its checkpoint).")
	t.resources = counter(metricExportRes, "{resource}",
		"NDJSON lines in committed export files, added per file.")
	t.bytes = counter(metricExportBytes, "By",
		"Bytes of committed export files, added per file.")
	polls, err := m.Int64ObservableCounter(metricPollRequests, metric.WithUnit("{request}"),
		metric.WithDescription("Status requests (GET, HEAD or POST on the status URL) by HTTP status code."))
	if err != nil || polls == nil {
		errs = append(errs, err)
		polls = metricnoop.Int64ObservableCounter{}
	}
	t.polls = polls
	t.downloadBytes = counter(metricDownloadBytes, "By",
		"Bytes of export files sent to clients by the handler (after gzip).")
	t.purgeRuns = counter(metricPurgeRuns, "{run}", "Expiry sweeps, by outcome.")
	t.purgedJobs = counter(metricPurgedJobs, "{job}", "Expired jobs removed with their files, by the state they ended in.")
	t.active = gauge(metricJobsActive, "{job}", "Queued and running jobs in the job store, by state (store-wide, capped at 10000).")
	t.queueDepth = gauge(metricQueueDepth, "{job}", "Jobs a worker could claim now: queued, or running with an expired lease (store-wide, capped at 10000).")
	h, err := m.Float64Histogram(metricJobDuration, metric.WithUnit("s"),
		metric.WithDescription("Time from a job's first start to its completion, failure or cancel."),
		metric.WithExplicitBucketBoundaries(jobDurationBuckets...))
	if err != nil || h == nil {
		errs = append(errs, err)
		h = metricnoop.Float64Histogram{}
	}
	t.duration = h
	if err := errors.Join(errs...); err != nil {
		log.LogAttrs(context.Background(), slog.LevelWarn, "bulkexport: the MeterProvider refused instruments; they are off", slog.Any("err", err))
	}
	return t
}

// pollStatuses are the status codes a status request usually answers
// with; their attribute sets are made once.
var pollStatuses = []int{200, 202, 400, 401, 403, 404, 405, 410, 413, 429, 500, 503}

// initPolls starts counting status requests (a Handler's telemetry): it
// registers the callback that reports the counts, until Handler.Close.
func (t *telemetry) initPolls(log *slog.Logger) {
	if !t.metered {
		return
	}
	counts := new([1000]atomic.Int64)
	opts := map[int]metric.ObserveOption{}
	for _, code := range pollStatuses {
		opts[code] = metric.WithAttributeSet(attribute.NewSet(attrStatusCode.Int(code)))
	}
	reg, err := t.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		for code := range counts {
			n := counts[code].Load()
			if n == 0 {
				continue
			}
			opt, ok := opts[code]
			if !ok {
				opt = metric.WithAttributeSet(attribute.NewSet(attrStatusCode.Int(code)))
			}
			o.ObserveInt64(t.polls, n, opt)
		}
		return nil
	}, t.polls)
	if err != nil {
		log.LogAttrs(context.Background(), slog.LevelWarn, "bulkexport: could not register the poll counter", slog.Any("err", err))
		return
	}
	t.pollCounts = counts
	t.pollReg = reg
}

// transition counts a job entering state.
func (t *telemetry) transition(ctx context.Context, state JobState, level fhirbulk.Level) {
	t.transitions.Add(ctx, 1, metric.WithAttributes(attrState.String(string(state)), attrLevel.String(string(level))))
}

// jobAttrs are the attributes that identify a job in every log line
// about it. The export level's key is export_level, as "level" is the
// log record's own.
func jobAttrs(j *Job) []slog.Attr {
	return []slog.Attr{slog.String("job", j.ID), slog.String("client", j.Owner), slog.String("export_level", string(j.Level))}
}

// jobLogger is log with the job's attributes.
func jobLogger(log *slog.Logger, j *Job) *slog.Logger {
	return log.With(slog.String("job", j.ID), slog.String("client", j.Owner), slog.String("export_level", string(j.Level)))
}

// ---- HTTP side -------------------------------------------------------

// observedWriter records the status code and the body bytes of an answer.
// It forwards io.ReaderFrom, so that downloads keep sendfile, and unwraps
// for http.ResponseController.
type observedWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

var observedPool = sync.Pool{New: func() any { return new(observedWriter) }}

func observe(w http.ResponseWriter) *observedWriter {
	ow := observedPool.Get().(*observedWriter)
	ow.ResponseWriter, ow.status, ow.bytes = w, 0, 0
	return ow
}

func (o *observedWriter) release() {
	o.ResponseWriter = nil
	observedPool.Put(o)
}

func (o *observedWriter) WriteHeader(code int) {
	if o.status == 0 && code >= 200 {
		o.status = code
	}
	o.ResponseWriter.WriteHeader(code)
}

func (o *observedWriter) Write(b []byte) (int, error) {
	if o.status == 0 {
		o.status = http.StatusOK
	}
	n, err := o.ResponseWriter.Write(b)
	o.bytes += int64(n)
	return n, err
}

// ReadFrom keeps the underlying writer's ReadFrom (sendfile) in use.
func (o *observedWriter) ReadFrom(src io.Reader) (int64, error) {
	if o.status == 0 {
		o.status = http.StatusOK
	}
	var n int64
	var err error
	if rf, ok := o.ResponseWriter.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(src)
	} else {
		n, err = io.Copy(struct{ io.Writer }{o.ResponseWriter}, src)
	}
	o.bytes += n
	return n, err
}

// Unwrap lets http.ResponseController reach the real writer.
func (o *observedWriter) Unwrap() http.ResponseWriter { return o.ResponseWriter }

func (o *observedWriter) statusCode() int {
	if o.status == 0 {
		return http.StatusOK
	}
	return o.status
}

// startPoll wraps w to read the status code of a status request, when
// polls are counted. endPoll counts it.
func (t *telemetry) startPoll(w http.ResponseWriter, r *http.Request) http.ResponseWriter {
	if t.pollCounts == nil || r.Method == http.MethodDelete {
		return w
	}
	return observe(w)
}

func (t *telemetry) endPoll(w http.ResponseWriter, r *http.Request) {
	ow, ok := w.(*observedWriter)
	if !ok {
		return
	}
	if code := ow.statusCode(); code >= 0 && code < len(t.pollCounts) {
		t.pollCounts[code].Add(1)
	}
	ow.release()
}

// startKickoff starts the kick-off span, when traced. endKickoff ends it
// with the answer's status code. The span carries the job id once the job
// is stored (see jobQueued).
func (t *telemetry) startKickoff(w http.ResponseWriter, r *http.Request, level fhirbulk.Level) (http.ResponseWriter, *http.Request) {
	if !t.traced {
		return w, r
	}
	ctx, span := t.tracer.Start(r.Context(), spanKickoff, trace.WithAttributes(attrLevel.String(string(level))))
	if !span.IsRecording() {
		return w, r.WithContext(ctx)
	}
	return observe(w), r.WithContext(ctx)
}

func (t *telemetry) endKickoff(w http.ResponseWriter, r *http.Request) {
	if !t.traced {
		return
	}
	span := trace.SpanFromContext(r.Context())
	if ow, ok := w.(*observedWriter); ok {
		endHTTPSpan(span, ow.statusCode())
		ow.release()
	}
	span.End()
}

func endHTTPSpan(span trace.Span, code int) {
	span.SetAttributes(attrStatusCode.Int(code))
	if code >= 500 {
		span.SetStatus(codes.Error, http.StatusText(code))
	}
}

// jobQueued records a kick-off's new job: the transition to queued, and
// the job on the kick-off span.
func (t *telemetry) jobQueued(ctx context.Context, job *Job) {
	t.transition(ctx, StateQueued, job.Level)
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		span.SetAttributes(attrJobID.String(job.ID), attrClientID.String(job.Owner))
	}
}

// startDownload starts the download span (when traced) and wraps w to
// count the bytes sent (when metered or traced). endDownload records both.
func (t *telemetry) startDownload(w http.ResponseWriter, r *http.Request, rest string) (http.ResponseWriter, *http.Request) {
	if !t.traced && !t.metered {
		return w, r
	}
	if t.traced {
		ctx, span := t.tracer.Start(r.Context(), spanDownload)
		if span.IsRecording() {
			// Only names that could be a job's file: the path is the
			// client's, and attributes must stay small.
			if jobID, name, ok := strings.Cut(rest, "/"); ok && validJobID(jobID) && validJobID(name) {
				span.SetAttributes(attrJobID.String(jobID), attrFileName.String(name))
			}
		}
		r = r.WithContext(ctx)
	}
	return observe(w), r
}

func (t *telemetry) endDownload(w http.ResponseWriter, r *http.Request) {
	ow, ok := w.(*observedWriter)
	if !ok {
		return
	}
	ctx := r.Context()
	if t.metered && ow.bytes > 0 {
		t.downloadBytes.Add(ctx, ow.bytes)
	}
	if t.traced {
		span := trace.SpanFromContext(ctx)
		span.SetAttributes(attrSentBytes.Int64(ow.bytes))
		endHTTPSpan(span, ow.statusCode())
		span.End()
	}
	ow.release()
}

// ---- Worker side -----------------------------------------------------

// startJob starts the span of one run of a claimed job and counts the
// claim.
func (t *telemetry) startJob(ctx context.Context, job *Job, resumed bool) (context.Context, trace.Span) {
	t.transition(ctx, StateRunning, job.Level)
	if resumed {
		t.reclaims.Add(ctx, 1, metric.WithAttributes(attrLevel.String(string(job.Level))))
	}
	if !t.traced {
		return ctx, trace.SpanFromContext(ctx)
	}
	return t.tracer.Start(ctx, spanJob, trace.WithNewRoot(), trace.WithAttributes(
		attrJobID.String(job.ID),
		attrClientID.String(job.Owner),
		attrLevel.String(string(job.Level)),
		attrAttempt.Int(job.Attempts),
		attrResumed.Bool(resumed),
	))
}

// endJob records how a run ended: the outcome on its span, and, for a job
// that finished (completed, failed or cancelled), its duration.
func (t *telemetry) endJob(ctx context.Context, span trace.Span, r *jobRun, started time.Time) {
	outcome := r.outcome
	switch outcome {
	case outcomeCompleted, outcomeFailed, outcomeCancelled:
		d := r.w.opts.Now().Sub(started).Seconds()
		t.duration.Record(ctx, max(d, 0), metric.WithAttributes(attrLevel.String(string(r.level)), attrOutcome.String(outcome)))
	}
	if t.traced {
		if outcome != "" {
			span.SetAttributes(attrOutcome.String(outcome))
		}
		if outcome == outcomeFailed || outcome == "" {
			span.SetStatus(codes.Error, "the export failed")
		}
		span.End()
	}
}

// startType starts the span of one type's export.
func (t *telemetry) startType(ctx context.Context, jobID string, level fhirbulk.Level, typ string) (context.Context, trace.Span) {
	if !t.traced {
		return ctx, trace.SpanFromContext(ctx)
	}
	return t.tracer.Start(ctx, spanType, trace.WithAttributes(
		attrJobID.String(jobID), attrLevel.String(string(level)), attrType.String(typ)))
}

func (t *telemetry) endType(span trace.Span, written int64, err error) {
	if !t.traced {
		return
	}
	span.SetAttributes(attrTypeRes.Int64(written))
	if err != nil && !errors.Is(err, errJobCancelled) && !errors.Is(err, errLeaseLost) && !errors.Is(err, context.Canceled) {
		span.RecordError(err)
		span.SetStatus(codes.Error, "the export of the type failed")
	}
	span.End()
}

// fileOpts are the metric attributes of one stream's files.
func (t *telemetry) fileOpts(typ string, kind int) []metric.AddOption {
	if !t.metered {
		return nil
	}
	return []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(attrType.String(typ), attrFileKind.String(fileKinds[kind])))}
}

// startCommit starts the span of one file's commit.
func (t *telemetry) startCommit(ctx context.Context, typ string, kind int, s *stream) trace.Span {
	if !t.traced {
		return nil
	}
	_, span := t.tracer.Start(ctx, spanCommit)
	if span.IsRecording() {
		span.SetAttributes(attrFileName.String(s.name), attrType.String(typ), attrFileKind.String(fileKinds[kind]),
			attrFileRes.Int64(s.count), attrFileBytes.Int64(s.size))
	}
	return span
}

// committed records a file's commit: its lines and bytes (once per file,
// never per resource) and the end of its span.
func (t *telemetry) committed(ctx context.Context, span trace.Span, s *stream, err error) {
	if err == nil && t.metered {
		t.resources.Add(ctx, s.count, s.metricOpts...)
		t.bytes.Add(ctx, s.size, s.metricOpts...)
	}
	if span != nil {
		if err != nil {
			span.RecordError(err)
			span.SetStatus(codes.Error, "commit failed")
		}
		span.End()
	}
}

// purged counts one sweep and the jobs it removed.
func (t *telemetry) purged(ctx context.Context, removed []*Job, err error) {
	outcome := "ok"
	if err != nil {
		outcome = "error"
	}
	t.purgeRuns.Add(ctx, 1, metric.WithAttributes(attrPurgeOutcome.String(outcome)))
	for _, j := range removed {
		t.purgedJobs.Add(ctx, 1, metric.WithAttributes(attrState.String(string(j.State)), attrLevel.String(string(j.Level))))
	}
}

// registerStoreGauges registers the callback of bulkexport.jobs.active and
// bulkexport.queue.depth: one List of the queued and running jobs (at most
// activeGaugeLimit) per collection. Unregister it when the worker stops.
func (t *telemetry) registerStoreGauges(store JobStore, now func() time.Time, log *slog.Logger) metric.Registration {
	if !t.metered {
		return nil
	}
	queued := metric.WithAttributeSet(attribute.NewSet(attrState.String(string(StateQueued))))
	running := metric.WithAttributeSet(attribute.NewSet(attrState.String(string(StateRunning))))
	reg, err := t.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		jobs, err := store.List(ctx, Filter{States: []JobState{StateQueued, StateRunning}, Limit: activeGaugeLimit})
		if err != nil {
			// No observation: a gap in the series rather than a false 0.
			log.LogAttrs(ctx, slog.LevelDebug, "bulkexport: store gauges: list failed", slog.Any("err", err))
			return nil
		}
		var nq, nr, claimable int64
		at := now()
		for _, j := range jobs {
			switch j.State {
			case StateQueued:
				nq++
			case StateRunning:
				nr++
			}
			if Claimable(j, at) {
				claimable++
			}
		}
		o.ObserveInt64(t.active, nq, queued)
		o.ObserveInt64(t.active, nr, running)
		o.ObserveInt64(t.queueDepth, claimable)
		return nil
	}, t.active, t.queueDepth)
	if err != nil {
		log.LogAttrs(context.Background(), slog.LevelWarn, "bulkexport: could not register the store gauges", slog.Any("err", err))
		return nil
	}
	return reg
}

// redacted is err's text for a log line, with the request's credentials
// (the Authorization header's value, and the token in it) blanked out, in
// case a host's error quotes them.
func redacted(r *http.Request, err error) string {
	msg := err.Error()
	for _, v := range r.Header.Values("Authorization") {
		if v = strings.TrimSpace(v); v == "" {
			continue
		}
		msg = strings.ReplaceAll(msg, v, "[REDACTED]")
		if _, cred, ok := strings.Cut(v, " "); ok {
			if cred = strings.TrimSpace(cred); len(cred) >= 4 {
				msg = strings.ReplaceAll(msg, cred, "[REDACTED]")
			}
		}
	}
	return msg
}
