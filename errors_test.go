package bulkexport_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

func TestDefaultErrorMapper(t *testing.T) {
	t.Parallel()
	const secret = "dial tcp 10.0.0.7:5432: password authentication failed for user admin"
	paramErr := &bulkexport.Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid, Param: "_type", Message: "bad type"}
	cases := []struct {
		name     string
		err      error
		status   int
		code     fhirbulk.IssueType
		severity fhirbulk.Severity
		diag     string   // the diagnostics, when checked exactly
		expr     []string // the expression
	}{
		{name: "Error", err: paramErr, status: 400, code: fhirbulk.IssueInvalid, severity: fhirbulk.SeverityError,
			diag: "_type: bad type", expr: []string{"_type"}},
		{name: "Error/wrapped", err: fmt.Errorf("kick-off: %w", paramErr), status: 400, code: fhirbulk.IssueInvalid,
			severity: fhirbulk.SeverityError, diag: "_type: bad type", expr: []string{"_type"}},
		{name: "Error/no-message", err: &bulkexport.Error{Status: http.StatusNotFound, Code: fhirbulk.IssueNotFound},
			status: 404, code: fhirbulk.IssueNotFound, severity: fhirbulk.SeverityError, diag: "Not Found"},
		{name: "Error/own-status-beats-cause", err: &bulkexport.Error{Status: http.StatusGone, Code: fhirbulk.IssueDeleted,
			Message: "gone", Err: bulkexport.ErrNotFound}, status: 410, code: fhirbulk.IssueDeleted, severity: fhirbulk.SeverityError, diag: "gone"},
		{name: "Error/cause-not-leaked", err: &bulkexport.Error{Status: http.StatusServiceUnavailable, Code: fhirbulk.IssueTransient,
			Message: "retry later", Err: errors.New(secret)}, status: 503, code: fhirbulk.IssueTransient,
			severity: fhirbulk.SeverityError, diag: "retry later"},
		{name: "Error/5xx-non-transient-is-fatal", err: &bulkexport.Error{Status: http.StatusInternalServerError,
			Code: fhirbulk.IssueProcessing, Message: "boom"}, status: 500, code: fhirbulk.IssueProcessing, severity: fhirbulk.SeverityFatal, diag: "boom"},
		{name: "Error/no-status", err: &bulkexport.Error{Code: fhirbulk.IssueForbidden, Message: "host forgot the status"},
			status: 500, code: fhirbulk.IssueForbidden, severity: fhirbulk.SeverityFatal, diag: "host forgot the status"},
		{name: "Error/success-status", err: &bulkexport.Error{Status: http.StatusOK, Code: fhirbulk.IssueInvalid, Message: "x"},
			status: 500, code: fhirbulk.IssueInvalid, severity: fhirbulk.SeverityFatal, diag: "x"},
		{name: "ErrNotFound", err: bulkexport.ErrNotFound, status: 404, code: fhirbulk.IssueNotFound, severity: fhirbulk.SeverityError},
		{name: "ErrNotFound/wrapped", err: fmt.Errorf("job abc: %w", bulkexport.ErrNotFound), status: 404, code: fhirbulk.IssueNotFound,
			severity: fhirbulk.SeverityError},
		{name: "ErrUnauthorized", err: fmt.Errorf("token expired: %w", bulkexport.ErrUnauthorized), status: 401, code: fhirbulk.IssueLogin,
			severity: fhirbulk.SeverityError},
		{name: "ErrForbidden", err: fmt.Errorf("scope: %w", bulkexport.ErrForbidden), status: 403, code: fhirbulk.IssueForbidden,
			severity: fhirbulk.SeverityError},
		{name: "ErrConflict", err: fmt.Errorf("job: %w", bulkexport.ErrConflict), status: 409, code: fhirbulk.IssueConflict,
			severity: fhirbulk.SeverityError},
		{name: "ErrAlreadyExists", err: bulkexport.ErrAlreadyExists, status: 409, code: fhirbulk.IssueConflict, severity: fhirbulk.SeverityError},
		{name: "ErrInvalidTransition", err: bulkexport.CheckTransition(bulkexport.StateCompleted, bulkexport.StateRunning), status: 409,
			code: fhirbulk.IssueConflict, severity: fhirbulk.SeverityError},
		{name: "ErrUnavailable", err: fmt.Errorf("db: %w", bulkexport.ErrUnavailable), status: 503, code: fhirbulk.IssueTransient,
			severity: fhirbulk.SeverityError},
		{name: "ErrUnavailable/joined", err: errors.Join(errors.New(secret), bulkexport.ErrUnavailable), status: 503,
			code: fhirbulk.IssueTransient, severity: fhirbulk.SeverityError},
		{name: "DeadlineExceeded", err: fmt.Errorf("query: %w", context.DeadlineExceeded), status: 503, code: fhirbulk.IssueTransient,
			severity: fhirbulk.SeverityError},
		{name: "Canceled", err: context.Canceled, status: 503, code: fhirbulk.IssueTransient, severity: fhirbulk.SeverityError},
		{name: "MaxBytesError", err: &http.MaxBytesError{Limit: 1024}, status: 413, code: fhirbulk.IssueTooCostly,
			severity: fhirbulk.SeverityError, diag: "request body exceeds 1024 bytes"},
		{name: "MaxBytesError/wrapped", err: fmt.Errorf("read body: %w", &http.MaxBytesError{Limit: 7}), status: 413,
			code: fhirbulk.IssueTooCostly, severity: fhirbulk.SeverityError, diag: "request body exceeds 7 bytes"},
		{name: "ErrNoJob-is-internal", err: bulkexport.ErrNoJob, status: 500, code: fhirbulk.IssueException,
			severity: fhirbulk.SeverityFatal, diag: "internal server error"},
		{name: "unknown", err: errors.New(secret), status: 500, code: fhirbulk.IssueException,
			severity: fhirbulk.SeverityFatal, diag: "internal server error"},
		{name: "unknown/wrapped", err: fmt.Errorf("export: %w", errors.New(secret)), status: 500, code: fhirbulk.IssueException,
			severity: fhirbulk.SeverityFatal, diag: "internal server error"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			status, oo := bulkexport.DefaultErrorMapper(c.err)
			require.Equal(t, c.status, status)
			require.NotNil(t, oo)
			require.Equal(t, "OperationOutcome", oo.ResourceType)
			require.Len(t, oo.Issue, 1)
			is := oo.Issue[0]
			require.Equal(t, c.code, is.Code)
			require.Equal(t, c.severity, is.Severity)
			require.NotEmpty(t, is.Diagnostics)
			if c.diag != "" {
				require.Equal(t, c.diag, is.Diagnostics)
			}
			require.Equal(t, c.expr, is.Expression)
			// Whatever the error, its internal detail never reaches the
			// client.
			b, err := json.Marshal(oo)
			require.NoError(t, err)
			require.NotContains(t, string(b), "password")
			require.NotContains(t, string(b), "10.0.0.7")
			require.True(t, status >= 400 && status <= 599)
			if status == http.StatusServiceUnavailable {
				require.True(t, is.Code.Transient(), "a 503 tells the client to retry")
			}
		})
	}
}

func TestErrorString(t *testing.T) {
	t.Parallel()
	cause := errors.New("cause")
	cases := []struct {
		err  *bulkexport.Error
		want string
	}{
		{&bulkexport.Error{Message: "msg"}, "msg"},
		{&bulkexport.Error{Param: "_type", Message: "msg"}, "_type: msg"},
		{&bulkexport.Error{Param: "_type", Message: "msg", Err: cause}, "_type: msg: cause"},
		{&bulkexport.Error{Err: cause}, "cause"},
		{&bulkexport.Error{}, ""},
	}
	for _, c := range cases {
		require.Equal(t, c.want, c.err.Error())
	}
	e := &bulkexport.Error{Status: 503, Err: fmt.Errorf("x: %w", bulkexport.ErrUnavailable)}
	require.ErrorIs(t, e, bulkexport.ErrUnavailable)
	var target *bulkexport.Error
	require.ErrorAs(t, fmt.Errorf("wrapped: %w", e), &target)
	require.Same(t, e, target)
}

func TestIssueTypeTransient(t *testing.T) {
	t.Parallel()
	transient := []fhirbulk.IssueType{
		fhirbulk.IssueTransient, fhirbulk.IssueLockError, fhirbulk.IssueNoStore, fhirbulk.IssueException,
		fhirbulk.IssueTimeout, fhirbulk.IssueIncomplete, fhirbulk.IssueThrottled,
	}
	fatal := []fhirbulk.IssueType{
		fhirbulk.IssueInvalid, fhirbulk.IssueStructure, fhirbulk.IssueRequired, fhirbulk.IssueValue,
		fhirbulk.IssueSecurity, fhirbulk.IssueLogin, fhirbulk.IssueForbidden, fhirbulk.IssueProcessing,
		fhirbulk.IssueNotSupported, fhirbulk.IssueNotFound, fhirbulk.IssueDeleted, fhirbulk.IssueTooCostly,
		fhirbulk.IssueConflict, fhirbulk.IssueInformational, "", "Transient", "unknown-code",
	}
	for _, c := range transient {
		t.Run(string(c), func(t *testing.T) {
			t.Parallel()
			require.True(t, c.Transient())
		})
	}
	for _, c := range fatal {
		t.Run("not-"+string(c), func(t *testing.T) {
			t.Parallel()
			require.False(t, c.Transient())
		})
	}
}

func TestNewOutcome(t *testing.T) {
	t.Parallel()
	oo := fhirbulk.NewOutcome(fhirbulk.SeverityWarning, fhirbulk.IssueValue, "diag", "a", "b")
	b, err := json.Marshal(oo)
	require.NoError(t, err)
	require.JSONEq(t, `{"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"value","diagnostics":"diag","expression":["a","b"]}]}`, string(b))
	b, err = json.Marshal(fhirbulk.NewOutcome(fhirbulk.SeverityInformation, fhirbulk.IssueInformational, ""))
	require.NoError(t, err)
	require.False(t, strings.Contains(string(b), "expression"), "no empty expression array")
}
