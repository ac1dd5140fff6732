package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport/client"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// This file holds what the status and cancel commands say: one line per
// state of an export, with the server's OperationOutcome put in words.

// issueWords says what an OperationOutcome issue code means, for an issue
// without diagnostics.
var issueWords = map[fhirbulk.IssueType]string{
	fhirbulk.IssueInvalid:       "the request is invalid",
	fhirbulk.IssueStructure:     "the content is malformed",
	fhirbulk.IssueRequired:      "something required is missing",
	fhirbulk.IssueValue:         "a value is not valid",
	fhirbulk.IssueSecurity:      "a security check failed",
	fhirbulk.IssueLogin:         "the server wants a login",
	fhirbulk.IssueForbidden:     "the request is not allowed",
	fhirbulk.IssueProcessing:    "the server could not process the export",
	fhirbulk.IssueNotSupported:  "the server does not support the request",
	fhirbulk.IssueNotFound:      "the server does not know it",
	fhirbulk.IssueDeleted:       "it was cancelled or deleted",
	fhirbulk.IssueTooCostly:     "the export is too costly for the server",
	fhirbulk.IssueConflict:      "it conflicts with the state on the server",
	fhirbulk.IssueInformational: "the server has a message",
	fhirbulk.IssueException:     "the server hit an unexpected error",
	fhirbulk.IssueTransient:     "the server had a temporary failure",
	fhirbulk.IssueLockError:     "the server could not get a lock",
	fhirbulk.IssueNoStore:       "the server's storage is unavailable",
	fhirbulk.IssueTimeout:       "the server timed out",
	fhirbulk.IssueIncomplete:    "the server's answer is incomplete",
	fhirbulk.IssueThrottled:     "the server is throttling requests",
}

// issueText is an issue in words: its diagnostics, else its details' text,
// else what its code means.
func issueText(is fhirbulk.Issue) string {
	switch {
	case strings.TrimSpace(is.Diagnostics) != "":
		return strings.TrimSpace(is.Diagnostics)
	case is.Details != nil && strings.TrimSpace(is.Details.Text) != "":
		return strings.TrimSpace(is.Details.Text)
	}
	if w, ok := issueWords[is.Code]; ok {
		return w
	}
	if is.Code == "" {
		return ""
	}
	return strings.ReplaceAll(string(is.Code), "-", " ")
}

// outcomeText is an OperationOutcome in words: its error and fatal issues
// (all its issues when it has none), joined by "; ".
func outcomeText(oo *fhirbulk.OperationOutcome) string {
	if oo == nil {
		return ""
	}
	var serious []fhirbulk.Issue
	for _, is := range oo.Issue {
		if is.Severity == fhirbulk.SeverityError || is.Severity == fhirbulk.SeverityFatal {
			serious = append(serious, is)
		}
	}
	if len(serious) == 0 {
		serious = oo.Issue
	}
	var parts []string
	seen := map[string]bool{}
	for _, is := range serious {
		if t := issueText(is); t != "" && !seen[t] {
			seen[t] = true
			parts = append(parts, t)
		}
	}
	return strings.Join(parts, "; ")
}

// answerText is an error answer in words: the OperationOutcome (or the
// start of another body), and the HTTP status in parentheses.
func answerText(e *client.Error) string {
	status := fmt.Sprintf("%d %s", e.StatusCode, http.StatusText(e.StatusCode))
	text := outcomeText(e.Outcome)
	if text == "" {
		text = strings.TrimSpace(e.Body)
	}
	if text == "" {
		return "the server answered " + status
	}
	return text + " (" + status + ")"
}

// issueCode is the code of the answer's first error issue, "" without an
// OperationOutcome.
func issueCode(e *client.Error) fhirbulk.IssueType {
	if is := e.Issue(); is != nil {
		return is.Code
	}
	return ""
}

// commonFailure reports the failures status and cancel share: an
// interrupt, no answer from the server, the server unavailable through the
// retries, and errors that are not answers. ok is false for any other
// error answer, which the command puts in its own words.
func commonFailure(ctx context.Context, stderr io.Writer, err error, interrupted string) (code int, ok bool) {
	var ce *client.Error
	switch {
	case ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)):
		fmt.Fprintf(stderr, "bulkexport: interrupted; %s\n", interrupted)
		return exitInterrupted, true
	case !errors.As(err, &ce):
		fmt.Fprintf(stderr, "bulkexport: %v\n", err)
		return exitCode(ctx, err), true
	case ce.Network():
		fmt.Fprintf(stderr, "bulkexport: the server could not be reached at %s: %v\n", ce.URL, ce.Err)
		return exitNetwork, true
	case ce.Transient():
		fmt.Fprintf(stderr, "bulkexport: the server stayed unavailable through the retries: %s; try again later\n", answerText(ce))
		return exitNetwork, true
	case ce.StatusCode < 400:
		// An answer the client could not use, such as a manifest that
		// is not JSON.
		fmt.Fprintf(stderr, "bulkexport: %v\n", err)
		return exitFailed, true
	}
	return 0, false
}

// reportStatus prints the state of an export that a status poll found:
// a line on stderr for every state, and the manifest on stdout when the
// export is complete. It returns the state's exit code.
func reportStatus(ctx context.Context, stdout, stderr io.Writer, st *client.Status, err error) int {
	if err != nil {
		return reportStatusError(ctx, stderr, err)
	}
	if !st.Complete {
		fmt.Fprintln(stderr, runningLine(st))
		return exitRunning
	}
	b, err := json.MarshalIndent(st.Manifest, "", "  ")
	if err != nil {
		fmt.Fprintf(stderr, "bulkexport: %v\n", err)
		return exitFailed
	}
	fmt.Fprintf(stdout, "%s\n", b)
	fmt.Fprintln(stderr, completedLine(st))
	return exitOK
}

// runningLine is "in progress: X-PROGRESS (poll again in D)".
func runningLine(st *client.Status) string {
	progress := strings.TrimSpace(st.Progress)
	if progress == "" {
		progress = "the server gives no progress"
	}
	line := "in progress: " + progress
	if st.RetryAfter > 0 {
		line += fmt.Sprintf(" (poll again in %v)", st.RetryAfter)
	}
	return line
}

// completedLine is "completed: N files, M resources; the files expire at
// T", each part as far as the manifest and the Expires header tell.
func completedLine(st *client.Status) string {
	m := st.Manifest
	if m == nil {
		m = &fhirbulk.Manifest{}
	}
	n := len(m.Output) + len(m.Deleted) + len(m.Error)
	var b strings.Builder
	fmt.Fprintf(&b, "completed: %d %s", n, plural(n, "file", "files"))
	if len(m.Deleted) > 0 || len(m.Error) > 0 {
		fmt.Fprintf(&b, " (%d output", len(m.Output))
		if len(m.Deleted) > 0 {
			fmt.Fprintf(&b, ", %d of deleted resources", len(m.Deleted))
		}
		if len(m.Error) > 0 {
			fmt.Fprintf(&b, ", %d of errors", len(m.Error))
		}
		b.WriteString(")")
	}
	var resources int64
	counted := 0
	for _, f := range m.Output {
		if f.Count != nil {
			resources += *f.Count
			counted++
		}
	}
	switch {
	case counted == 0:
		// The manifest has no counts: nothing to say.
	case counted == len(m.Output):
		fmt.Fprintf(&b, ", %d %s", resources, plural(int(resources), "resource", "resources"))
	default:
		fmt.Fprintf(&b, ", at least %d resources (%d of %d output files give a count)", resources, counted, len(m.Output))
	}
	if !st.Expires.IsZero() {
		fmt.Fprintf(&b, "; the files expire at %s", st.Expires.UTC().Format(time.RFC3339))
	}
	return b.String()
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// reportStatusError prints the state an error answer to a status poll
// means and returns its exit code: cancelled (404 with issue code
// deleted), expired or unknown (404 otherwise, or 410), failed (any other
// final error answer).
func reportStatusError(ctx context.Context, stderr io.Writer, err error) int {
	if code, ok := commonFailure(ctx, stderr, err, "the export is unaffected on the server"); ok {
		return code
	}
	var ce *client.Error
	errors.As(err, &ce) // commonFailure has handled every other error
	switch code := issueCode(ce); {
	case ce.StatusCode == http.StatusNotFound && code == fhirbulk.IssueDeleted:
		text := outcomeText(ce.Outcome)
		if text == "" || text == issueWords[fhirbulk.IssueDeleted] {
			text = "the export was cancelled"
		}
		fmt.Fprintf(stderr, "cancelled: %s\n", text)
		return exitCancelled
	case ce.StatusCode == http.StatusGone,
		ce.StatusCode == http.StatusNotFound && (code == fhirbulk.IssueNotFound || code == ""):
		fmt.Fprintf(stderr, "expired or unknown: %s\n", answerText(ce))
		return exitGone
	case ce.StatusCode == http.StatusUnauthorized:
		fmt.Fprintf(stderr, "bulkexport: the server refused the credentials: %s\n", answerText(ce))
		return exitFailed
	}
	fmt.Fprintf(stderr, "failed: %s\n", answerText(ce))
	return exitFailed
}

// reportCancel prints what a cancel request did and returns its exit
// code. An export already cancelled is success: cancel is idempotent.
func reportCancel(ctx context.Context, stdout, stderr io.Writer, err error) int {
	if err == nil {
		fmt.Fprintln(stdout, "cancelled")
		return exitOK
	}
	if code, ok := commonFailure(ctx, stderr, err, "the export may or may not have been cancelled; run cancel again"); ok {
		return code
	}
	var ce *client.Error
	errors.As(err, &ce)
	switch code := issueCode(ce); {
	case ce.StatusCode == http.StatusNotFound && code == fhirbulk.IssueDeleted:
		fmt.Fprintln(stdout, "already cancelled")
		return exitOK
	case ce.StatusCode == http.StatusNotFound, ce.StatusCode == http.StatusGone:
		// This library's server (the eHealth policy) answers 404
		// not-found for a job that has completed or failed, and for one
		// that has expired or never existed.
		fmt.Fprintf(stderr, "bulkexport: the export cannot be cancelled: %s\n", answerText(ce))
		return exitFailed
	case ce.StatusCode == http.StatusUnauthorized:
		fmt.Fprintf(stderr, "bulkexport: the server refused the credentials: %s\n", answerText(ce))
		return exitFailed
	}
	fmt.Fprintf(stderr, "bulkexport: the server refused to cancel the export: %s\n", answerText(ce))
	return exitFailed
}
