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
	"sync"
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

// paramSpec says how a kick-off parameter may be used, and how its values
// are checked.
type paramSpec struct {
	repeat   bool // 0..*: repeats are merged
	comma    bool // values are comma lists
	postOnly bool
	noSystem bool // not allowed at system level
	// strict: a misused parameter is refused even under lenient handling.
	strict bool
	// first: the values are parsed before the other parameters', which
	// are checked against them.
	first bool
	// parse checks the values (comma lists split) and records them in the
	// request being built. It hands a bad value or parameter to
	// kickoffParser.reject, and returns an error only to fail the request.
	parse func(p *kickoffParser, name string, vs []string) error
}

var paramSpecs = map[string]paramSpec{
	"_outputFormat": {parse: parseOutputFormat},
	"_since":        {parse: parseSince},
	"_until":        {parse: parseUntil},
	// Dropping _type would silently widen the export to every type, so a
	// misused one is refused even when lenient; _typeFilter and _elements
	// are checked against it.
	"_type":                 {repeat: true, comma: true, strict: true, first: true, parse: parseTypes},
	"_elements":             {repeat: true, comma: true, parse: parseElements},
	"includeAssociatedData": {repeat: true, comma: true, parse: parseAssociatedData},
	"_typeFilter":           {repeat: true, parse: parseTypeFilters},
	"organizeOutputBy":      {parse: parseOrganizeOutputBy},
	"allowPartialManifests": {parse: parseAllowPartialManifests},
	"patient":               {repeat: true, postOnly: true, noSystem: true, parse: parsePatients},
	// _format is FHIR's general response-format override; only JSON is
	// produced, so it is checked like Accept.
	"_format": {parse: parseFormat},
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
//
// It runs in two passes over the parameters, in the order the client first
// sent each name: pass 1 checks each parameter's use (kickoffParser.shape),
// pass 2 its values (paramSpec.parse), those of a first parameter (_type)
// before the others. So a misused parameter is reported before a bad
// value, and _since and _until are compared last.
func parseKickoff(params []rawParam, method string, level fhirbulk.Level, lenient bool, cfg kickoffConfig) (Request, error) {
	p := kickoffParsers.Get().(*kickoffParser)
	*p = kickoffParser{
		req:    Request{Method: method, OutputFormat: FormatNDJSON, Lenient: lenient},
		method: method,
		level:  level,
		cfg:    cfg,
	}
	req, err := p.run(params)
	*p = kickoffParser{} // the pool keeps nothing of the request
	kickoffParsers.Put(p)
	return req, err
}

// kickoffParsers recycles parser state. Handed to the table's parse
// functions, a kickoffParser escapes to the heap, and allocating one for
// every kick-off cost more than the parsing of a short query.
var kickoffParsers = sync.Pool{New: func() any { return new(kickoffParser) }}

// run parses the parameters into p.req (see parseKickoff).
func (p *kickoffParser) run(params []rawParam) (Request, error) {
	if p.cfg.maxValues <= 0 {
		p.cfg.maxValues = 1000
	}
	if p.cfg.maxLength <= 0 {
		p.cfg.maxLength = 8 << 10
	}
	// Room for the usual few parameters without a heap allocation.
	grouped, err := p.group(make([]kickoffParam, 0, 8), params)
	if err != nil {
		return p.req, err
	}
	for i := range grouped {
		if err := p.shape(&grouped[i]); err != nil {
			return p.req, err
		}
	}
	if err := p.parseValues(grouped, true); err != nil {
		return p.req, err
	}
	if err := p.parseValues(grouped, false); err != nil {
		return p.req, err
	}
	err = p.checkPeriod()
	return p.req, err
}

// kickoffParser is the state of one parseKickoff: the request being built,
// and what its parameters are checked against.
type kickoffParser struct {
	req    Request
	method string
	level  fhirbulk.Level
	cfg    kickoffConfig // maxValues and maxLength set
}

// kickoffParam is one kick-off parameter: its values, repeats merged in the
// order the client sent them.
type kickoffParam struct {
	name   string
	values []string
	spec   paramSpec
	ok     bool // passed pass 1: values are to be parsed
}

// reject fails the request, or under lenient handling records the
// parameter as ignored and moves on (returning nil).
func (p *kickoffParser) reject(err *Error) error {
	if !p.req.Lenient {
		return err
	}
	p.req.Ignored = append(p.req.Ignored, fhirbulk.Issue{
		Severity:    fhirbulk.SeverityWarning,
		Code:        err.Code,
		Diagnostics: "ignored under handling=lenient: " + err.Error(),
		Expression:  []string{err.Param},
	})
	return nil
}

// group checks the number of parameters and each name and value (bytes and
// length), then groups the values by name, appended to out in the order
// the client sent them. These checks come before lenient handling: a bad
// name cannot be recorded as ignored, and no store could hold it.
func (p *kickoffParser) group(out []kickoffParam, params []rawParam) ([]kickoffParam, error) {
	if len(params) > 4*p.cfg.maxValues {
		return nil, &Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueTooCostly, Message: fmt.Sprintf("more than %d parameters", 4*p.cfg.maxValues)}
	}
	index := map[string]int{}
	for _, rp := range params {
		if err := checkBytes(rp.name, rp.value); err != nil {
			return nil, err
		}
		if len(rp.value) > p.cfg.maxLength || len(rp.name) > 64 {
			name := rp.name
			if len(name) > 64 {
				name = name[:64] + "…"
			}
			return nil, paramError(name, fhirbulk.IssueTooCostly, "value longer than %d bytes", p.cfg.maxLength)
		}
		i, seen := index[rp.name]
		if !seen {
			i = len(out)
			index[rp.name] = i
			out = append(out, kickoffParam{name: rp.name})
		}
		out[i].values = append(out[i].values, rp.value)
	}
	return out, nil
}

// shape is pass 1 for one parameter: it checks the parameter's use and
// splits its comma lists. A misused parameter is dropped under lenient
// handling, unless its spec is strict.
func (p *kickoffParser) shape(kp *kickoffParam) error {
	perr := p.checkUse(kp)
	switch {
	case perr == nil:
		kp.ok = true
		return nil
	case kp.spec.strict:
		return perr
	}
	return p.reject(perr)
}

// checkUse checks that a parameter is known, allowed at the level and with
// the method, and not repeated unless it may be; it splits comma lists and
// caps the number of values.
func (p *kickoffParser) checkUse(kp *kickoffParam) *Error {
	spec, known := paramSpecs[kp.name]
	kp.spec = spec
	switch {
	case !known:
		return paramError(kp.name, fhirbulk.IssueNotSupported, "unknown or unsupported parameter")
	case spec.noSystem && p.level == fhirbulk.LevelSystem:
		return paramError(kp.name, fhirbulk.IssueNotSupported, "not allowed at system level")
	case spec.postOnly && p.method != http.MethodPost:
		return paramError(kp.name, fhirbulk.IssueNotSupported, "allowed only in a POST kick-off")
	case !spec.repeat && len(kp.values) > 1:
		return paramError(kp.name, fhirbulk.IssueInvalid, "may appear only once")
	}
	if spec.comma {
		split, perr := splitLists(kp.name, kp.values)
		if perr != nil {
			return perr
		}
		kp.values = split
	}
	if len(kp.values) > p.cfg.maxValues {
		return paramError(kp.name, fhirbulk.IssueTooCostly, "more than %d values", p.cfg.maxValues)
	}
	return nil
}

// splitLists splits comma-list values into their trimmed entries. A list
// with an empty entry is an error; when several have one, the last is
// named.
func splitLists(name string, vs []string) ([]string, *Error) {
	var split []string
	var perr *Error
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
	return split, perr
}

// parseValues is pass 2 for the parameters that passed pass 1 and whose
// spec's first is first.
func (p *kickoffParser) parseValues(params []kickoffParam, first bool) error {
	for _, kp := range params {
		if !kp.ok || kp.spec.first != first {
			continue
		}
		if err := kp.spec.parse(p, kp.name, kp.values); err != nil {
			return err
		}
	}
	return nil
}

// checkPeriod checks _since against _until; under lenient handling a bad
// _until is dropped.
func (p *kickoffParser) checkPeriod() error {
	if p.req.Since.IsZero() || p.req.Until.IsZero() || p.req.Since.Before(p.req.Until) {
		return nil
	}
	if err := p.reject(paramError("_until", fhirbulk.IssueInvalid, "_until must be later than _since")); err != nil {
		return err
	}
	p.req.Until = time.Time{}
	return nil
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
