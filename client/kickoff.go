package client

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// KickoffRequest describes an export. The zero value asks for a system-level
// export of everything, by GET.
type KickoffRequest struct {
	// Level is system (default), patient or group.
	Level fhirbulk.Level
	// GroupID is the Group's id; required at group level.
	GroupID string
	// Method is "GET" or "POST" (a FHIR Parameters body). Default: POST
	// when Patients is set (patient is POST-only), GET otherwise.
	Method string

	// OutputFormat is _outputFormat; empty leaves it to the server
	// (application/fhir+ndjson).
	OutputFormat string
	// Since and Until are _since and _until; zero leaves them out.
	Since, Until time.Time
	// Types is _type: resource types (entries may be comma lists). GET
	// joins them with commas; POST sends one parameter each. The same
	// holds for Elements and IncludeAssociatedData.
	Types []string
	// Elements is _elements: "Type.element" or "element" entries.
	Elements []string
	// IncludeAssociatedData holds includeAssociatedData codes.
	IncludeAssociatedData []string
	// TypeFilters is _typeFilter, one "Type?query" search per entry (sent
	// as repeated parameters, STU3 style).
	TypeFilters []string
	// OrganizeOutputBy is organizeOutputBy, a resource type.
	OrganizeOutputBy string
	// AllowPartialManifests sends allowPartialManifests=true.
	AllowPartialManifests bool
	// Patients is the patient parameter: ids ("123") or references
	// ("Patient/123"). Patient and Group level, POST only.
	Patients []string

	// Lenient adds "handling=lenient" to the Prefer header: the server may
	// ignore parameters it does not support and report them in the
	// manifest's error[] (and, with this server, in Job.Outcome).
	Lenient bool

	// SeparateExportStatus adds "separate-export-status" to the Prefer
	// header (STU3): a server that honours it answers polls with 200 and
	// the job's status in X-Export-Status, which Status reads.
	SeparateExportStatus bool
}

// Job is an accepted kick-off.
type Job struct {
	// StatusURL is the absolute status URL (Content-Location) to poll,
	// wait on, and cancel.
	StatusURL string
	// Outcome is the OperationOutcome of the 202 answer, if it had one.
	// Under lenient handling it may list the parameters the server
	// ignored.
	Outcome *fhirbulk.OperationOutcome
}

// KickoffURL returns the kick-off URL the request is sent to: with the
// query string for GET, without for POST.
func (c *Client) KickoffURL(req *KickoffRequest) (string, error) {
	u, _, _, err := c.prepareKickoff(req)
	return u, err
}

// Kickoff starts an export and returns its status URL; req may be nil
// (a system-level export of everything). 429 (the server's
// concurrency limit) and transient 5xx answers are retried as Options say;
// a network failure is retried only when the connection was never made, so
// that no export is started twice. Any other answer than 202 is an *Error.
func (c *Client) Kickoff(ctx context.Context, req *KickoffRequest) (*Job, error) {
	if req == nil {
		req = &KickoffRequest{}
	}
	u, method, body, err := c.prepareKickoff(req)
	if err != nil {
		return nil, err
	}
	prefer := "respond-async"
	if req.Lenient {
		prefer += ", handling=lenient"
	}
	if req.SeparateExportStatus {
		prefer += ", separate-export-status"
	}
	r := &request{op: "kick-off", method: method, url: u, body: body, token: true, header: http.Header{
		"Accept": {"application/fhir+json"},
		"Prefer": {prefer},
	}}
	if body != nil {
		r.header.Set("Content-Type", "application/fhir+json")
	}
	resp, respBody, err := c.exchange(ctx, r, func(s int) bool { return s == http.StatusAccepted }, isDialError)
	if err != nil {
		return nil, err
	}
	loc := resp.Header.Get("Content-Location")
	if loc == "" {
		return nil, &Error{Op: r.op, Method: method, URL: u, StatusCode: resp.StatusCode, Err: ErrNoStatusURL}
	}
	status, err := resolve(u, loc)
	if err != nil {
		return nil, &Error{Op: r.op, Method: method, URL: u, StatusCode: resp.StatusCode, Err: fmt.Errorf("bad Content-Location %q: %w", loc, err)}
	}
	job := &Job{StatusURL: status}
	var oo fhirbulk.OperationOutcome
	if json.Unmarshal(respBody, &oo) == nil && oo.ResourceType == "OperationOutcome" {
		job.Outcome = &oo
	}
	return job, nil
}

// prepareKickoff validates req and returns the URL, method and body.
func (c *Client) prepareKickoff(req *KickoffRequest) (u, method string, body []byte, err error) {
	if req == nil {
		req = &KickoffRequest{}
	}
	invalid := func(format string, args ...any) error {
		return fmt.Errorf("client: %w: %s", ErrInvalidRequest, fmt.Sprintf(format, args...))
	}
	if c.base == "" {
		return "", "", nil, invalid("the client has no base URL")
	}
	u = c.base
	switch req.Level {
	case "", fhirbulk.LevelSystem:
		if req.GroupID != "" {
			return "", "", nil, invalid("a Group id needs the group level")
		}
		if len(req.Patients) > 0 {
			return "", "", nil, invalid("the patient parameter is not allowed at system level")
		}
		u += "/$export"
	case fhirbulk.LevelPatient:
		if req.GroupID != "" {
			return "", "", nil, invalid("a Group id needs the group level")
		}
		u += "/Patient/$export"
	case fhirbulk.LevelGroup:
		if req.GroupID == "" {
			return "", "", nil, invalid("the group level needs a Group id")
		}
		u += "/Group/" + url.PathEscape(req.GroupID) + "/$export"
	default:
		return "", "", nil, invalid("unknown level %q", req.Level)
	}
	method = strings.ToUpper(req.Method)
	switch method {
	case "":
		method = http.MethodGet
		if len(req.Patients) > 0 {
			method = http.MethodPost
		}
	case http.MethodGet:
		if len(req.Patients) > 0 {
			return "", "", nil, invalid("the patient parameter needs a POST kick-off")
		}
	case http.MethodPost:
	default:
		return "", "", nil, invalid("method %q: use GET or POST", req.Method)
	}
	if !req.Since.IsZero() && !req.Until.IsZero() && !req.Since.Before(req.Until) {
		return "", "", nil, invalid("_until must be later than _since")
	}

	var params []param
	add := func(name, kind, value string) { params = append(params, param{name, kind, value}) }
	if req.OutputFormat != "" {
		add("_outputFormat", "valueString", req.OutputFormat)
	}
	if !req.Since.IsZero() {
		add("_since", "valueInstant", formatInstant(req.Since))
	}
	if !req.Until.IsZero() {
		add("_until", "valueInstant", formatInstant(req.Until))
	}
	lists := []struct {
		name, kind string
		values     []string
	}{
		{"_type", "valueString", req.Types},
		{"_elements", "valueString", req.Elements},
		{"includeAssociatedData", "valueCode", req.IncludeAssociatedData},
	}
	for _, l := range lists {
		var values []string
		for _, v := range l.values {
			for _, item := range strings.Split(v, ",") {
				if item = strings.TrimSpace(item); item != "" {
					values = append(values, item)
				}
			}
		}
		if len(values) == 0 {
			continue
		}
		if method == http.MethodGet {
			add(l.name, l.kind, strings.Join(values, ","))
			continue
		}
		for _, v := range values {
			add(l.name, l.kind, v)
		}
	}
	for _, f := range req.TypeFilters {
		if !strings.Contains(f, "?") {
			return "", "", nil, invalid("_typeFilter %q is not of the form Type?query", f)
		}
		add("_typeFilter", "valueString", f)
	}
	if req.OrganizeOutputBy != "" {
		add("organizeOutputBy", "valueString", req.OrganizeOutputBy)
	}
	if req.AllowPartialManifests {
		add("allowPartialManifests", "valueBoolean", "true")
	}
	for _, p := range req.Patients {
		ref := p
		if !strings.HasPrefix(ref, "Patient/") {
			ref = "Patient/" + ref
		}
		add("patient", "valueReference", ref)
	}

	if method == http.MethodGet {
		if len(params) > 0 {
			q := url.Values{}
			for _, p := range params {
				q.Add(p.name, p.value)
			}
			u += "?" + q.Encode()
		}
		return u, method, nil, nil
	}
	body, err = parametersBody(params)
	return u, method, body, err
}

type param struct{ name, kind, value string }

// parametersBody encodes a FHIR Parameters resource.
func parametersBody(params []param) ([]byte, error) {
	type entry map[string]any
	res := struct {
		ResourceType string  `json:"resourceType"`
		Parameter    []entry `json:"parameter,omitempty"`
	}{ResourceType: "Parameters"}
	for _, p := range params {
		e := entry{"name": p.name}
		switch p.kind {
		case "valueBoolean":
			e[p.kind] = p.value == "true"
		case "valueReference":
			e[p.kind] = map[string]string{"reference": p.value}
		default:
			e[p.kind] = p.value
		}
		res.Parameter = append(res.Parameter, e)
	}
	return json.Marshal(res)
}

// formatInstant formats t as a FHIR instant, in UTC, keeping its precision.
func formatInstant(t time.Time) string {
	return t.UTC().Format(time.RFC3339Nano)
}
