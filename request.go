package bulkexport

import (
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"net/url"
	"slices"
	"time"
)

// Request is a parsed and validated kick-off request. The engine hands the
// parts a Source needs to it as a Query.
type Request struct {
	// URL is the full kick-off URL, absolute, as the manifest's "request"
	// echoes it: with the query string for GET, without parameters for POST.
	URL    string `json:"url"`
	Method string `json:"method"`
	// OutputFormat is always application/fhir+ndjson (the aliases are
	// normalised).
	OutputFormat string `json:"outputFormat"`
	// Since and Until bound meta.lastUpdated; zero when not given.
	Since time.Time `json:"since,omitzero"`
	Until time.Time `json:"until,omitzero"`
	// Types is _type, merged and deduplicated; empty means every type the
	// level exports.
	Types []string `json:"types,omitempty"`
	// TypeFilters is _typeFilter, one entry per query.
	TypeFilters []TypeFilter `json:"typeFilters,omitempty"`
	// Elements is _elements: "Type.element" or "element" entries.
	Elements []string `json:"elements,omitempty"`
	// IncludeAssociatedData holds the requested codes.
	IncludeAssociatedData []string `json:"includeAssociatedData,omitempty"`
	// OrganizeOutputBy is a resource type, or empty.
	OrganizeOutputBy string `json:"organizeOutputBy,omitempty"`
	// AllowPartialManifests is the client's permission to page manifests
	// and to see partial manifests before the job ends.
	AllowPartialManifests bool `json:"allowPartialManifests,omitempty"`
	// Patients holds the ids of the patient parameter ("Patient/123" →
	// "123"). Patient and Group levels, POST only.
	Patients []string `json:"patients,omitempty"`
	// Lenient is Prefer: handling=lenient.
	Lenient bool `json:"lenient,omitempty"`
	// SeparateExportStatus is Prefer: separate-export-status.
	SeparateExportStatus bool `json:"separateExportStatus,omitempty"`
	// Ignored holds one issue per parameter dropped under lenient
	// handling; the engine writes them to the manifest's error[].
	Ignored []fhirbulk.Issue `json:"ignored,omitempty"`
}

// TypeFilter is one _typeFilter value: a search on one resource type.
// Several filters on the same type are OR'd.
type TypeFilter struct {
	Type string `json:"type"`
	// Query is the search query after "?", URL-encoded.
	Query string `json:"query"`
}

// Values parses Query. It was validated at kick-off, so errors cannot occur
// for stored requests.
func (f TypeFilter) Values() url.Values {
	v, _ := url.ParseQuery(f.Query)
	return v
}

// String is the filter as the client wrote it: "Type?query".
func (f TypeFilter) String() string { return f.Type + "?" + f.Query }

// WantsType reports whether resources of type typ are part of the export,
// given the request's _type (an empty list takes every type).
func (r *Request) WantsType(typ string) bool {
	return len(r.Types) == 0 || slices.Contains(r.Types, typ)
}

// FiltersFor returns the _typeFilter entries for typ.
func (r *Request) FiltersFor(typ string) []TypeFilter {
	var out []TypeFilter
	for _, f := range r.TypeFilters {
		if f.Type == typ {
			out = append(out, f)
		}
	}
	return out
}

// ElementsFor returns the element names _elements keeps for typ: entries
// "typ.x" and untyped entries "x". Nil means keep everything: entries that
// name other types do not subset typ.
func (r *Request) ElementsFor(typ string) []string {
	var out []string
	for _, e := range r.Elements {
		t, el, typed := cutDot(e)
		switch {
		case !typed:
			out = append(out, e)
		case t == typ:
			out = append(out, el)
		}
	}
	return out
}

func cutDot(s string) (before, after string, found bool) {
	for i := 0; i < len(s); i++ {
		if s[i] == '.' {
			return s[:i], s[i+1:], true
		}
	}
	return "", s, false
}

func (r Request) clone() Request {
	c := r
	c.Types = slices.Clone(r.Types)
	c.TypeFilters = slices.Clone(r.TypeFilters)
	c.Elements = slices.Clone(r.Elements)
	c.IncludeAssociatedData = slices.Clone(r.IncludeAssociatedData)
	c.Patients = slices.Clone(r.Patients)
	if r.Ignored != nil {
		c.Ignored = make([]fhirbulk.Issue, len(r.Ignored))
		for i, is := range r.Ignored {
			is.Expression = slices.Clone(is.Expression)
			if is.Details != nil {
				d := *is.Details
				is.Details = &d
			}
			c.Ignored[i] = is
		}
	}
	return c
}
