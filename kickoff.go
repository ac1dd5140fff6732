package bulkexport

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"io"
	"mime"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Output formats. Every alias the IG requires is accepted and normalised to
// FormatNDJSON.
const FormatNDJSON = "application/fhir+ndjson"

var ndjsonAliases = []string{"application/fhir+ndjson", "application/ndjson", "ndjson"}

// Values of includeAssociatedData defined by the IG.
const (
	AssociatedLatestProvenance   = "LatestProvenanceResources"
	AssociatedRelevantProvenance = "RelevantProvenanceResources"
)

// rawParam is one kick-off parameter as the client sent it, before
// validation: a query parameter, or one Parameters.parameter entry.
type rawParam struct {
	name  string
	value string
}

// paramSpec says how a kick-off parameter may be used.
type paramSpec struct {
	repeat   bool // 0..*: repeats are merged
	comma    bool // values are comma lists
	postOnly bool
	noSystem bool // not allowed at system level
}

var paramSpecs = map[string]paramSpec{
	"_outputFormat":         {},
	"_since":                {},
	"_until":                {},
	"_type":                 {repeat: true, comma: true},
	"_elements":             {repeat: true, comma: true},
	"includeAssociatedData": {repeat: true, comma: true},
	"_typeFilter":           {repeat: true},
	"organizeOutputBy":      {},
	"allowPartialManifests": {},
	"patient":               {repeat: true, postOnly: true, noSystem: true},
	// _format is FHIR's general response-format override; only JSON is
	// produced, so it is checked like Accept.
	"_format": {},
}

// kickoffConfig is what validation needs from the host.
type kickoffConfig struct {
	// types are the resource types the level exports; nil accepts any
	// well-formed type name.
	types []string
	// associated lists the includeAssociatedData codes the engine honours.
	associated []string
	// organizeBy lists the types organizeOutputBy may name.
	organizeBy []string
	// checkFilter, if set, rejects _typeFilter searches the host cannot run.
	checkFilter func(typ string, q url.Values) error
	// maxValues caps the number of values of one repeated parameter.
	maxValues int
	// maxLength caps the length of one value.
	maxLength int
}

// readKickoffParams collects the parameters of a GET (query string) or POST
// (Parameters body) kick-off.
func readKickoffParams(r *http.Request, maxBody int64) ([]rawParam, error) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid, Message: "malformed query string"}
	}
	if r.Method == http.MethodGet {
		return queryParams(q)
	}
	if len(q) > 0 {
		// _format is the only query parameter that makes sense with POST.
		for k := range q {
			if k != "_format" {
				return nil, paramError(k, fhirbulk.IssueInvalid, "a POST kick-off takes its parameters in the Parameters body, not the query string")
			}
		}
	}
	ct := r.Header.Get("Content-Type")
	if ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != contentTypeFHIRJSON && mt != contentTypeJSON) {
			return nil, &Error{Status: http.StatusUnsupportedMediaType, Code: fhirbulk.IssueNotSupported,
				Message: "the kick-off body must be a FHIR Parameters resource in application/fhir+json"}
		}
	}
	body, err := readBody(r, maxBody)
	if err != nil {
		return nil, err
	}
	params, err := parseParametersBody(body)
	if err != nil {
		return nil, err
	}
	if f := q["_format"]; len(f) > 0 {
		params = append(params, rawParam{"_format", f[0]})
	}
	return params, nil
}

// readBody reads a request body of at most maxBody bytes. A body cut off
// by the server's read deadline gets 408, one the client broke off 400,
// and one too long 413 (through DefaultErrorMapper's MaxBytesError case).
func readBody(r *http.Request, maxBody int64) ([]byte, error) {
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxBody))
	var mbe *http.MaxBytesError
	switch {
	case err == nil, errors.As(err, &mbe):
		return body, err
	case errors.Is(err, os.ErrDeadlineExceeded):
		return nil, &Error{Status: http.StatusRequestTimeout, Code: fhirbulk.IssueTimeout, Message: "the request body did not arrive in time", Err: err}
	}
	return nil, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid, Message: "the request body could not be read", Err: err}
}

func queryParams(q url.Values) ([]rawParam, error) {
	var out []rawParam
	keys := make([]string, 0, len(q))
	for k := range q {
		if k == "" {
			// "=x" or "=": malformed, as a nameless parameter in a
			// Parameters body is; not something lenient handling can name.
			return nil, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid, Message: "a query parameter has no name"}
		}
		keys = append(keys, k)
	}
	slices.Sort(keys) // deterministic error messages
	for _, k := range keys {
		for _, v := range q[k] {
			out = append(out, rawParam{k, v})
		}
	}
	return out, nil
}

// parseParametersBody reads a FHIR Parameters resource. Each parameter must
// have a name and exactly one value[x] of a primitive, Reference or Coding
// type.
func parseParametersBody(body []byte) ([]rawParam, error) {
	bad := func(format string, args ...any) error {
		return &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueStructure, Message: fmt.Sprintf(format, args...)}
	}
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		return nil, nil // a POST with no body is a kick-off with no parameters
	}
	if !utf8.Valid(body) {
		return nil, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid, Message: "the Parameters body is not valid UTF-8"}
	}
	var res struct {
		ResourceType string                       `json:"resourceType"`
		Parameter    []map[string]json.RawMessage `json:"parameter"`
	}
	if err := json.Unmarshal(body, &res); err != nil {
		return nil, bad("the body is not a valid Parameters resource: %v", err)
	}
	if res.ResourceType != "Parameters" {
		return nil, bad("the body must be a Parameters resource, not %q", res.ResourceType)
	}
	out := make([]rawParam, 0, len(res.Parameter))
	for i, p := range res.Parameter {
		var name string
		if err := json.Unmarshal(p["name"], &name); err != nil || name == "" {
			return nil, bad("Parameters.parameter[%d] has no name", i)
		}
		var value string
		n := 0
		for k, raw := range p {
			if !strings.HasPrefix(k, "value") {
				switch k {
				case "name", "id", "extension", "modifierExtension":
					continue
				case "part", "resource":
					return nil, paramError(name, fhirbulk.IssueNotSupported, "parameter %q must carry a value, not %s", name, k)
				default:
					return nil, bad("Parameters.parameter[%d] has an unknown element %q", i, k)
				}
			}
			n++
			v, err := parameterValue(k, raw)
			if err != nil {
				return nil, paramError(name, fhirbulk.IssueInvalid, "%v", err)
			}
			value = v
		}
		if n != 1 {
			return nil, paramError(name, fhirbulk.IssueInvalid, "parameter %q must have exactly one value[x]", name)
		}
		out = append(out, rawParam{name, value})
	}
	return out, nil
}

func parameterValue(key string, raw json.RawMessage) (string, error) {
	if string(raw) == "null" {
		// FHIR JSON has no null primitives; json.Unmarshal would turn it
		// into "" or false without an error.
		return "", fmt.Errorf("%s must not be null", key)
	}
	switch key {
	case "valueString", "valueCode", "valueInstant", "valueDateTime", "valueUri", "valueUrl",
		"valueCanonical", "valueId", "valueDate":
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", fmt.Errorf("%s must be a JSON string", key)
		}
		return s, nil
	case "valueBoolean":
		var b bool
		if err := json.Unmarshal(raw, &b); err != nil {
			return "", fmt.Errorf("valueBoolean must be true or false")
		}
		return strconv.FormatBool(b), nil
	case "valueReference":
		var ref struct {
			Reference string `json:"reference"`
		}
		if err := json.Unmarshal(raw, &ref); err != nil || ref.Reference == "" {
			return "", fmt.Errorf("valueReference must hold a reference")
		}
		return ref.Reference, nil
	case "valueCoding":
		var c struct {
			Code string `json:"code"`
		}
		if err := json.Unmarshal(raw, &c); err != nil || c.Code == "" {
			return "", fmt.Errorf("valueCoding must hold a code")
		}
		return c.Code, nil
	}
	return "", fmt.Errorf("%s is not a supported value type", key)
}

// badBytes reports whether s is invalid UTF-8 or holds a NUL byte. Such a
// string is bad input everywhere in the protocol: PostgreSQL refuses NUL in
// text and \u0000 in jsonb, and other stores would hand it back mangled.
// Other control characters are valid text and pass; every store must
// round-trip them (storetest's StringsRoundTrip).
func badBytes(s string) bool {
	return !utf8.ValidString(s) || strings.IndexByte(s, 0) >= 0
}

// checkBytes refuses parameter names and values that badBytes rejects.
func checkBytes(name, value string) *Error {
	if badBytes(name) || badBytes(value) {
		return &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueInvalid,
			Message: "parameter names and values must be valid UTF-8 without NUL characters"}
	}
	return nil
}

// parseKickoff validates the parameters for a level and method. Under
// lenient handling a bad parameter is dropped and recorded in Ignored
// instead of failing the request.
func parseKickoff(params []rawParam, method string, level fhirbulk.Level, lenient bool, cfg kickoffConfig) (Request, error) {
	req := Request{Method: method, OutputFormat: FormatNDJSON, Lenient: lenient}
	maxValues := cfg.maxValues
	if maxValues <= 0 {
		maxValues = 1000
	}

	maxLength := cfg.maxLength
	if maxLength <= 0 {
		maxLength = 8 << 10
	}
	if len(params) > 4*maxValues {
		return req, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueTooCostly, Message: fmt.Sprintf("more than %d parameters", 4*maxValues)}
	}
	// Group the values by name, in the order the client sent them.
	values := map[string][]string{}
	var order []string
	for _, p := range params {
		if err := checkBytes(p.name, p.value); err != nil {
			// Refused before lenient handling: a bad name cannot be
			// recorded as ignored, and no store could hold it.
			return req, err
		}
		if len(p.value) > maxLength || len(p.name) > 64 {
			name := p.name
			if len(name) > 64 {
				name = name[:64] + "…"
			}
			return req, paramError(name, fhirbulk.IssueTooCostly, "value longer than %d bytes", maxLength)
		}
		if _, seen := values[p.name]; !seen {
			order = append(order, p.name)
		}
		values[p.name] = append(values[p.name], p.value)
	}

	// reject fails the request, or under lenient handling records the
	// parameter as ignored and moves on.
	reject := func(err *Error) error {
		if !lenient {
			return err
		}
		req.Ignored = append(req.Ignored, fhirbulk.Issue{
			Severity:    fhirbulk.SeverityWarning,
			Code:        err.Code,
			Diagnostics: "ignored under handling=lenient: " + err.Error(),
			Expression:  []string{err.Param},
		})
		return nil
	}

	// Pass 1: check shape (known, levels, method, cardinality) and split
	// comma lists.
	lists := map[string][]string{}
	for _, name := range order {
		vs := values[name]
		spec, known := paramSpecs[name]
		var perr *Error
		switch {
		case !known:
			perr = paramError(name, fhirbulk.IssueNotSupported, "unknown or unsupported parameter")
		case spec.noSystem && level == fhirbulk.LevelSystem:
			perr = paramError(name, fhirbulk.IssueNotSupported, "not allowed at system level")
		case spec.postOnly && method != http.MethodPost:
			perr = paramError(name, fhirbulk.IssueNotSupported, "allowed only in a POST kick-off")
		case !spec.repeat && len(vs) > 1:
			perr = paramError(name, fhirbulk.IssueInvalid, "may appear only once")
		}
		if perr == nil && spec.comma {
			var split []string
			for _, v := range vs {
				for _, item := range strings.Split(v, ",") {
					item = strings.TrimSpace(item)
					if item == "" {
						perr = paramError(name, fhirbulk.IssueInvalid, "empty entry in the list %q", v)
						break
					}
					split = append(split, item)
				}
			}
			vs = split
		}
		if perr == nil && len(vs) > maxValues {
			perr = paramError(name, fhirbulk.IssueTooCostly, "more than %d values", maxValues)
		}
		if perr != nil {
			if name == "_type" {
				// Dropping _type would silently widen the export to every
				// type (see pass 2), so it is refused even when lenient.
				return req, perr
			}
			if err := reject(perr); err != nil {
				return req, err
			}
			continue
		}
		lists[name] = vs
	}

	// Pass 2: the values. _type goes first: _typeFilter and _elements are
	// checked against it.
	if vs, ok := lists["_type"]; ok {
		for _, t := range vs {
			var perr *Error
			switch {
			case !validTypeName(t):
				perr = paramError("_type", fhirbulk.IssueInvalid, "%q is not a resource type", t)
			case cfg.types != nil && !slices.Contains(cfg.types, t):
				perr = paramError("_type", fhirbulk.IssueNotSupported, "resource type %s is not exported at %s level", t, level)
			}
			if perr != nil {
				if err := reject(perr); err != nil {
					return req, err
				}
				continue
			}
			if !slices.Contains(req.Types, t) {
				req.Types = append(req.Types, t)
			}
		}
		if len(req.Types) == 0 {
			// Every listed type was dropped under lenient handling; an
			// empty _type would silently widen the export to every type.
			return req, paramError("_type", fhirbulk.IssueNotSupported, "none of the requested types is exported at %s level", level)
		}
	}

	for _, name := range order {
		vs, ok := lists[name]
		if !ok || name == "_type" {
			continue
		}
		var perr *Error
		switch name {
		case "_format":
			if !acceptableFormat(mediaTypePlus(vs[0])) {
				return req, &Error{Status: http.StatusNotAcceptable, Code: fhirbulk.IssueNotSupported, Param: name,
					Message: fmt.Sprintf("only FHIR JSON responses are produced, not %q", vs[0])}
			}
		case "_outputFormat":
			if !slices.Contains(ndjsonAliases, mediaTypePlus(vs[0])) {
				perr = paramError(name, fhirbulk.IssueNotSupported, "output format %q is not supported; use application/fhir+ndjson", vs[0])
			}
		case "_since", "_until":
			t, err := fhirbulk.ParseInstant(vs[0])
			if err != nil {
				perr = paramError(name, fhirbulk.IssueInvalid, "%v", err)
			} else if name == "_since" {
				req.Since = t
			} else {
				req.Until = t
			}
		case "_elements":
			for _, e := range vs {
				if perr = checkElement(e, &req, cfg); perr != nil {
					if err := reject(perr); err != nil {
						return req, err
					}
					perr = nil
					continue
				}
				if !slices.Contains(req.Elements, e) {
					req.Elements = append(req.Elements, e)
				}
			}
		case "includeAssociatedData":
			for _, v := range vs {
				if !slices.Contains(cfg.associated, v) {
					perr = paramError(name, fhirbulk.IssueNotSupported, "value %q is not supported", v)
					if err := reject(perr); err != nil {
						return req, err
					}
					perr = nil
					continue
				}
				if !slices.Contains(req.IncludeAssociatedData, v) {
					req.IncludeAssociatedData = append(req.IncludeAssociatedData, v)
				}
			}
		case "_typeFilter":
			for _, v := range vs {
				filters, ferr := parseTypeFilterValue(v)
				for _, f := range filters {
					if ferr == nil {
						ferr = checkTypeFilter(f, &req, cfg)
					}
				}
				if ferr != nil {
					if err := reject(ferr); err != nil {
						return req, err
					}
					continue
				}
				req.TypeFilters = append(req.TypeFilters, filters...)
			}
		case "organizeOutputBy":
			switch {
			case !validTypeName(vs[0]):
				perr = paramError(name, fhirbulk.IssueInvalid, "%q is not a resource type", vs[0])
			case !slices.Contains(cfg.organizeBy, vs[0]):
				perr = paramError(name, fhirbulk.IssueNotSupported, "output cannot be organized by %s", vs[0])
			default:
				req.OrganizeOutputBy = vs[0]
			}
		case "allowPartialManifests":
			b, err := strconv.ParseBool(vs[0])
			if err != nil || (vs[0] != "true" && vs[0] != "false") {
				perr = paramError(name, fhirbulk.IssueInvalid, "must be true or false, not %q", vs[0])
			} else {
				req.AllowPartialManifests = b
			}
		case "patient":
			for _, v := range vs {
				id, ok := strings.CutPrefix(v, "Patient/")
				if !ok || !validID(id) {
					// Under lenient handling only this reference is
					// dropped; the others still restrict the export.
					if err := reject(paramError(name, fhirbulk.IssueInvalid, "%q is not a Patient reference (Patient/{id})", v)); err != nil {
						return req, err
					}
					continue
				}
				if !slices.Contains(req.Patients, id) {
					req.Patients = append(req.Patients, id)
				}
			}
			if len(req.Patients) == 0 {
				// Every reference was dropped: an empty list would
				// silently widen the export to every patient.
				return req, paramError(name, fhirbulk.IssueInvalid, "none of the patient references is valid")
			}
		}
		if perr != nil {
			if err := reject(perr); err != nil {
				return req, err
			}
		}
	}
	if !req.Since.IsZero() && !req.Until.IsZero() && !req.Since.Before(req.Until) {
		perr := paramError("_until", fhirbulk.IssueInvalid, "_until must be later than _since")
		if err := reject(perr); err != nil {
			return req, err
		}
		req.Until = time.Time{}
	}
	return req, nil
}

func checkElement(e string, req *Request, cfg kickoffConfig) *Error {
	typ, el, typed := cutDot(e)
	if typed {
		if !validTypeName(typ) {
			return paramError("_elements", fhirbulk.IssueInvalid, "%q: %q is not a resource type", e, typ)
		}
		if cfg.types != nil && !slices.Contains(cfg.types, typ) {
			return paramError("_elements", fhirbulk.IssueNotSupported, "%q: resource type %s is not exported", e, typ)
		}
	}
	if !validElementName(el) {
		return paramError("_elements", fhirbulk.IssueInvalid, "%q is not a top-level element (Type.element or element)", e)
	}
	return nil
}

// parseTypeFilterValue splits one _typeFilter value into its queries. STU3
// puts one query in each value; STU1/STU2 clients may join several with
// commas, so a comma followed by "Type?" starts a new query.
func parseTypeFilterValue(v string) ([]TypeFilter, *Error) {
	var out []TypeFilter
	for _, part := range splitTypeFilter(v) {
		typ, query, ok := strings.Cut(part, "?")
		if !ok || !validTypeName(typ) {
			return nil, paramError("_typeFilter", fhirbulk.IssueInvalid, "%q is not of the form Type?query", part)
		}
		q, err := url.ParseQuery(query)
		if err != nil || len(q) == 0 {
			return nil, paramError("_typeFilter", fhirbulk.IssueInvalid, "%q has no valid search query", part)
		}
		for k, vs := range q {
			// The query was checked before it was decoded: a search name or
			// value that decodes to NUL or invalid UTF-8 ("%2500") would
			// reach the Source, which may hand it to a database.
			if badBytes(k) || slices.ContainsFunc(vs, badBytes) {
				return nil, paramError("_typeFilter", fhirbulk.IssueInvalid, "%q: search names and values must be valid UTF-8 without NUL characters", part)
			}
			switch k {
			case "_include", "_revinclude", "_sort", "_elements", "_count", "_summary", "_total", "_contained", "_containedType":
				return nil, paramError("_typeFilter", fhirbulk.IssueNotSupported, "%q: search result parameter %s is not allowed", part, k)
			}
		}
		out = append(out, TypeFilter{Type: typ, Query: query})
	}
	return out, nil
}

func splitTypeFilter(v string) []string {
	var parts []string
	start := 0
	for i := 0; i < len(v); i++ {
		if v[i] != ',' {
			continue
		}
		j := i + 1
		for j < len(v) && (v[j] >= 'A' && v[j] <= 'Z' || v[j] >= 'a' && v[j] <= 'z') {
			j++
		}
		if j > i+1 && j < len(v) && v[j] == '?' && v[i+1] >= 'A' && v[i+1] <= 'Z' {
			parts = append(parts, v[start:i])
			start = i + 1
		}
	}
	return append(parts, v[start:])
}

func checkTypeFilter(f TypeFilter, req *Request, cfg kickoffConfig) *Error {
	if len(req.Types) > 0 && !slices.Contains(req.Types, f.Type) {
		return paramError("_typeFilter", fhirbulk.IssueInvalid, "%q: type %s is not among _type", f.String(), f.Type)
	}
	if cfg.types != nil && !slices.Contains(cfg.types, f.Type) {
		return paramError("_typeFilter", fhirbulk.IssueNotSupported, "%q: resource type %s is not exported", f.String(), f.Type)
	}
	if cfg.checkFilter != nil {
		if err := cfg.checkFilter(f.Type, f.Values()); err != nil {
			return paramError("_typeFilter", fhirbulk.IssueNotSupported, "%q: %v", f.String(), err)
		}
	}
	return nil
}

// validTypeName reports whether s looks like a FHIR resource type name.
func validTypeName(s string) bool {
	if s == "" || len(s) > 64 || s[0] < 'A' || s[0] > 'Z' {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
			return false
		}
	}
	return true
}

func validElementName(s string) bool {
	s = strings.TrimSuffix(s, "[x]")
	if s == "" || len(s) > 64 || !(s[0] >= 'a' && s[0] <= 'z' || s[0] == '_') {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// validID reports whether s is a FHIR id: [A-Za-z0-9-.]{1,64}.
func validID(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

// mediaTypePlus restores the "+" of a media type such as
// application/fhir+ndjson that reached the query string unencoded and was
// decoded as a space. A media type never holds a space.
func mediaTypePlus(s string) string { return strings.ReplaceAll(s, " ", "+") }

// acceptableFormat reports whether a _format value asks for JSON.
func acceptableFormat(f string) bool {
	switch f {
	case "json", contentTypeFHIRJSON, contentTypeJSON, "application/json+fhir":
		return true
	}
	return false
}

// acceptsJSON reports whether an Accept header admits a JSON answer. A
// missing header means FHIR JSON.
func acceptsJSON(accept string) bool {
	if strings.TrimSpace(accept) == "" {
		return true
	}
	for _, part := range strings.Split(accept, ",") {
		mt, params, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err != nil {
			continue
		}
		if q, ok := params["q"]; ok {
			if f, err := strconv.ParseFloat(q, 64); err == nil && f == 0 {
				continue
			}
		}
		switch mt {
		case "*/*", "application/*", contentTypeFHIRJSON, contentTypeJSON, "application/json+fhir":
			return true
		}
	}
	return false
}

// preferences is the parsed Prefer header (RFC 7240).
type preferences struct {
	respondAsync         bool
	lenient              bool
	separateExportStatus bool
}

func parsePrefer(h http.Header) preferences {
	var p preferences
	for _, line := range h.Values("Prefer") {
		for _, tok := range strings.Split(line, ",") {
			tok, _, _ = strings.Cut(tok, ";")
			k, v, _ := strings.Cut(strings.TrimSpace(tok), "=")
			k = strings.ToLower(strings.TrimSpace(k))
			v = strings.ToLower(strings.Trim(strings.TrimSpace(v), `"`))
			switch {
			case k == "respond-async":
				p.respondAsync = true
			case k == "handling" && v == "lenient":
				p.lenient = true
			case k == "handling" && v == "strict":
				p.lenient = false
			case k == "separate-export-status":
				p.separateExportStatus = true
			}
		}
	}
	return p
}
