package dataset

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// tokenFn returns the (system, code) a token search parameter sees on a
// resource.
type tokenFn func(r *rec) (system, code string)

// searchParams are the _typeFilter search parameters each type supports.
// All are token parameters: code, system|code, system| and |code forms,
// with comma-separated values OR'd.
var searchParams = map[kind]map[string]tokenFn{
	kindPatient: {
		"gender": func(r *rec) (string, string) { return sysGender, genders[r.gender] },
	},
	kindEncounter: {
		"status": func(r *rec) (string, string) { return sysEncStatus, r.status },
		"class": func(r *rec) (string, string) {
			c := &encounterClasses[r.class]
			return c.system, c.code
		},
	},
	kindCondition: {
		"clinical-status": func(r *rec) (string, string) { return sysClinical, r.clinical },
		"code":            func(r *rec) (string, string) { return r.code.system, r.code.code },
	},
	kindObservation: {
		"code":     func(r *rec) (string, string) { return r.code.system, r.code.code },
		"status":   func(r *rec) (string, string) { return sysObsStatus, r.status },
		"category": func(r *rec) (string, string) { return r.obs.category.system, r.obs.category.code },
	},
	kindMedicationRequest: {
		"status": func(r *rec) (string, string) { return sysMedStatus, r.status },
		"intent": func(r *rec) (string, string) { return sysMedIntent, "order" },
		"code":   func(r *rec) (string, string) { return r.code.system, r.code.code },
	},
}

// SearchParams returns the _typeFilter search parameters supported on typ,
// sorted. All are of type token.
func SearchParams(typ string) []string {
	var out []string
	for name := range searchParams[kindOf(typ)] {
		out = append(out, name)
	}
	sort.Strings(out)
	return out
}

// token is one value of a token search: [system|]code.
type token struct {
	system    string
	hasSystem bool
	code      string
}

// condition is one search parameter of a filter: any of its values
// matches.
type condition struct {
	get    tokenFn
	values []token
}

// filter is one _typeFilter query: every condition must match.
type filter []condition

// parseFilter turns a _typeFilter query on type k into a filter, or says
// why the dataset cannot run it.
func parseFilter(k kind, q url.Values) (filter, error) {
	params := searchParams[k]
	if len(q) == 0 {
		return nil, errors.New("empty search")
	}
	names := make([]string, 0, len(q))
	for name := range q {
		names = append(names, name)
	}
	sort.Strings(names) // deterministic errors
	var f filter
	for _, name := range names {
		base, modifier, hasModifier := strings.Cut(name, ":")
		get, ok := params[base]
		switch {
		case !ok && len(params) == 0:
			return nil, fmt.Errorf("no search parameters are supported on %s", k)
		case !ok:
			return nil, fmt.Errorf("search parameter %q is not supported on %s (supported: %s)", base, k, strings.Join(SearchParams(k.String()), ", "))
		case hasModifier:
			return nil, fmt.Errorf("modifier :%s of search parameter %s is not supported", modifier, base)
		}
		for _, v := range q[name] {
			c := condition{get: get}
			for _, item := range strings.Split(v, ",") {
				if item == "" {
					return nil, fmt.Errorf("search parameter %s has an empty value", base)
				}
				var t token
				if sys, code, ok := strings.Cut(item, "|"); ok {
					t = token{system: sys, hasSystem: true, code: code}
				} else {
					t = token{code: item}
				}
				c.values = append(c.values, t)
			}
			f = append(f, c)
		}
	}
	return f, nil
}

func (f filter) match(r *rec) bool {
	for _, c := range f {
		sys, code := c.get(r)
		ok := false
		for _, t := range c.values {
			if (!t.hasSystem || t.system == sys) && (t.code == "" || t.code == code) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

// plan is a Query resolved against the dataset for one type: which owners
// (patients, or practitioners and organizations) to visit and which of
// their resources to keep.
type plan struct {
	d       *Dataset
	kind    kind
	filters []filter // OR'd; none keeps everything
	since   time.Time
	until   time.Time
	tx      time.Time
	keep    *elementSet

	// Owners: patients 1..n (or the listed ones) that member accepts, or
	// practitioners/organizations 1..n.
	n       int
	list    []int // the patient parameter's indices, sorted; nil without it
	member  func(idx int) bool
	after   int      // the cursor: owners up to it are done
	missing []string // patient ids the patient parameter named in vain
	// lo and hi bound the owners of a partition (Query.Partition): those
	// in (lo, hi]. Without one, lo is 0 and hi the largest int.
	lo, hi int
}

// newPlan resolves q for typ. With resume, q.Cursor is honoured.
func (d *Dataset) newPlan(q *bulkexport.Query, typ string, resume bool) (*plan, error) {
	k := kindOf(typ)
	if k == 0 {
		return nil, fmt.Errorf("dataset: resource type %q is not in the dataset", typ)
	}
	p := &plan{d: d, kind: k, since: q.Since, until: q.Until, tx: q.TransactionTime, hi: math.MaxInt}
	if q.Partition != "" {
		lo, hi, err := parsePartition(q.Partition)
		if err != nil {
			return nil, err
		}
		p.lo, p.hi = lo, hi
	}
	compartment := k != kindPractitioner && k != kindOrganization
	switch q.Level {
	case fhirbulk.LevelSystem, fhirbulk.LevelPatient:
	case fhirbulk.LevelGroup:
		m, err := membership(q.GroupID)
		if err != nil {
			return nil, err
		}
		p.member = m
	default:
		return nil, fmt.Errorf("dataset: unknown export level %q", q.Level)
	}
	if !compartment && q.Level != fhirbulk.LevelSystem {
		return nil, fmt.Errorf("dataset: %s is exported at system level only", typ)
	}
	for _, tf := range q.TypeFilters {
		if tf.Type != typ {
			continue
		}
		f, err := parseFilter(k, tf.Values())
		if err != nil {
			return nil, &bulkexport.Error{Status: http.StatusBadRequest, Code: fhirbulk.IssueNotSupported, Param: "_typeFilter",
				Message: fmt.Sprintf("%s: %v", tf, err)}
		}
		p.filters = append(p.filters, f)
	}
	p.keep = newElementSet(k, q.Elements)

	switch k {
	case kindPractitioner:
		p.n = d.practitioners
	case kindOrganization:
		p.n = d.organizations
	default:
		p.n = d.patients
		if len(q.Patients) > 0 {
			p.list = []int{}
			for _, id := range q.Patients {
				idx, ok := d.patientIndex(id)
				if !ok || (p.member != nil && !p.member(idx)) {
					p.missing = append(p.missing, id)
					continue
				}
				p.list = append(p.list, idx)
			}
			slices.Sort(p.list)
			p.list = slices.Compact(p.list)
		}
	}
	if resume && q.Cursor != "" {
		n, err := strconv.Atoi(q.Cursor)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("dataset: invalid cursor %q", q.Cursor)
		}
		p.after = n
	}
	return p, nil
}

// parsePartition reads a partition token of Partitions: "lo-hi", owners
// in (lo, hi].
func parsePartition(tok string) (lo, hi int, err error) {
	a, b, ok := strings.Cut(tok, "-")
	lo, err1 := strconv.Atoi(a)
	hi, err2 := strconv.Atoi(b)
	if !ok || err1 != nil || err2 != nil || lo < 0 || hi < lo {
		return 0, 0, fmt.Errorf("dataset: invalid partition %q", tok)
	}
	return lo, hi, nil
}

// Partitions implements bulkexport.Partitioner: it splits the owners of a
// type (patients 1..n, or practitioners, organizations) into up to max
// ranges of equal size, "lo-hi" for the owners in (lo, hi]. Each range
// gets at least DefaultPartitionOwners owners (see WithPartitionOwners),
// so a type is split less, or not at all, when it has fewer: the
// default dataset of 100 patients exports whole.
func (d *Dataset) Partitions(ctx context.Context, q *bulkexport.Query, typ string, limit int) ([]string, error) {
	p, err := d.newPlan(q, typ, false)
	if err != nil {
		return nil, err
	}
	parts := min(limit, p.n/d.partOwners)
	if parts <= 1 {
		return nil, nil
	}
	out := make([]string, parts)
	for i := range parts {
		lo, hi := p.n*i/parts, p.n*(i+1)/parts
		out[i] = strconv.Itoa(lo) + "-" + strconv.Itoa(hi)
	}
	return out, nil
}

// DefaultPartitionOwners is the fewest owners a part of a type gets.
const DefaultPartitionOwners = 250

// each calls fn for every owner after the cursor, in increasing order, and
// stops at the first error or when ctx is done.
func (p *plan) each(ctx context.Context, fn func(idx int) error) error {
	visit := func(idx int) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		return fn(idx)
	}
	if p.list != nil {
		for _, idx := range p.list {
			if idx <= p.after || idx <= p.lo || idx > p.hi {
				continue
			}
			if err := visit(idx); err != nil {
				return err
			}
		}
		return nil
	}
	for idx := max(p.after, p.lo) + 1; idx <= min(p.n, p.hi); idx++ {
		if p.member != nil && !p.member(idx) {
			continue
		}
		if err := visit(idx); err != nil {
			return err
		}
	}
	return nil
}

// resources calls fn for every resource of owner idx that the plan keeps.
// r is reused between calls.
func (p *plan) resources(idx int, r *rec, fn func(r *rec) error) error {
	// Patients, practitioners and organizations are one resource (seq 0);
	// a patient's other resources are numbered from 1.
	first, last := 0, 0
	switch p.kind {
	case kindEncounter, kindCondition, kindObservation, kindMedicationRequest:
		first, last = 1, p.d.perPatient(p.kind, idx)
	}
	for seq := first; seq <= last; seq++ {
		p.d.gen(p.kind, idx, seq, r)
		if !p.match(r) {
			continue
		}
		if err := fn(r); err != nil {
			return err
		}
	}
	return nil
}

func (p *plan) match(r *rec) bool {
	if !p.since.IsZero() && !r.lastUpdated.After(p.since) {
		return false
	}
	if !p.until.IsZero() && !r.lastUpdated.Before(p.until) {
		return false
	}
	if !p.tx.IsZero() && r.lastUpdated.After(p.tx) {
		return false
	}
	if len(p.filters) == 0 {
		return true
	}
	for _, f := range p.filters {
		if f.match(r) {
			return true
		}
	}
	return false
}
