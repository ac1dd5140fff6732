package sourcetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"unicode"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// unsupportedSearch is a search no Source can run: a made-up parameter in
// the namespace FHIR reserves for its common ones.
const unsupportedSearch = "_sourcetest-unsupported"

// tokenSearch is a _typeFilter search the checks try: name=value on one
// element of a type, matched as a FHIR token search.
type tokenSearch struct {
	typ, name, value string
	element          string // the element it reads
}

func (s tokenSearch) query() string { return url.Values{s.name: {s.value}}.Encode() }

func (s tokenSearch) String() string { return s.name + "=" + s.value }

// matches reports whether a resource's element matches the search: a code
// equal to the value, or a CodeableConcept with a coding of that
// system|code.
func (s tokenSearch) matches(raw json.RawMessage) bool {
	var fields map[string]json.RawMessage
	if json.Unmarshal(raw, &fields) != nil {
		return false
	}
	v, ok := fields[s.element]
	if !ok {
		return false
	}
	var code string
	if json.Unmarshal(v, &code) == nil {
		return code == s.value
	}
	system, c, _ := strings.Cut(s.value, "|")
	for _, cd := range codings(v) {
		if cd.System == system && cd.Code == c {
			return true
		}
	}
	return false
}

type coding struct{ System, Code string }

// codings returns the codings of a CodeableConcept.
func codings(v json.RawMessage) []coding {
	var cc struct {
		Coding []coding `json:"coding"`
	}
	_ = json.Unmarshal(v, &cc)
	return cc.Coding
}

// kebab turns an element name into the search parameter FHIR names after
// it (clinicalStatus: clinical-status).
func kebab(s string) string {
	var b strings.Builder
	for _, r := range s {
		if unicode.IsUpper(r) {
			b.WriteByte('-')
			r = unicode.ToLower(r)
		}
		b.WriteRune(r)
	}
	return b.String()
}

// codeLike reports whether a string element looks like a code (final,
// female, in-progress) rather than a date or a name.
func codeLike(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if (r < 'a' || r > 'z') && r != '-' {
			return false
		}
	}
	return true
}

// tokenSearches returns up to two searches on typ built from the
// Dataset's resources: one per code or CodeableConcept element, with the
// value of the first resource that has it.
func (e *sourceEnv) tokenSearches(typ string) []tokenSearch {
	var out []tokenSearch
	seen := map[string]bool{}
	for _, raw := range e.data.OfType(typ) {
		var fields map[string]json.RawMessage
		if json.Unmarshal(raw, &fields) != nil {
			continue
		}
		names := make([]string, 0, len(fields))
		for name := range fields {
			names = append(names, name)
		}
		slices.Sort(names)
		for _, name := range names {
			if seen[name] || name == "resourceType" || name == "id" || len(out) == 2 {
				continue
			}
			var code string
			if json.Unmarshal(fields[name], &code) == nil {
				if codeLike(code) {
					seen[name] = true
					out = append(out, tokenSearch{typ: typ, name: kebab(name), value: code, element: name})
				}
				continue
			}
			if cs := codings(fields[name]); len(cs) > 0 && cs[0].System != "" && cs[0].Code != "" {
				seen[name] = true
				out = append(out, tokenSearch{typ: typ, name: kebab(name), value: cs[0].System + "|" + cs[0].Code, element: name})
			}
		}
	}
	return out
}

// checkTypeFilterChecker checks that CheckTypeFilter rejects a search no
// Source can run, and that the token searches it accepts (built from the
// Dataset's codes) are applied by Export: alone, and two of them OR'd.
func checkTypeFilterChecker(ctx context.Context, e *sourceEnv) error {
	tf, ok := e.src.(bulkexport.TypeFilterChecker)
	if !ok {
		return skip("the Source is no bulkexport.TypeFilterChecker: every _typeFilter is accepted at kick-off and reaches Export in Query.TypeFilters, which must then apply or reject it itself (a filter it ignores silently exports too much)")
	}
	q := e.sys()
	types, err := e.types(ctx, q.Level)
	if err != nil {
		return err
	}
	var errs []error
	var accepted []string
	for _, typ := range types {
		bad := url.Values{unsupportedSearch: {"1"}}
		if err := tf.CheckTypeFilter(typ, bad); err == nil {
			errs = append(errs, fmt.Errorf("CheckTypeFilter(%s, %q) = nil: it accepts a search no Source can run, which the Worker would then ignore", typ, bad.Encode()))
		}
		var ok []tokenSearch
		for _, s := range e.tokenSearches(typ) {
			vals, _ := url.ParseQuery(s.query())
			if err := tf.CheckTypeFilter(typ, vals); err != nil {
				e.note("CheckTypeFilter(%s, %s) rejects it: %v", typ, s, err)
				continue
			}
			ok = append(ok, s)
		}
		for _, s := range ok {
			accepted = append(accepted, typ+"?"+s.String())
			errs = append(errs, e.expectFiltered(ctx, q, typ, s))
		}
		if len(ok) == 2 {
			errs = append(errs, e.expectFiltered(ctx, q, typ, ok...))
		}
	}
	if accepted == nil {
		e.note("CheckTypeFilter accepts none of the token searches tried: only the rejection of an unsupported search is checked")
	} else {
		e.note("searches accepted by CheckTypeFilter and checked through Export: %s", strings.Join(accepted, " "))
	}
	return errors.Join(errs...)
}

// expectFiltered exports typ with the searches as _typeFilter (OR'd) and
// compares with the resources that match one of them.
func (e *sourceEnv) expectFiltered(ctx context.Context, q *bulkexport.Query, typ string, searches ...tokenSearch) error {
	fq := *q
	var names []string
	for _, s := range searches {
		fq.TypeFilters = append(fq.TypeFilters, bulkexport.TypeFilter{Type: typ, Query: s.query()})
		names = append(names, s.String())
	}
	what := fmt.Sprintf("%s, _typeFilter %s (accepted by CheckTypeFilter)", e.describe(&fq, typ), strings.Join(names, " or "))
	selected := map[string]bool{}
	for _, id := range e.m.want(q, typ) {
		selected[id] = true
	}
	want := []string{}
	for _, raw := range e.data.OfType(typ) {
		var v struct {
			ID string `json:"id"`
		}
		_ = json.Unmarshal(raw, &v)
		if !selected[v.ID] {
			continue
		}
		for _, s := range searches {
			if s.matches(raw) {
				want = append(want, v.ID)
				break
			}
		}
	}
	slices.Sort(want)
	var rec bulkexporttest.Recorder
	if err := e.export(ctx, &fq, typ, &rec); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	got, err := lineIDs(typ, rec.Resources)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return compareIDsAs(what, want, got, "not matching the filter")
}
