package client

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Sentinel errors, wrapped in an *Error (match them with errors.Is).
var (
	// ErrCountMismatch: a downloaded file does not hold as many resources
	// (non-empty lines) as the manifest's count says.
	ErrCountMismatch = errors.New("the file's resource count differs from the manifest's count")
	// ErrNoStatusURL: a kick-off was accepted (202) without a
	// Content-Location header.
	ErrNoStatusURL = errors.New("the kick-off answer has no Content-Location")
	// ErrUnexpectedStatus: the server answered with a status the protocol
	// does not define for the request (such as a 2xx other than 202 to a
	// kick-off).
	ErrUnexpectedStatus = errors.New("unexpected status")
	// ErrInvalidRequest: a KickoffRequest the client refuses to send.
	ErrInvalidRequest = errors.New("invalid kick-off request")
)

// Error is a failed request: the server's answer (StatusCode and, when the
// body was one, its OperationOutcome) or the failure to get one
// (StatusCode 0 and Err). Every error the client's methods return for a
// request is an *Error, except a cancelled or expired context, which is
// returned wrapped so that errors.Is(err, context.Canceled) holds.
type Error struct {
	// Op is the operation: "kick-off", "status", "manifest", "cancel" or
	// "download".
	Op string
	// Method and URL are those of the request.
	Method string
	URL    string
	// StatusCode is the HTTP status, or 0 when no answer came.
	StatusCode int
	// Outcome is the answer's OperationOutcome, when it had one.
	Outcome *fhirbulk.OperationOutcome
	// Body is the start of an answer body that is not an OperationOutcome.
	Body string
	// RetryAfter is the answer's Retry-After, 0 when there was none.
	RetryAfter time.Duration
	// Err is the cause: a network error, ErrCountMismatch, a JSON error...
	Err error

	network  bool // Err is a network failure (not the context's)
	retryNow bool // a download answer to retry at once, differently
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Op)
	if e.URL != "" {
		b.WriteString(" ")
		b.WriteString(e.URL)
	}
	b.WriteString(": ")
	sep := ""
	if e.StatusCode != 0 {
		fmt.Fprintf(&b, "%d %s", e.StatusCode, http.StatusText(e.StatusCode))
		sep = ": "
	}
	if e.Outcome != nil {
		for i, is := range e.Outcome.Issue {
			if i > 0 {
				sep = "; "
			}
			b.WriteString(sep)
			fmt.Fprintf(&b, "%s %s", is.Severity, is.Code)
			if is.Diagnostics != "" {
				b.WriteString(": ")
				b.WriteString(is.Diagnostics)
			} else if is.Details != nil && is.Details.Text != "" {
				b.WriteString(": ")
				b.WriteString(is.Details.Text)
			}
		}
		sep = ": "
	} else if e.Body != "" {
		b.WriteString(sep)
		b.WriteString(e.Body)
		sep = ": "
	}
	if e.Err != nil {
		b.WriteString(sep)
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns Err.
func (e *Error) Unwrap() error { return e.Err }

// Transient reports whether the same request may succeed later: a network
// failure; 408 or 429; a 5xx whose OperationOutcome's errors all have codes
// in the IssueType "transient" branch (the IG's signal that the poll, not
// the job, failed); or a 502, 503 or 504 without an OperationOutcome (a
// gateway speaking, not the FHIR server). Any other answer is final: for a
// status request, the job failed.
func (e *Error) Transient() bool {
	switch {
	case e.StatusCode == 0:
		return e.network
	case e.StatusCode == http.StatusTooManyRequests, e.StatusCode == http.StatusRequestTimeout:
		return true
	case e.StatusCode < 500:
		return false
	case e.Outcome != nil && len(e.Outcome.Issue) > 0:
		return outcomeTransient(e.Outcome)
	}
	switch e.StatusCode {
	case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

// Network reports whether no answer came because of a network failure
// (connection refused or reset, DNS, TLS, a body cut short...).
func (e *Error) Network() bool { return e.network }

// Issue returns the OperationOutcome's first error or fatal issue (or its
// first issue), or nil without an OperationOutcome.
func (e *Error) Issue() *fhirbulk.Issue {
	if e.Outcome == nil || len(e.Outcome.Issue) == 0 {
		return nil
	}
	for i := range e.Outcome.Issue {
		if s := e.Outcome.Issue[i].Severity; s == fhirbulk.SeverityError || s == fhirbulk.SeverityFatal {
			return &e.Outcome.Issue[i]
		}
	}
	return &e.Outcome.Issue[0]
}

// outcomeTransient: the error and fatal issues (all issues when there are
// none) are all in the transient branch.
func outcomeTransient(oo *fhirbulk.OperationOutcome) bool {
	n, transient := 0, 0
	for _, is := range oo.Issue {
		if is.Severity == fhirbulk.SeverityError || is.Severity == fhirbulk.SeverityFatal {
			n++
			if is.Code.Transient() {
				transient++
			}
		}
	}
	if n == 0 {
		for _, is := range oo.Issue {
			n++
			if is.Code.Transient() {
				transient++
			}
		}
	}
	return n > 0 && n == transient
}

// IsTransient reports whether err is an *Error whose Transient is true.
func IsTransient(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Transient()
}
