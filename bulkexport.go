package bulkexport

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
)

// Level is the scope of an export: the whole system, every patient, or
// the members of one Group.
type Level string

const (
	// LevelSystem is [base]/$export: every resource the client may see.
	LevelSystem Level = "system"
	// LevelPatient is [base]/Patient/$export: the Patient compartment of
	// every patient.
	LevelPatient Level = "patient"
	// LevelGroup is [base]/Group/{id}/$export: the Patient compartment of the
	// Group's members.
	LevelGroup Level = "group"
)

// Valid reports whether l is one of the three defined levels.
func (l Level) Valid() bool {
	return l == LevelSystem || l == LevelPatient || l == LevelGroup
}

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

// OperationOutcome is the FHIR R4 OperationOutcome resource, reduced to the
// elements this library reads and writes.
type OperationOutcome struct {
	ResourceType string  `json:"resourceType"`
	ID           string  `json:"id,omitempty"`
	Issue        []Issue `json:"issue"`
}

// Issue is one OperationOutcome.issue.
type Issue struct {
	Severity    Severity         `json:"severity"`
	Code        IssueType        `json:"code"`
	Details     *CodeableConcept `json:"details,omitempty"`
	Diagnostics string           `json:"diagnostics,omitempty"`
	Expression  []string         `json:"expression,omitempty"`
}

// CodeableConcept is the FHIR datatype, reduced to its text.
type CodeableConcept struct {
	Text string `json:"text,omitempty"`
}

// Severity is OperationOutcome.issue.severity.
type Severity string

// The FHIR issue severities.
const (
	SeverityFatal       Severity = "fatal"
	SeverityError       Severity = "error"
	SeverityWarning     Severity = "warning"
	SeverityInformation Severity = "information"
)

// IssueType is OperationOutcome.issue.code (the FHIR IssueType value set).
type IssueType string

// The IssueType codes this library uses. Transient reports whether a code
// belongs to the "transient" branch, which tells a client to retry.
const (
	IssueInvalid       IssueType = "invalid"
	IssueStructure     IssueType = "structure"
	IssueRequired      IssueType = "required"
	IssueValue         IssueType = "value"
	IssueSecurity      IssueType = "security"
	IssueLogin         IssueType = "login"
	IssueForbidden     IssueType = "forbidden"
	IssueProcessing    IssueType = "processing"
	IssueNotSupported  IssueType = "not-supported"
	IssueNotFound      IssueType = "not-found"
	IssueDeleted       IssueType = "deleted"
	IssueTooCostly     IssueType = "too-costly"
	IssueConflict      IssueType = "conflict"
	IssueInformational IssueType = "informational"
	IssueException     IssueType = "exception"
	IssueTransient     IssueType = "transient"
	IssueLockError     IssueType = "lock-error"
	IssueNoStore       IssueType = "no-store"
	IssueTimeout       IssueType = "timeout"
	IssueIncomplete    IssueType = "incomplete"
	IssueThrottled     IssueType = "throttled"
)

// Transient reports whether c is in the IssueType "transient" branch.
func (c IssueType) Transient() bool {
	switch c {
	case IssueTransient, IssueLockError, IssueNoStore, IssueException, IssueTimeout, IssueIncomplete, IssueThrottled:
		return true
	}
	return false
}

// NewOutcome returns an OperationOutcome with a single issue.
func NewOutcome(sev Severity, code IssueType, diagnostics string, expression ...string) *OperationOutcome {
	return &OperationOutcome{
		ResourceType: "OperationOutcome",
		Issue:        []Issue{{Severity: sev, Code: code, Diagnostics: diagnostics, Expression: expression}},
	}
}

// Error is an error that knows its HTTP status and FHIR issue code. The
// handler turns it into an OperationOutcome answer. Param, when set, names
// the kick-off parameter at fault and becomes the issue's expression.
type Error struct {
	Status  int
	Code    IssueType
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
func (e *Error) Outcome() *OperationOutcome {
	var expr []string
	msg := e.Message
	if msg == "" {
		msg = http.StatusText(e.Status)
	}
	if e.Param != "" {
		expr = []string{e.Param}
		msg = e.Param + ": " + msg
	}
	sev := SeverityError
	if e.Status >= 500 && !e.Code.Transient() {
		sev = SeverityFatal
	}
	return NewOutcome(sev, e.Code, msg, expr...)
}

// paramError is the 400 answer for a parameter that is unknown, unsupported
// or malformed.
func paramError(param string, code IssueType, format string, args ...any) *Error {
	return &Error{Status: http.StatusBadRequest, Code: code, Param: param, Message: fmt.Sprintf(format, args...)}
}

// ErrorMapper turns any error the handler meets into an HTTP status and an
// OperationOutcome. Hosts may replace DefaultErrorMapper through Options.
type ErrorMapper func(err error) (status int, outcome *OperationOutcome)

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
func DefaultErrorMapper(err error) (int, *OperationOutcome) {
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
		return http.StatusRequestEntityTooLarge, NewOutcome(SeverityError, IssueTooCostly,
			fmt.Sprintf("request body exceeds %d bytes", mbe.Limit))
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound, NewOutcome(SeverityError, IssueNotFound, "not found")
	case errors.Is(err, ErrUnauthorized):
		return http.StatusUnauthorized, NewOutcome(SeverityError, IssueLogin, "authentication required")
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden, NewOutcome(SeverityError, IssueForbidden, "forbidden")
	case errors.Is(err, ErrConflict), errors.Is(err, ErrAlreadyExists), errors.Is(err, ErrInvalidTransition):
		return http.StatusConflict, NewOutcome(SeverityError, IssueConflict, "the job changed concurrently; retry")
	case errors.Is(err, ErrUnavailable), errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return http.StatusServiceUnavailable, NewOutcome(SeverityError, IssueTransient, "temporarily unavailable; retry later")
	default:
		return http.StatusInternalServerError, NewOutcome(SeverityFatal, IssueException, "internal server error")
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
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", fmt.Sprint(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

const (
	contentTypeFHIRJSON = "application/fhir+json"
	contentTypeJSON     = "application/json"
	contentTypeNDJSON   = "application/fhir+ndjson"
)
