package bulkexport

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// TypeLister says which resource types each level exports. Every Source is
// one; a host that runs exports its own way can implement just this.
type TypeLister interface {
	ResourceTypes(ctx context.Context, level fhirbulk.Level) ([]string, error)
}

// GroupChecker is an optional interface of a TypeLister (or Source): it
// resolves a Group at kick-off, so that an unknown Group gets 404 at once
// rather than a failed job later. It returns an error wrapping ErrNotFound
// for an unknown group.
type GroupChecker interface {
	CheckGroup(ctx context.Context, groupID string) error
}

// TypeFilterChecker is an optional interface of a TypeLister (or Source):
// it rejects _typeFilter searches the host cannot run, so that they get 400
// (or are ignored under lenient handling) instead of being silently dropped.
type TypeFilterChecker interface {
	CheckTypeFilter(typ string, query url.Values) error
}

// AssociatedDataLister is an optional interface of a TypeLister (or
// Source): the includeAssociatedData codes its exports honour, such as
// AssociatedLatestProvenance and AssociatedRelevantProvenance. Requested
// codes reach the Source in Query.IncludeAssociatedData.
type AssociatedDataLister interface {
	AssociatedData() []string
}

// DeletePolicy is what DELETE on the status URL does to a job that has
// already finished (completed or failed). Queued and running jobs are
// cancelled under either policy.
type DeletePolicy int

const (
	// DeleteFinishedNotFound is the eHealth profile: 404 with an
	// OperationOutcome, and the job and its files stay until they expire.
	// It is the rule of the eHealth $export-poll-status operation and of
	// HAPI FHIR, so clients written against eHealth or HAPI servers expect
	// it. It is the default.
	DeleteFinishedNotFound DeletePolicy = iota
	// DeleteFinishedRemoves is the HL7 IG profile: 202, and the job and its
	// files are removed (later polls get 404). The IG lets a client signal
	// with DELETE that it has what it needs. Conformance kits (Inferno's
	// bulk-data-test-kit) DELETE right after a kick-off and want 202 even
	// when a fast server has already finished the job: choose this profile
	// for them.
	DeleteFinishedRemoves
)

// StatusURLStyle picks the form of the status URL the kick-off returns in
// Content-Location. Both forms are always served.
type StatusURLStyle int

const (
	// StatusQuery is [base]/$export-poll-status?_jobId={id} (the default,
	// the eHealth operation's form).
	StatusQuery StatusURLStyle = iota
	// StatusPath is [base]/$export-poll-status/{id}.
	StatusPath
)

// Options configures a Handler. Only BaseURL is required; every other field
// has the default its comment gives.
type Options struct {
	// BaseURL is the absolute FHIR base URL the handler answers under, such
	// as "https://fhir.example.org/fhir". Content-Location, manifest and file
	// URLs are built from it, never from the request's Host.
	BaseURL string

	// Types lists the resource types per level and validates _type. A
	// Source fits. Its optional interfaces (GroupChecker,
	// TypeFilterChecker, AssociatedDataLister, the OrganizeTypes of an
	// Organizer) are listed in the package documentation, "Optional Source
	// interfaces". Default: nil, which accepts any well-formed type name.
	Types TypeLister

	// Authenticate returns the client id of a request. An error wrapping
	// ErrUnauthorized gives 401; other errors go through ErrorMapper.
	// Every endpoint calls it, and a job is visible only to the client id
	// that created it. Default: nil, every request is the anonymous client
	// "".
	Authenticate func(r *http.Request) (clientID string, err error)

	// Authorize decides whether a client may start the export req (for
	// example against its scopes). An error wrapping ErrForbidden gives 403.
	// Default: nil, everything is allowed.
	Authorize func(ctx context.Context, clientID string, level fhirbulk.Level, groupID string, req *Request) error

	// ErrorMapper turns errors into HTTP answers. Default: DefaultErrorMapper.
	ErrorMapper ErrorMapper

	// RetryAfter is the Retry-After policy for in-progress polls. Default:
	// DefaultRetryAfter.
	RetryAfter func(job *Job, now time.Time) time.Duration

	// DeletePolicy for finished jobs. Default: DeleteFinishedNotFound.
	DeletePolicy DeletePolicy

	// StatusURLStyle picks the Content-Location form. Default: StatusQuery.
	StatusURLStyle StatusURLStyle

	// AllowMissingRespondAsync accepts a kick-off without
	// "Prefer: respond-async" (and processes it asynchronously anyway).
	// Default: false, which answers 400 like the eHealth server.
	AllowMissingRespondAsync bool

	// RequiresAccessToken is the manifest's requiresAccessToken. Default:
	// nil, which means true when Authenticate is set.
	RequiresAccessToken *bool

	// AssociatedData lists the includeAssociatedData codes accepted at
	// kick-off and passed on to the Source, on top of those a Types that
	// implements AssociatedDataLister declares. Default: none; any other
	// value gets 400 (or is ignored under lenient handling).
	AssociatedData []string

	// ManifestVersion picks the manifest's shape. Default: ManifestSTU3
	// (the STU2/STU3 shape Inferno and most clients read).
	ManifestVersion ManifestVersion

	// ManifestPageSize is how many output[] entries one manifest page
	// holds when the client sent allowPartialManifests=true; further files
	// are reached through link[] "next". Default: 1000.
	ManifestPageSize int

	// DisableSeparateExportStatus ignores Prefer: separate-export-status
	// (STU3). Default: false, the preference is honoured.
	DisableSeparateExportStatus bool

	// MaxBodyBytes caps a POST kick-off or status body. Default: 1 MiB.
	MaxBodyBytes int64

	// MaxActiveJobsPerClient caps the queued and running jobs of one
	// client; a kick-off beyond it gets 429 with Retry-After. Default: 10;
	// negative means no cap.
	MaxActiveJobsPerClient int

	// MaxFinishedJobsPerClient caps the finished (completed, failed or
	// cancelled) jobs kept for one client. A kick-off that takes a client
	// past it expires that client's oldest finished jobs at once: their
	// polls answer 404 and the Worker's purge removes them and their
	// files. Default: DefaultMaxFinishedJobsPerClient; negative means no
	// cap.
	MaxFinishedJobsPerClient int

	// ReuseInFlight answers a kick-off that repeats one of the same
	// client's queued or running jobs exactly (same level, group and
	// parameters) with that job's status URL instead of starting a second
	// export. Default: false.
	ReuseInFlight bool

	// PollLimit rate-limits status requests per client and job; nil means
	// no limit. See PollLimit.
	PollLimit *PollLimit

	// MaxParamLength caps the length of one kick-off parameter value, in
	// bytes. Default: 8 KiB.
	MaxParamLength int

	// MaxParamValues caps the values of one repeated kick-off parameter
	// (_type, _typeFilter, patient, ...). Default: 1000.
	MaxParamValues int

	// FinishedJobCache keeps a completed job in memory this long after a
	// poll read it, so that the following polls of that job are answered
	// without the JobStore. A completed job does not change in the store
	// except when it is removed (DELETE under DeleteFinishedRemoves, the
	// purge) or expired early (MaxFinishedJobsPerClient): the handler
	// drops its entry when it does either itself, and never serves one
	// past the job's ExpiresAt, but a removal or early expiry made by
	// another replica is seen only once the entry's time is up. So with
	// several replicas behind one URL, a poll may still get a completed
	// job's manifest for up to this long after another replica removed
	// the job. At most 10,000 jobs are kept. Default: 0, off.
	FinishedJobCache time.Duration

	// CancelledRetention is how long a cancelled job's record is kept (so
	// that polls keep answering 404 "cancelled" rather than "unknown")
	// before the purge removes it. Default: 24h.
	CancelledRetention time.Duration

	// Storage serves the files for download and removes them when the
	// DeletePolicy says so. Default: nil, files are not served by this
	// handler.
	Storage Storage

	// Downloads picks how clients get the files: DownloadProxy (the
	// handler streams them), DownloadSigned (the manifest lists presigned
	// Storage URLs; requiresAccessToken is false) or DownloadRedirect (the
	// handler's file URLs answer 307 to a presigned URL). The last two need
	// a Storage that implements URLSigner. Default: DownloadProxy.
	Downloads DownloadMode

	// SignedURLExpiry is how long a presigned URL works (DownloadSigned and
	// DownloadRedirect). Default: DefaultSignedURLExpiry (5 minutes, the
	// SMART limit for tokens, which capability URLs follow).
	SignedURLExpiry time.Duration

	// SigningKeys, when set (under DownloadProxy), make the manifest list
	// the handler's own file URLs signed with HMAC-SHA256 and an expiry
	// (SignedURLExpiry): each works without a token, for its one file,
	// until it expires, and requiresAccessToken is false. The first key
	// signs; every key verifies, so keys can be rotated. A tampered,
	// expired or misapplied signature gets 403. Default: none.
	SigningKeys []SigningKey

	// OnQueued, if set, is called after a kick-off has stored a new job,
	// for instance with a Worker's Notify so that the job starts at once.
	// It must not block.
	OnQueued func(jobID string)

	// Now is the clock. Default: time.Now.
	Now func() time.Time

	// Logger receives the handler's logs. Every line about a job carries
	// its id (job), client (client) and export level (export_level); no
	// line is written per poll or download below Error, and none carries
	// a token, an Authorization header or a signed URL. Default:
	// slog.Default().
	Logger *slog.Logger

	// MeterProvider receives the handler's metrics: job transitions
	// (queued, cancelled), status requests by status code and download
	// bytes. NewHandler registers a callback that reports the status
	// request counts; it lives as long as the provider. See
	// docs/observability.md. Default: nil, no metrics.
	MeterProvider metric.MeterProvider

	// TracerProvider receives the handler's spans: one per kick-off and
	// per download, children of the request context's span. Default: nil,
	// no spans.
	TracerProvider trace.TracerProvider
}

// Handler serves the bulk export protocol: kick-off, status, cancel and
// file download. Create it with NewHandler; it is an http.Handler that can
// be mounted under any prefix.
type Handler struct {
	store    JobStore
	opts     Options
	base     string // BaseURL without a trailing slash
	basePath string // the path of BaseURL, without a trailing slash
	// basePattern is basePath unescaped, as ServeMux patterns are written.
	basePattern string
	mapErr      ErrorMapper
	now         func() time.Time
	log         *slog.Logger
	token       bool
	polls       *pollLimiter   // nil when polls are not limited
	finished    *finishedCache // nil unless Options.FinishedJobCache
	signer      URLSigner      // signs download URLs; nil under plain DownloadProxy
	tel         *telemetry
	closed      sync.Once
}

// Close releases what the Handler registered with Options.MeterProvider
// (the callback that reports the poll counts), so that a host that makes
// and drops handlers (tests, reconfiguration) over one MeterProvider does
// not keep reporting through dropped ones. It does not stop the Handler
// from serving. Safe to call more than once, and without a MeterProvider.
func (h *Handler) Close() error {
	var err error
	h.closed.Do(func() {
		if h.tel.pollReg != nil {
			err = h.tel.pollReg.Unregister()
		}
	})
	return err
}

// NewHandler returns a Handler over store. It fails when opts.BaseURL is
// not an absolute http(s) URL, or when opts.Downloads needs a URLSigner
// that opts.Storage is not.
func NewHandler(store JobStore, opts *Options) (*Handler, error) {
	if store == nil {
		return nil, errNilStore
	}
	var o Options
	if opts != nil {
		o = *opts
	}
	o.fill()
	if err := o.validate(); err != nil {
		return nil, err
	}
	u, _ := url.Parse(o.BaseURL) // validate parsed it
	h := &Handler{
		store:       store,
		opts:        o,
		base:        strings.TrimSuffix(o.BaseURL, "/"),
		basePath:    strings.TrimSuffix(u.EscapedPath(), "/"),
		basePattern: patternPath(u),
		mapErr:      o.ErrorMapper,
		now:         o.Now,
		log:         o.Logger,
		token:       o.Authenticate != nil,
	}
	if o.RequiresAccessToken != nil {
		h.token = *o.RequiresAccessToken
	}
	if o.PollLimit != nil {
		h.polls = newPollLimiter(*o.PollLimit)
	}
	if o.FinishedJobCache > 0 {
		h.finished = newFinishedCache(o.FinishedJobCache)
	}
	h.initDownloads()
	h.tel = newTelemetry(o.MeterProvider, o.TracerProvider, h.log)
	h.tel.initPolls(h.log)
	return h, nil
}

// Paths the handler serves, relative to the base URL.
const (
	pathExport     = "/$export"
	pathPoll       = "/$export-poll-status"
	pathPatient    = "/Patient/$export"
	pathFiles      = "/bulkfiles/"
	groupPrefix    = "/Group/"
	groupSuffix    = "/$export"
	pollPathPrefix = pathPoll + "/"
)

// ServeHTTP routes a request. Paths are taken relative to the BaseURL's
// path, so the handler works both mounted at that path and behind
// http.StripPrefix.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	r = trackBody(r)
	p := r.URL.EscapedPath()
	if h.basePath != "" {
		if rest, ok := strings.CutPrefix(p, h.basePath); ok && (rest == "" || rest[0] == '/') {
			p = rest
		}
	}
	if unescaped, err := url.PathUnescape(p); err == nil {
		p = unescaped
	}
	switch {
	case p == pathPoll:
		h.serveStatus(w, r, "")
	case strings.HasPrefix(p, pollPathPrefix):
		id := p[len(pollPathPrefix):]
		if id == "" {
			h.writeError(w, r, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueRequired, Param: "_jobId", Message: "missing job id"})
			return
		}
		h.serveStatus(w, r, id)
	case p == pathExport:
		h.serveKickoff(w, r, fhirbulk.LevelSystem, "")
	case p == pathPatient:
		h.serveKickoff(w, r, fhirbulk.LevelPatient, "")
	case len(p) >= len(groupPrefix)+len(groupSuffix) && strings.HasPrefix(p, groupPrefix) && strings.HasSuffix(p, groupSuffix):
		// The length check: "/Group/$export" has both affixes, overlapping.
		id := p[len(groupPrefix) : len(p)-len(groupSuffix)]
		if !validID(id) {
			h.writeError(w, r, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid, Message: "invalid Group id"})
			return
		}
		h.serveKickoff(w, r, fhirbulk.LevelGroup, id)
	case strings.HasPrefix(p, pathFiles):
		h.serveFile(w, r, p[len(pathFiles):])
	default:
		h.writeError(w, r, &Error{Status: http.StatusNotFound, Code: fhirbulk.IssueNotFound, Message: "no bulk export endpoint at this path"})
	}
}

// authenticate runs the host's Authenticate hook.
func (h *Handler) authenticate(r *http.Request) (string, error) {
	if h.opts.Authenticate == nil {
		return "", nil
	}
	return h.opts.Authenticate(r)
}

// writeError answers with the OperationOutcome the ErrorMapper gives. Every
// error answer goes through here.
func (h *Handler) writeError(w http.ResponseWriter, r *http.Request, err error) {
	var tmr *tooManyRequests
	if errors.As(err, &tmr) {
		w.Header().Set("Retry-After", retryAfterSeconds(tmr.retry))
		err = tmr.asError()
	}
	status, oo := h.mapErr(err)
	if oo == nil {
		oo = fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueProcessing, http.StatusText(status))
	}
	if status >= 500 && !errors.Is(err, context.Canceled) {
		h.log.LogAttrs(r.Context(), slog.LevelError, "bulkexport: request failed",
			slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.Int("status", status), slog.String("err", redacted(r, err)))
	}
	if status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer`)
	}
	if status == http.StatusServiceUnavailable && w.Header().Get("Retry-After") == "" {
		// A transient failure (the job store or the file storage is
		// unreachable): say when to try again, so that clients back off
		// rather than retry at once in a loop.
		w.Header().Set("Retry-After", retryAfterSeconds(unavailableRetryAfter))
	}
	pending := bodyPending(r)
	if pending {
		// Rejected before its body was read: answer at once and close,
		// rather than let net/http drain the body first (a client sending
		// it slowly, with or without a token, would hold the answer and
		// the connection for as long as it likes).
		w.Header().Set("Connection", "close")
	}
	writeJSON(w, status, contentTypeFHIRJSON, oo)
	if pending {
		// Send the answer now. After it, net/http still reads what is
		// left of the body before it closes. A client that sends its body
		// at once has pendingBodyGrace to finish (so that closing does not
		// reset the connection under its answer); a slow one is cut off
		// then.
		rc := http.NewResponseController(w)
		_ = rc.Flush()
		_ = rc.SetReadDeadline(time.Now().Add(pendingBodyGrace))
	}
}

// unavailableRetryAfter is the Retry-After of a 503: long enough for a
// database failover or restart, short enough not to stall a client.
const unavailableRetryAfter = 5 * time.Second

// pendingBodyGrace bounds how long the rest of a rejected request's body
// is read after the answer.
const pendingBodyGrace = time.Second

// trackedBody is a request body that records whether it was read to its
// end.
type trackedBody struct {
	io.ReadCloser
	eof bool
}

func (b *trackedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

// trackBody returns r with its body tracked, when it is an HTTP/1.x
// request that has one. The copy leaves net/http's own request untouched.
func trackBody(r *http.Request) *http.Request {
	if r.ProtoMajor != 1 || r.ContentLength == 0 || r.Body == nil || r.Body == http.NoBody {
		return r
	}
	r2 := r.WithContext(r.Context())
	r2.Body = &trackedBody{ReadCloser: r.Body}
	return r2
}

// bodyPending reports whether r (HTTP/1.x) has a body the handler has not
// read to its end. HTTP/2 streams need no such care: an unread body is
// reset with its stream, and "Connection: close" would end the whole
// connection.
func bodyPending(r *http.Request) bool {
	b, ok := r.Body.(*trackedBody)
	return ok && !b.eof
}

func methodNotAllowed(allow string) *Error {
	return &Error{Status: http.StatusMethodNotAllowed, Code: fhirbulk.IssueNotSupported, Message: "method not allowed; use " + allow}
}

// statusURL returns the absolute status URL of a job.
func (h *Handler) statusURL(id string) string {
	if h.opts.StatusURLStyle == StatusPath {
		return h.base + pollPathPrefix + id
	}
	return h.base + pathPoll + "?_jobId=" + id
}

// StatusURL returns the absolute status URL of the job with the given id,
// in the configured StatusURLStyle.
func (h *Handler) StatusURL(id string) string { return h.statusURL(id) }

// FileURL returns the absolute download URL of a job's file.
func (h *Handler) FileURL(jobID, name string) string {
	return h.base + pathFiles + jobID + "/" + url.PathEscape(name)
}

// DefaultRetryAfter advises a poll interval that grows with the job's age:
// a tenth of the time since kick-off, at least 1 s and at most 2 min. Young
// jobs are polled often (small exports finish fast); long ones are not
// hammered.
func DefaultRetryAfter(job *Job, now time.Time) time.Duration {
	d := now.Sub(job.CreatedAt) / 10
	return min(max(d, time.Second), 2*time.Minute)
}

// FixedRetryAfter returns a RetryAfter policy that always advises d, as the
// eHealth server does with 120 s.
func FixedRetryAfter(d time.Duration) func(*Job, time.Time) time.Duration {
	return func(*Job, time.Time) time.Duration { return d }
}

// serveKickoff answers [base]/$export, [base]/Patient/$export and
// [base]/Group/{id}/$export.
func (h *Handler) serveKickoff(w http.ResponseWriter, r *http.Request, level fhirbulk.Level, groupID string) {
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		w.Header().Set("Allow", "GET, POST")
		h.writeError(w, r, methodNotAllowed("GET or POST"))
		return
	}
	w, r = h.tel.startKickoff(w, r, level)
	defer h.tel.endKickoff(w, r)
	ctx := r.Context()
	clientID, req, err := h.kickoffRequest(w, r, level, groupID)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	reused, err := h.admit(ctx, clientID, level, groupID, &req)
	switch {
	case err != nil:
		h.writeError(w, r, err)
		return
	case reused != nil:
		w.Header().Set("Content-Location", h.statusURL(reused.ID))
		writeJSON(w, http.StatusAccepted, contentTypeFHIRJSON,
			fhirbulk.NewOutcome(fhirbulk.SeverityInformation, fhirbulk.IssueInformational, "an identical export is already in progress: job "+reused.ID))
		return
	}
	job, err := h.queueJob(ctx, clientID, level, groupID, req)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	oo := fhirbulk.NewOutcome(fhirbulk.SeverityInformation, fhirbulk.IssueInformational, "export job "+job.ID+" queued")
	oo.Issue = append(oo.Issue, req.Ignored...)
	w.Header().Set("Content-Location", h.statusURL(job.ID))
	if req.SeparateExportStatus {
		w.Header().Set("Preference-Applied", "respond-async, separate-export-status")
	}
	writeJSON(w, http.StatusAccepted, contentTypeFHIRJSON, oo)
}

// kickoffRequest authenticates a GET or POST kick-off, checks its headers,
// reads and validates its parameters and authorizes the export: it returns
// the client and the Request of the job to be.
func (h *Handler) kickoffRequest(w http.ResponseWriter, r *http.Request, level fhirbulk.Level, groupID string) (string, Request, error) {
	clientID, err := h.authenticate(r)
	if err != nil {
		return "", Request{}, err
	}
	prefs, err := kickoffPreferences(r, h.opts.AllowMissingRespondAsync)
	if err != nil {
		return "", Request{}, err
	}
	raw, err := readKickoffParams(r, h.opts.MaxBodyBytes)
	if err != nil {
		return "", Request{}, err
	}
	if h.opts.ManifestVersion == ManifestSTU4 && r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		return "", Request{}, &Error{Status: http.StatusMethodNotAllowed, Code: fhirbulk.IssueNotSupported,
			Message: "this server follows the STU4 ballot: kick off with POST and a Parameters body"}
	}
	cfg, err := h.kickoffConfigFor(r.Context(), level)
	if err != nil {
		return "", Request{}, err
	}
	req, err := parseKickoff(raw, r.Method, level, prefs.lenient, cfg)
	if err != nil {
		return "", Request{}, err
	}
	req.SeparateExportStatus = prefs.separateExportStatus && !h.opts.DisableSeparateExportStatus
	if err := h.authorizeKickoff(r.Context(), clientID, level, groupID, &req); err != nil {
		return "", Request{}, err
	}
	req.URL = h.base + kickoffPath(level, groupID)
	if r.Method == http.MethodGet && r.URL.RawQuery != "" {
		req.URL += "?" + r.URL.RawQuery
	}
	return clientID, req, nil
}

// kickoffPreferences checks a kick-off's Accept header and reads its Prefer
// header, which must ask for an asynchronous answer unless
// allowMissingRespondAsync.
func kickoffPreferences(r *http.Request, allowMissingRespondAsync bool) (preferences, error) {
	if !acceptsJSON(r.Header.Get("Accept")) {
		return preferences{}, &Error{Status: http.StatusNotAcceptable, Code: fhirbulk.IssueNotSupported,
			Message: "the kick-off answers in application/fhir+json; the Accept header admits none of it"}
	}
	prefs := parsePrefer(r.Header)
	if !prefs.respondAsync && !allowMissingRespondAsync {
		return preferences{}, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid,
			Message: "the export runs asynchronously: send the header Prefer: respond-async"}
	}
	return prefs, nil
}

// kickoffConfigFor is what the kick-off parameters of a level are validated
// against: the options, and what Options.Types tells of the level.
func (h *Handler) kickoffConfigFor(ctx context.Context, level fhirbulk.Level) (kickoffConfig, error) {
	cfg := kickoffConfig{associated: h.opts.AssociatedData, maxValues: h.opts.MaxParamValues, maxLength: h.opts.MaxParamLength}
	if h.opts.Types == nil {
		return cfg, nil
	}
	types, err := h.opts.Types.ResourceTypes(ctx, level)
	if err != nil {
		return cfg, err
	}
	cfg.types = types
	if tf, ok := h.opts.Types.(TypeFilterChecker); ok {
		cfg.checkFilter = tf.CheckTypeFilter
	}
	if org, ok := h.opts.Types.(Organizer); ok {
		if cfg.organizeBy, err = org.OrganizeTypes(ctx, level); err != nil {
			return cfg, err
		}
	}
	if al, ok := h.opts.Types.(AssociatedDataLister); ok {
		cfg.associated = append(slices.Clip(cfg.associated), al.AssociatedData()...)
	}
	return cfg, nil
}

// authorizeKickoff checks that a Group export names a known group
// (GroupChecker), then asks Options.Authorize, which may amend the request.
func (h *Handler) authorizeKickoff(ctx context.Context, clientID string, level fhirbulk.Level, groupID string, req *Request) error {
	if level == fhirbulk.LevelGroup {
		if gc, ok := h.opts.Types.(GroupChecker); ok {
			if err := gc.CheckGroup(ctx, groupID); err != nil {
				if errors.Is(err, ErrNotFound) {
					err = &Error{Status: http.StatusNotFound, Code: fhirbulk.IssueNotFound, Message: "Group/" + groupID + " is not known", Err: err}
				}
				return err
			}
		}
	}
	if h.opts.Authorize != nil {
		return h.opts.Authorize(ctx, clientID, level, groupID, req)
	}
	return nil
}

// queueJob stores a queued job for an admitted request and announces it.
func (h *Handler) queueJob(ctx context.Context, clientID string, level fhirbulk.Level, groupID string, req Request) (*Job, error) {
	now := h.now()
	job := &Job{
		ID:        NewJobID(),
		Owner:     clientID,
		Level:     level,
		GroupID:   groupID,
		Request:   req,
		State:     StateQueued,
		Progress:  Progress{Percent: -1, Message: "queued"},
		CreatedAt: now,
		UpdatedAt: now,
	}
	if err := h.create(ctx, job); err != nil {
		return nil, storeError(err)
	}
	h.trimFinished(ctx, clientID)
	if h.finished != nil {
		// Early expiry may have hit this client's cached jobs.
		h.finished.dropOwner(clientID)
	}
	h.log.LogAttrs(ctx, slog.LevelInfo, "bulkexport: job queued", jobAttrs(job)...)
	h.tel.jobQueued(ctx, job)

	if h.opts.OnQueued != nil {
		h.opts.OnQueued(job.ID)
	}
	return job, nil
}

func kickoffPath(level fhirbulk.Level, groupID string) string {
	switch level {
	case fhirbulk.LevelPatient:
		return pathPatient
	case fhirbulk.LevelGroup:
		return groupPrefix + groupID + groupSuffix
	}
	return pathExport
}

// storeError marks a JobStore failure other than the contract's sentinels
// as transient: the store is unavailable, the client should retry.
func storeError(err error) error {
	var e *Error
	var tm *tooManyRequests
	switch {
	case errors.As(err, &e), errors.As(err, &tm), errors.Is(err, ErrNotFound), errors.Is(err, ErrConflict),
		errors.Is(err, ErrAlreadyExists), errors.Is(err, ErrInvalidTransition):
		return err
	}
	return &Error{Status: http.StatusServiceUnavailable, Code: fhirbulk.IssueTransient,
		Message: "the job store is unavailable; retry later", Err: errors.Join(ErrUnavailable, err)}
}
