package bulkexport

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"net/http"
	"strconv"
)

// Sentinel errors. Stores, sources and storages wrap them with %w; callers
// match them with errors.Is.
var (
	// ErrNotFound: the job (or file, or group) does not exist. A JobStore
	// never answers (nil, nil) for a missing job.
	ErrNotFound = errors.New("bulkexport: not found")
	// ErrAlreadyExists: Create was given an id that is already stored.
	ErrAlreadyExists = errors.New("bulkexport: already exists")
	// ErrConflict: Update was given a job whose Version no longer matches
	// the stored one (somebody else changed it first).
	ErrConflict = errors.New("bulkexport: version conflict")
	// ErrInvalidTransition: Update would move a job between states that the
	// lifecycle does not connect (see JobState.CanTransition).
	ErrInvalidTransition = errors.New("bulkexport: invalid state transition")
	// ErrTooManyJobs: Create refused a job because its owner already has
	// CreateParams.MaxActivePerOwner active jobs.
	ErrTooManyJobs = errors.New("bulkexport: too many active jobs")
	// ErrNoJob: Claim found nothing to hand out.
	ErrNoJob = errors.New("bulkexport: no job to claim")
	// ErrUnauthorized: the request carries no valid credentials (401).
	ErrUnauthorized = errors.New("bulkexport: unauthorized")
	// ErrForbidden: the client is known but may not do this (403).
	ErrForbidden = errors.New("bulkexport: forbidden")
	// ErrUnavailable: a collaborator (store, storage) cannot answer right
	// now; the client should retry (503 with a transient issue code).
	ErrUnavailable = errors.New("bulkexport: temporarily unavailable")
)

// Error is an error that knows its HTTP status and FHIR issue code. The
// handler turns it into an OperationOutcome answer. Param, when set, names
// the kick-off parameter at fault and becomes the issue's expression.
type Error struct {
	Status  int
	Code    fhirbulk.IssueType
	Param   string
	Message string
	Err     error // optional cause, for errors.Is/As
}

func (e *Error) Error() string {
	msg := e.Message
	if e.Param != "" {
		msg = e.Param + ": " + msg
	}
	if e.Err != nil && msg == "" {
		return e.Err.Error()
	}
	if e.Err != nil {
		return msg + ": " + e.Err.Error()
	}
	return msg
}

func (e *Error) Unwrap() error { return e.Err }

// Outcome converts the error into its OperationOutcome. The diagnostics
// hold Param and Message only: the wrapped cause may carry internal detail
// and stays in logs.
func (e *Error) Outcome() *fhirbulk.OperationOutcome {
	var expr []string
	msg := e.Message
	if msg == "" {
		msg = http.StatusText(e.Status)
	}
	if e.Param != "" {
		expr = []string{e.Param}
		msg = e.Param + ": " + msg
	}
	sev := fhirbulk.SeverityError
	if e.Status >= 500 && !e.Code.Transient() {
		sev = fhirbulk.SeverityFatal
	}
	return fhirbulk.NewOutcome(sev, e.Code, msg, expr...)
}

// paramError is the 400 answer for a parameter that is unknown, unsupported
// or malformed.
func paramError(param string, code fhirbulk.IssueType, format string, args ...any) *Error {
	return &Error{Status: http.StatusBadRequest, Code: code, Param: param, Message: fmt.Sprintf(format, args...)}
}

// ErrorMapper turns any error the handler meets into an HTTP status and an
// OperationOutcome. Hosts may replace DefaultErrorMapper through Options.
type ErrorMapper func(err error) (status int, outcome *fhirbulk.OperationOutcome)

// DefaultErrorMapper is the one place that maps errors to answers:
//
//   - *Error: its own Status and Code;
//   - ErrNotFound: 404 not-found;
//   - ErrUnauthorized: 401 login; ErrForbidden: 403 forbidden;
//   - ErrConflict, ErrAlreadyExists, ErrInvalidTransition: 409 conflict;
//   - ErrUnavailable, context.DeadlineExceeded: 503 transient;
//   - context.Canceled: 503 transient (the client went away or the server is
//     shutting down; nothing was lost);
//   - *http.MaxBytesError: 413 too-costly;
//   - anything else: 500 exception, without the error text, which may hold
//     internal detail.
func DefaultErrorMapper(err error) (int, *fhirbulk.OperationOutcome) {
	var e *Error
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &e):
		if e.Status < 400 || e.Status > 599 {
			// A host-made Error without an error status: answer 500 rather
			// than a success or an invalid status line (WriteHeader panics).
			c := *e
			c.Status = http.StatusInternalServerError
			return c.Status, c.Outcome()
		}
		return e.Status, e.Outcome()
	case errors.As(err, &mbe):
		return http.StatusRequestEntityTooLarge, fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueTooCostly,
			fmt.Sprintf("request body exceeds %d bytes", mbe.Limit))
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound, fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueNotFound, "not found")
	case errors.Is(err, ErrUnauthorized):
		return http.StatusUnauthorized, fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueLogin, "authentication required")
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden, fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueForbidden, "forbidden")
	case errors.Is(err, ErrConflict), errors.Is(err, ErrAlreadyExists), errors.Is(err, ErrInvalidTransition):
		return http.StatusConflict, fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueConflict, "the job changed concurrently; retry")
	case errors.Is(err, ErrUnavailable), errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return http.StatusServiceUnavailable, fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueTransient, "temporarily unavailable; retry later")
	default:
		return http.StatusInternalServerError, fhirbulk.NewOutcome(fhirbulk.SeverityFatal, fhirbulk.IssueException, "internal server error")
	}
}

// writeJSON writes v with the given content type and status. Encoding
// errors can only come from the connection, so they are dropped.
func writeJSON(w http.ResponseWriter, status int, contentType string, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b = []byte(`{"resourceType":"OperationOutcome","issue":[{"severity":"fatal","code":"exception","diagnostics":"encoding failed"}]}`)
		contentType = contentTypeFHIRJSON
	}
	writeBody(w, status, contentType, b)
}

// writeBody answers with an encoded body.
func writeBody(w http.ResponseWriter, status int, contentType string, b []byte) {
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

const (
	contentTypeFHIRJSON = "application/fhir+json"
	contentTypeJSON     = "application/json"
	contentTypeNDJSON   = "application/fhir+ndjson"
)
