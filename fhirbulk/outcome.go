package fhirbulk

import "slices"

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

// Clone returns a deep copy of o (nil for nil).
func (o *OperationOutcome) Clone() *OperationOutcome {
	if o == nil {
		return nil
	}
	c := *o
	c.Issue = make([]Issue, len(o.Issue))
	for i, is := range o.Issue {
		is.Expression = slices.Clone(is.Expression)
		if is.Details != nil {
			d := *is.Details
			is.Details = &d
		}
		c.Issue[i] = is
	}
	return &c
}
