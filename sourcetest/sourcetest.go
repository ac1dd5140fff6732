// Package sourcetest is a conformance suite for bulkexport.Source
// implementations: it checks a host's Source against the contract the
// Worker and the handler rely on, over a known Dataset.
//
// A host whose store can be loaded with the suite's own data runs Run from
// an ordinary test, loading the Dataset into a fresh instance:
//
//	func TestMySource(t *testing.T) {
//		sourcetest.Run(t, func(t *testing.T, data sourcetest.Dataset) bulkexport.Source {
//			db := openEmptyTestDB(t) // release it with t.Cleanup
//			for _, r := range data.Resources {
//				insertResource(t, db, r) // as given: id and meta.lastUpdated kept
//			}
//			return mysource.New(db)
//		})
//	}
//
// A Source whose data is fixed (generated, or a read-only copy) runs
// RunFixed instead, with a Dataset that describes what it serves.
//
// The named subtests:
//
//   - ResourceTypes: every level answers, without duplicates, with Patient.
//   - Level: system, Patient and Group level export exactly the resources
//     they select (Group membership; the Patient compartment at Patient and
//     Group level), each of the type asked for, each once.
//   - Patients: the patient parameter, at Patient level and intersected
//     with a Group's members.
//   - Time: _since and _until (exclusive bounds on meta.lastUpdated, alone
//     and together) and the transaction time.
//   - Resume: an export resumed from any cursor it passed to Checkpoint
//     writes exactly the resources after it.
//   - Errors: when Write fails, Export stops writing and returns an error.
//   - Cancel: Export returns promptly when its context is cancelled in the
//     middle of an export, or is done before it starts.
//   - Optional: GroupChecker, Counter and TypeFilterChecker.
//   - Organizer: OrganizeTypes and ExportBlocks (organizeOutputBy=Patient):
//     every selected resource of the Patient compartment in exactly one
//     block, the block of its patient; blocks well formed; checkpoints
//     between blocks and resuming from them; write failures and
//     cancellation.
//   - Partitioner: Partitions returns at most max tokens for every type
//     at every level (with _since, _until and patient too), and the parts
//     exported with Query.Partition write together exactly what the query
//     selects, each resource once; a part resumed from any of its
//     checkpoints writes the rest of that part only.
//   - Worker: exports through the real handler and Worker (several types
//     at once, every line validated) produce the expected files. The
//     test server's MemoryStore keeps units, so a Partitioner is exported
//     there in parts.
//
// The optional interfaces (listed under "Optional Source interfaces" in
// package bulkexport's documentation) are checked when the Source
// implements them; otherwise their subtests are skipped with a note saying
// what the host loses. AssociatedDataLister is not checked: what the codes
// mean is the host's.
//
// The Source must serve the resources with the ids and meta.lastUpdated
// they have in the Dataset, and resolve Group membership (from the Group
// resources or from Dataset.Groups). A Source that does not export some
// type of the Dataset simply leaves it out of ResourceTypes: only the
// types it lists are checked (the subtests log which). Patient and Group
// level checks cover the types in the Patient compartment; a Source may
// also list others there, such as Practitioner, which are then not
// checked. _elements and deletions are the host's own choices and are not
// checked; _typeFilter only through TypeFilterChecker (see
// Optional/TypeFilterChecker).
//
// Run it with -race: the Worker subtests export several types at once.
package sourcetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Run checks the Source that newSource returns. It calls newSource once,
// with the Dataset to serve (NewDataset's), and then runs the named
// subtests against the Source. The subtests run one after another.
func Run(t *testing.T, newSource func(t *testing.T, data Dataset) bulkexport.Source) {
	t.Helper()
	data := NewDataset()
	src := newSource(t, data)
	if src == nil {
		t.Fatal("sourcetest: newSource returned nil")
	}
	RunFixed(t, src, data)
}

// RunFixed checks a Source that serves data of its own, which data
// describes: every resource the Source exports for the types its
// ResourceTypes lists, as JSON with its id and meta.lastUpdated (the
// Patient compartment is read from a subject or patient reference
// "Patient/<id>"), and the members of the Groups to export (Groups).
//
// The checks choose what to query from data: the first two Group ids in
// sorted order, patients in the order of data.Resources, and _since and
// _until between the lastUpdated values. So data needs at least three
// Patients, a Group with a member and a patient who is not one, and six
// distinct lastUpdated values. Keep it small (a few hundred resources at
// most): every check reads it whole.
func RunFixed(t *testing.T, src bulkexport.Source, data Dataset) {
	t.Helper()
	if src == nil {
		t.Fatal("sourcetest: nil Source")
	}
	env, err := newSourceEnv(src, data)
	if err != nil {
		t.Fatalf("sourcetest: %v", err)
	}
	for _, g := range sourceChecks() {
		t.Run(g.name, func(t *testing.T) {
			for _, c := range g.cases {
				t.Run(c.name, func(t *testing.T) {
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
					defer cancel()
					ce := *env
					ce.note = t.Logf
					err := c.run(ctx, &ce)
					var skip skipError
					if errors.As(err, &skip) {
						t.Skip(skip.why)
					}
					if err != nil {
						t.Error(err)
					}
				})
			}
		})
	}
}

// skipError is what a check returns when it does not apply to the Source:
// the subtest is skipped, saying why.
type skipError struct{ why string }

func (e skipError) Error() string { return "skipped: " + e.why }

func skip(format string, args ...any) error {
	return skipError{fmt.Sprintf(format, args...)}
}

// exportTimeout bounds one Export call: a Source that takes longer on the
// small Dataset is taken to hang.
const exportTimeout = 20 * time.Second

// errHung is what export returns for an Export that did not return.
var errHung = fmt.Errorf("Export did not return within %v", exportTimeout)

type checkGroup struct {
	name  string
	cases []sourceCheck
}

type sourceCheck struct {
	name string
	run  func(ctx context.Context, e *sourceEnv) error
}

// sourceEnv is what every check works with.
type sourceEnv struct {
	src  bulkexport.Source
	data Dataset
	m    *model
	p    *params
	note func(format string, args ...any)
}

func newSourceEnv(src bulkexport.Source, data Dataset) (*sourceEnv, error) {
	m, err := newModel(data)
	if err != nil {
		return nil, err
	}
	p, err := newParams(m)
	if err != nil {
		return nil, err
	}
	return &sourceEnv{src: src, data: data, m: m, p: p, note: func(string, ...any) {}}, nil
}

// params are what the checks query with, chosen from the Dataset.
type params struct {
	group, group2 string   // Groups to export; group2 may be ""
	patients      []string // the patient parameter at Patient level
	mixed         []string // a member of group and a patient who is not
	// Times between the Dataset's lastUpdated values.
	since, until, from, to, tx time.Time
	// afterAll is a transaction time after every resource, as the
	// Worker's (the kick-off time) is.
	afterAll time.Time
	// low and high bound the lastUpdated values that checkBounds puts a
	// bound on.
	low, high time.Time
}

func newParams(m *model) (*params, error) {
	var p params
	var patients []string
	var times []time.Time
	for _, r := range m.res {
		if r.typ == "Patient" {
			patients = append(patients, r.id)
		}
		times = append(times, r.updated)
	}
	slices.SortFunc(times, func(a, b time.Time) int { return a.Compare(b) })
	times = slices.CompactFunc(times, time.Time.Equal)
	if len(patients) < 3 {
		return nil, fmt.Errorf("the Dataset has %d Patients, the checks need 3", len(patients))
	}
	if n := len(times); n < 6 {
		return nil, fmt.Errorf("the Dataset has %d distinct meta.lastUpdated values, the checks need 6", n)
	}
	ids := make([]string, 0, len(m.groups))
	for id := range m.groups {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	if len(ids) == 0 {
		return nil, errors.New("the Dataset has no Groups")
	}
	p.group = ids[0]
	if len(ids) > 1 {
		p.group2 = ids[1]
	}
	var member, other string
	for _, id := range patients {
		switch in := slices.Contains(m.groups[p.group], id); {
		case in && member == "":
			member = id
		case !in && other == "":
			other = id
		}
	}
	if member == "" || other == "" {
		return nil, fmt.Errorf("Group %s needs a member and a patient who is not one", p.group)
	}
	p.patients = []string{patients[1], patients[len(patients)-2]}
	p.mixed = []string{member, other}

	n := len(times)
	between := func(k int) time.Time {
		lo, hi := times[k], times[k+1]
		mid := lo.Add(hi.Sub(lo) / 2)
		for _, d := range []time.Duration{time.Second, time.Millisecond} {
			if t := mid.Truncate(d); t.After(lo) {
				return t
			}
		}
		return mid
	}
	p.since, p.until = between(n/3), between(2*n/3)
	p.from, p.to = between(n/6), between(n/2)
	p.tx = between(4 * n / 5)
	p.low, p.high = times[n/6], times[4*n/5]
	p.afterAll = times[n-1].Add(1000 * time.Hour)
	return &p, nil
}

// Queries at each level, selecting everything there is.
func (e *sourceEnv) sys() *bulkexport.Query {
	return &bulkexport.Query{Level: fhirbulk.LevelSystem, TransactionTime: e.p.afterAll}
}

func (e *sourceEnv) pat() *bulkexport.Query {
	return &bulkexport.Query{Level: fhirbulk.LevelPatient, TransactionTime: e.p.afterAll}
}

func (e *sourceEnv) grp(id string) *bulkexport.Query {
	return &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: id, TransactionTime: e.p.afterAll}
}

// groups returns the queries of the Groups to export.
func (e *sourceEnv) groups() []*bulkexport.Query {
	qs := []*bulkexport.Query{e.grp(e.p.group)}
	if e.p.group2 != "" {
		qs = append(qs, e.grp(e.p.group2))
	}
	return qs
}

func with(q *bulkexport.Query, f func(q *bulkexport.Query)) *bulkexport.Query { f(q); return q }

// expectAll checks the queries that qs returns.
func expectAll(qs func(e *sourceEnv) []*bulkexport.Query) func(ctx context.Context, e *sourceEnv) error {
	return func(ctx context.Context, e *sourceEnv) error {
		var errs []error
		for _, q := range qs(e) {
			errs = append(errs, e.expectTypes(ctx, q))
		}
		return errors.Join(errs...)
	}
}

func sourceChecks() []checkGroup {
	type qs = []*bulkexport.Query
	return []checkGroup{
		{"ResourceTypes", []sourceCheck{
			{"Levels", checkResourceTypes},
		}},
		{"Level", []sourceCheck{
			{"System", expectAll(func(e *sourceEnv) qs { return qs{e.sys()} })},
			{"Patient", expectAll(func(e *sourceEnv) qs { return qs{e.pat()} })},
			{"Group", expectAll(func(e *sourceEnv) qs { return e.groups() })},
		}},
		{"Patients", []sourceCheck{
			{"PatientLevel", expectAll(func(e *sourceEnv) qs {
				return qs{with(e.pat(), func(q *bulkexport.Query) { q.Patients = e.p.patients })}
			})},
			{"GroupMembersOnly", expectAll(func(e *sourceEnv) qs {
				return qs{with(e.grp(e.p.group), func(q *bulkexport.Query) { q.Patients = e.p.mixed })}
			})},
		}},
		{"Time", []sourceCheck{
			{"Since", expectAll(func(e *sourceEnv) qs {
				return qs{
					with(e.sys(), func(q *bulkexport.Query) { q.Since = e.p.since }),
					with(e.grp(e.p.group), func(q *bulkexport.Query) { q.Since = e.p.since }),
				}
			})},
			{"Until", expectAll(func(e *sourceEnv) qs {
				return qs{
					with(e.sys(), func(q *bulkexport.Query) { q.Until = e.p.until }),
					with(e.pat(), func(q *bulkexport.Query) { q.Until = e.p.until }),
				}
			})},
			{"SinceAndUntil", expectAll(func(e *sourceEnv) qs {
				return qs{with(e.pat(), func(q *bulkexport.Query) { q.Since, q.Until = e.p.from, e.p.to })}
			})},
			{"ExclusiveBounds", checkBounds},
			{"TransactionTime", expectAll(func(e *sourceEnv) qs {
				return qs{
					with(e.sys(), func(q *bulkexport.Query) { q.TransactionTime = e.p.tx }),
					with(e.sys(), func(q *bulkexport.Query) { q.Since, q.TransactionTime = e.p.since, e.p.tx }),
				}
			})},
		}},
		{"Resume", []sourceCheck{
			{"FromCheckpoints", checkResume},
		}},
		{"Errors", []sourceCheck{
			{"WriteFails", checkWriteFails},
		}},
		{"Cancel", []sourceCheck{
			{"MidExport", checkCancelMidExport},
			{"BeforeStart", checkCancelBefore},
		}},
		{"Optional", []sourceCheck{
			{"GroupChecker", checkGroupChecker},
			{"Counter", checkCounter},
			{"TypeFilterChecker", checkTypeFilterChecker},
		}},
		{"Organizer", []sourceCheck{
			{"OrganizeTypes", checkOrganizeTypes},
			{"Blocks", checkBlocks},
			{"Resume", checkBlocksResume},
			{"WriteFails", checkBlocksWriteFails},
			{"Cancel", checkBlocksCancel},
			{"Worker", checkBlocksWorker},
		}},
		{"Partitioner", []sourceCheck{
			{"Parts", checkPartitions},
			{"Resume", checkPartitionResume},
		}},
		{"Worker", []sourceCheck{
			{"Exports", checkWorker},
		}},
	}
}

// ---------------------------------------------------------------------------
// The expected results

// res is what the checks know of a Dataset resource.
type res struct {
	typ, id, patient string // patient: the compartment's patient id, or ""
	updated          time.Time
}

type model struct {
	res    []res
	groups map[string][]string
	byRef  map[string]res // by "Type/id"
}

func newModel(d Dataset) (*model, error) {
	m := &model{groups: d.Groups, byRef: map[string]res{}}
	for _, raw := range d.Resources {
		var v struct {
			ResourceType string `json:"resourceType"`
			ID           string `json:"id"`
			Meta         struct {
				LastUpdated string `json:"lastUpdated"`
			} `json:"meta"`
			Subject *struct{ Reference string } `json:"subject"`
			Patient *struct{ Reference string } `json:"patient"`
		}
		if err := json.Unmarshal(raw, &v); err != nil {
			return nil, err
		}
		at, err := fhirbulk.ParseInstant(v.Meta.LastUpdated)
		if err != nil {
			return nil, err
		}
		r := res{typ: v.ResourceType, id: v.ID, updated: at}
		switch {
		case v.ResourceType == "Patient":
			r.patient = v.ID
		case v.Subject != nil:
			r.patient = patientID(v.Subject.Reference)
		case v.Patient != nil:
			r.patient = patientID(v.Patient.Reference)
		}
		m.res = append(m.res, r)
		m.byRef[r.typ+"/"+r.id] = r
	}
	return m, nil
}

// patientID returns the id of a Patient reference, or "".
func patientID(ref string) string {
	if id, ok := strings.CutPrefix(ref, "Patient/"); ok {
		return id
	}
	return ""
}

// checkable returns the Dataset's types that are checked at a level: all
// of them at system level, those of the Patient compartment otherwise.
func (m *model) checkable(level fhirbulk.Level) []string {
	var types []string
	for _, r := range m.res {
		if (level == fhirbulk.LevelSystem || r.patient != "") && !slices.Contains(types, r.typ) {
			types = append(types, r.typ)
		}
	}
	slices.Sort(types)
	return types
}

// want returns the ids of the resources of typ that q selects, sorted.
func (m *model) want(q *bulkexport.Query, typ string) []string {
	var members map[string]bool
	if q.Level == fhirbulk.LevelGroup {
		members = map[string]bool{}
		for _, p := range m.groups[q.GroupID] {
			members[p] = true
		}
	}
	if len(q.Patients) > 0 && q.Level != fhirbulk.LevelSystem {
		set := map[string]bool{}
		for _, p := range q.Patients {
			if members == nil || members[p] {
				set[p] = true
			}
		}
		members = set
	}
	ids := []string{}
	for _, r := range m.res {
		switch {
		case r.typ != typ,
			q.Level != fhirbulk.LevelSystem && r.patient == "",
			members != nil && !members[r.patient],
			!q.Since.IsZero() && !r.updated.After(q.Since),
			!q.Until.IsZero() && !r.updated.Before(q.Until),
			!q.TransactionTime.IsZero() && r.updated.After(q.TransactionTime):
			continue
		}
		ids = append(ids, r.id)
	}
	slices.Sort(ids)
	return ids
}

// ---------------------------------------------------------------------------
// Running exports

// types returns the types to check at a level: those the Source lists
// that the Dataset has (in the Patient compartment, below system level).
func (e *sourceEnv) types(ctx context.Context, level fhirbulk.Level) ([]string, error) {
	listed, err := e.src.ResourceTypes(ctx, level)
	if err != nil {
		return nil, fmt.Errorf("ResourceTypes(%s): %w", level, err)
	}
	var out []string
	for _, typ := range e.m.checkable(level) {
		if slices.Contains(listed, typ) {
			out = append(out, typ)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("ResourceTypes(%s) = %v: none of the Dataset's types %v", level, listed, e.m.checkable(level))
	}
	return out, nil
}

// export calls Export, giving up after exportTimeout. On errHung the
// Export call may still be using w.
func (e *sourceEnv) export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	done := make(chan error, 1)
	qc := *q
	go func() { done <- e.src.Export(ctx, &qc, typ, w) }()
	t := time.NewTimer(exportTimeout)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return errHung
	}
}

// expectTypes exports every checkable type at q's level and compares.
func (e *sourceEnv) expectTypes(ctx context.Context, q *bulkexport.Query) error {
	types, err := e.types(ctx, q.Level)
	if err != nil {
		return err
	}
	var errs []error
	for _, typ := range types {
		errs = append(errs, e.expect(ctx, q, typ))
	}
	return errors.Join(errs...)
}

// expect exports typ and compares what is written with the model.
func (e *sourceEnv) expect(ctx context.Context, q *bulkexport.Query, typ string) error {
	var rec bulkexporttest.Recorder
	if err := e.export(ctx, q, typ, &rec); err != nil {
		return fmt.Errorf("%s: %w", e.describe(q, typ), err)
	}
	got, err := lineIDs(typ, rec.Resources)
	if err != nil {
		return fmt.Errorf("%s: %w", e.describe(q, typ), err)
	}
	return compareIDs(e.describe(q, typ), e.m.want(q, typ), got)
}

// lineIDs checks that every line is a JSON object of type typ with an id,
// and returns the ids in order.
func lineIDs(typ string, lines []json.RawMessage) ([]string, error) {
	ids := make([]string, 0, len(lines))
	for _, l := range lines {
		var v struct {
			ResourceType string `json:"resourceType"`
			ID           string `json:"id"`
		}
		if err := json.Unmarshal(l, &v); err != nil {
			return nil, fmt.Errorf("wrote a resource that is not a JSON object (%v): %.100s", err, l)
		}
		if v.ResourceType != typ {
			return nil, fmt.Errorf("wrote a %s (id %q) in an export of %s", v.ResourceType, v.ID, typ)
		}
		if v.ID == "" {
			return nil, fmt.Errorf("wrote a %s without an id", typ)
		}
		ids = append(ids, v.ID)
	}
	return ids, nil
}

// compareIDs compares got (in any order) with want (sorted), and reports
// missing, unexpected and repeated ids.
func compareIDs(what string, want, got []string) error {
	return compareIDsAs(what, want, got, "not selected by the query")
}

// compareIDsAs is compareIDs with the words for unexpected ids.
func compareIDsAs(what string, want, got []string, unexpected string) error {
	seen := map[string]int{}
	for _, id := range got {
		seen[id]++
	}
	var missing, extra, dup []string
	for _, id := range want {
		if seen[id] == 0 {
			missing = append(missing, id)
		}
	}
	for id, n := range seen {
		if !slices.Contains(want, id) {
			extra = append(extra, id)
		}
		if n > 1 {
			dup = append(dup, id)
		}
	}
	if missing == nil && extra == nil && dup == nil {
		return nil
	}
	slices.Sort(extra)
	slices.Sort(dup)
	var b strings.Builder
	fmt.Fprintf(&b, "%s: wrote %d resources, want %d", what, len(got), len(want))
	if missing != nil {
		fmt.Fprintf(&b, "; missing %v", missing)
	}
	if extra != nil {
		fmt.Fprintf(&b, "; %s %v", unexpected, extra)
	}
	if dup != nil {
		fmt.Fprintf(&b, "; written more than once %v", dup)
	}
	return errors.New(b.String())
}

// describe names an Export call in failure messages.
func (e *sourceEnv) describe(q *bulkexport.Query, typ string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Export(%s) at %s level", typ, q.Level)
	if q.GroupID != "" {
		fmt.Fprintf(&b, " of Group/%s", q.GroupID)
	}
	if len(q.Patients) > 0 {
		fmt.Fprintf(&b, ", patient=%v", q.Patients)
	}
	if !q.Since.IsZero() {
		fmt.Fprintf(&b, ", _since=%s", fhirbulk.FormatInstant(q.Since))
	}
	if !q.Until.IsZero() {
		fmt.Fprintf(&b, ", _until=%s", fhirbulk.FormatInstant(q.Until))
	}
	if !q.TransactionTime.IsZero() && !q.TransactionTime.Equal(e.p.afterAll) {
		fmt.Fprintf(&b, ", transaction time %s", fhirbulk.FormatInstant(q.TransactionTime))
	}
	if q.Partition != "" {
		fmt.Fprintf(&b, ", part %q", q.Partition)
	}
	if q.Cursor != "" {
		fmt.Fprintf(&b, ", resumed from cursor %q", q.Cursor)
	}
	return b.String()
}

// ---------------------------------------------------------------------------
// The checks

func checkResourceTypes(ctx context.Context, e *sourceEnv) error {
	var errs []error
	for _, level := range []fhirbulk.Level{fhirbulk.LevelSystem, fhirbulk.LevelPatient, fhirbulk.LevelGroup} {
		listed, err := e.src.ResourceTypes(ctx, level)
		if err != nil {
			errs = append(errs, fmt.Errorf("ResourceTypes(%s): %w", level, err))
			continue
		}
		seen := map[string]bool{}
		for _, typ := range listed {
			if seen[typ] {
				errs = append(errs, fmt.Errorf("ResourceTypes(%s) lists %s twice: %v", level, typ, listed))
			}
			seen[typ] = true
		}
		if !seen["Patient"] {
			errs = append(errs, fmt.Errorf("ResourceTypes(%s) = %v: no Patient", level, listed))
		}
		var unchecked []string
		for _, typ := range e.m.checkable(level) {
			if !seen[typ] {
				unchecked = append(unchecked, typ)
			}
		}
		if unchecked != nil {
			e.note("ResourceTypes(%s) leaves out %v: not checked at that level", level, unchecked)
		}
	}
	return errors.Join(errs...)
}

// checkBounds puts _since and _until exactly on resources' lastUpdated:
// both bounds are exclusive.
func checkBounds(ctx context.Context, e *sourceEnv) error {
	types, err := e.types(ctx, fhirbulk.LevelSystem)
	if err != nil {
		return err
	}
	// A resource of a checked type, updated on a whole second, in the
	// middle of the range.
	var at time.Time
	for _, r := range e.m.res {
		if slices.Contains(types, r.typ) && r.updated.Nanosecond() == 0 &&
			r.updated.After(e.p.low) && r.updated.Before(e.p.high) {
			at = r.updated
			break
		}
	}
	if at.IsZero() {
		e.note("no resource of the listed types %v to put a bound on", types)
		return nil
	}
	var errs []error
	for _, q := range []*bulkexport.Query{
		{Level: fhirbulk.LevelSystem, TransactionTime: e.p.afterAll, Since: at},
		{Level: fhirbulk.LevelSystem, TransactionTime: e.p.afterAll, Until: at},
	} {
		for _, typ := range types {
			if err := e.expect(ctx, q, typ); err != nil {
				errs = append(errs, fmt.Errorf("%w (_since and _until are exclusive: a resource updated exactly at the bound is left out)", err))
			}
		}
	}
	return errors.Join(errs...)
}

// checkResume exports each type, then resumes it from its first, middle
// and last cursor.
func checkResume(ctx context.Context, e *sourceEnv) error {
	queries := []*bulkexport.Query{
		{Level: fhirbulk.LevelSystem, TransactionTime: e.p.afterAll},
		{Level: fhirbulk.LevelGroup, GroupID: e.p.group, TransactionTime: e.p.afterAll},
	}
	var errs []error
	checkpoints := 0
	for _, q := range queries {
		types, err := e.types(ctx, q.Level)
		if err != nil {
			return err
		}
		for _, typ := range types {
			var full bulkexporttest.Recorder
			if err := e.export(ctx, q, typ, &full); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", e.describe(q, typ), err))
				continue
			}
			ids, err := lineIDs(typ, full.Resources)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", e.describe(q, typ), err))
				continue
			}
			var cps []bulkexporttest.Checkpoint
			for _, cp := range full.Checkpoints {
				if cp.Cursor != "" {
					cps = append(cps, cp)
				}
			}
			checkpoints += len(cps)
			if len(cps) > 3 {
				cps = []bulkexporttest.Checkpoint{cps[0], cps[len(cps)/2], cps[len(cps)-1]}
			}
			for _, cp := range cps {
				rq := *q
				rq.Cursor = cp.Cursor
				var rest bulkexporttest.Recorder
				if err := e.export(ctx, &rq, typ, &rest); err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", e.describe(&rq, typ), err))
					continue
				}
				got, err := lineIDs(typ, rest.Resources)
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", e.describe(&rq, typ), err))
					continue
				}
				want := slices.Clone(ids[cp.Written:])
				slices.Sort(want)
				if err := compareIDsAs(e.describe(&rq, typ), want, got, "already written before the cursor"); err != nil {
					errs = append(errs, fmt.Errorf("%w (the cursor was passed to Checkpoint after %d of %d resources)", err, cp.Written, len(ids)))
				}
			}
		}
	}
	if checkpoints == 0 {
		e.note("the Source never calls Checkpoint: an interrupted export starts its types over")
	}
	return errors.Join(errs...)
}

var errStorage = errors.New("sourcetest: simulated storage failure")

// checkWriteFails fails the second Write: Export must not write again,
// and must return an error, or the Worker would take the type as complete.
func checkWriteFails(ctx context.Context, e *sourceEnv) error {
	q := e.sys()
	types, err := e.types(ctx, q.Level)
	if err != nil {
		return err
	}
	var errs []error
	for _, typ := range types {
		if len(e.m.want(q, typ)) < 3 {
			continue
		}
		rec := bulkexporttest.Recorder{OnWrite: func(n int) error {
			if n >= 1 {
				return errStorage
			}
			return nil
		}}
		err := e.export(ctx, q, typ, &rec)
		switch {
		case errors.Is(err, errHung):
			errs = append(errs, fmt.Errorf("%s with a failing Write: %w", e.describe(q, typ), err))
			continue
		case err == nil:
			errs = append(errs, fmt.Errorf("%s returned nil after Write failed: the Worker would record the type as complete with resources missing", e.describe(q, typ)))
		}
		if n := rec.Writes(); n > 2 {
			errs = append(errs, fmt.Errorf("%s called Write %d more times after it failed", e.describe(q, typ), n-2))
		}
	}
	return errors.Join(errs...)
}

// checkCancelMidExport cancels the context in the first Write; later
// Writes fail with the context's error, as the Worker's do.
func checkCancelMidExport(ctx context.Context, e *sourceEnv) error {
	q := e.sys()
	types, err := e.types(ctx, q.Level)
	if err != nil {
		return err
	}
	var errs []error
	for _, typ := range types {
		if len(e.m.want(q, typ)) < 2 {
			continue
		}
		cctx, cancel := context.WithCancel(ctx)
		rec := bulkexporttest.Recorder{OnWrite: func(n int) error {
			if n == 0 {
				cancel()
				return nil
			}
			return cctx.Err()
		}}
		err := e.export(cctx, q, typ, &rec)
		cancel()
		if errors.Is(err, errHung) {
			errs = append(errs, fmt.Errorf("%s cancelled after its first resource: %w", e.describe(q, typ), err))
			continue
		}
		if n := rec.Writes(); n > 2 {
			errs = append(errs, fmt.Errorf("%s called Write %d more times after Write returned the cancelled context's error", e.describe(q, typ), n-2))
		}
	}
	return errors.Join(errs...)
}

// checkCancelBefore calls Export with a context that is already done and a
// writer that accepts everything (the Worker's checks the context only now
// and then): Export must return without writing every resource.
func checkCancelBefore(ctx context.Context, e *sourceEnv) error {
	q := e.sys()
	types, err := e.types(ctx, q.Level)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	var errs []error
	for _, typ := range types {
		want := len(e.m.want(q, typ))
		var rec bulkexporttest.Recorder
		err := e.export(cctx, q, typ, &rec)
		if errors.Is(err, errHung) {
			errs = append(errs, fmt.Errorf("%s with a cancelled context: %w", e.describe(q, typ), err))
			continue
		}
		if want >= 5 && len(rec.Resources) >= want {
			errs = append(errs, fmt.Errorf("%s with a cancelled context wrote all %d resources: it does not look at ctx", e.describe(q, typ), want))
		}
	}
	return errors.Join(errs...)
}

func checkGroupChecker(ctx context.Context, e *sourceEnv) error {
	gc, ok := e.src.(bulkexport.GroupChecker)
	if !ok {
		return skip("the Source is no bulkexport.GroupChecker: a kick-off for an unknown Group gets 202, and its job fails, instead of 404")
	}
	var errs []error
	for id := range e.data.Groups {
		if err := gc.CheckGroup(ctx, id); err != nil {
			errs = append(errs, fmt.Errorf("CheckGroup(%q) = %v, want nil", id, err))
		}
	}
	if err := gc.CheckGroup(ctx, "no-such-group"); !errors.Is(err, bulkexport.ErrNotFound) {
		errs = append(errs, fmt.Errorf("CheckGroup(%q) = %v, want an error wrapping bulkexport.ErrNotFound", "no-such-group", err))
	}
	return errors.Join(errs...)
}

func checkCounter(ctx context.Context, e *sourceEnv) error {
	c, ok := e.src.(bulkexport.Counter)
	if !ok {
		return skip("the Source is no bulkexport.Counter: X-Progress shows resources written, without a percentage")
	}
	var errs []error
	for _, q := range []*bulkexport.Query{
		{Level: fhirbulk.LevelSystem, TransactionTime: e.p.afterAll},
		{Level: fhirbulk.LevelGroup, GroupID: e.p.group, TransactionTime: e.p.afterAll, Since: e.p.since},
	} {
		types, err := e.types(ctx, q.Level)
		if err != nil {
			return err
		}
		for _, typ := range types {
			n, err := c.Count(ctx, q, typ)
			switch {
			case err != nil:
				errs = append(errs, fmt.Errorf("Count for %s: %w", e.describe(q, typ), err))
			case n < 0:
				errs = append(errs, fmt.Errorf("Count for %s = %d", e.describe(q, typ), n))
			case n != int64(len(e.m.want(q, typ))):
				e.note("Count for %s = %d, Export writes %d (an estimate is allowed)", e.describe(q, typ), n, len(e.m.want(q, typ)))
			}
		}
	}
	return errors.Join(errs...)
}

// startServer starts the real handler and Worker over the Source. stop
// shuts them down and reports a Worker that does not stop.
func (e *sourceEnv) startServer() (srv *bulkexporttest.Server, stop func() error, err error) {
	srv, err = bulkexporttest.StartServer(&bulkexporttest.ServerOptions{
		Source: e.src,
		// Small files and a checkpoint at every chance, several types at
		// once: the paths a large export takes.
		Worker: bulkexport.WorkerOptions{TypeConcurrency: 3, MaxFileResources: 4, CheckpointInterval: time.Nanosecond},
	})
	if err != nil {
		return nil, nil, err
	}
	stop = func() error {
		// Close waits for the Worker, which waits for Export calls to
		// return: a Source that ignores its context would hang it.
		closed := make(chan struct{})
		go func() { srv.Close(); close(closed) }()
		t := time.NewTimer(exportTimeout)
		defer t.Stop()
		select {
		case <-closed:
			return nil
		case <-t.C:
			return fmt.Errorf("Worker: the Worker did not stop within %v: an Export call ignores its cancelled context", exportTimeout)
		}
	}
	return srv, stop, nil
}

// checkWorker runs exports through the real handler and Worker.
func checkWorker(ctx context.Context, e *sourceEnv) (err error) {
	srv, stop, err := e.startServer()
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, stop()) }()

	typeParam := func(level fhirbulk.Level) (string, []string, error) {
		types, err := e.types(ctx, level)
		return strings.Join(types, ","), types, err
	}
	var errs []error
	run := func(path string, q *bulkexport.Query, types []string, post map[string]any) {
		var res *bulkexporttest.Result
		var err error
		if post != nil {
			res, err = srv.ExportPOSTContext(ctx, path, post)
		} else {
			res, err = srv.ExportContext(ctx, path)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("Worker: %s: %w", path, err))
			return
		}
		for _, raw := range res.Errors {
			// The Worker reports the lines it rejects (not a JSON object,
			// wrong type) as structure issues; the Source's own Issues
			// are its business.
			var oo fhirbulk.OperationOutcome
			if json.Unmarshal(raw, &oo) == nil && len(oo.Issue) > 0 && oo.Issue[0].Code != fhirbulk.IssueStructure {
				e.note("Worker: %s: the Source reported %s", path, raw)
				continue
			}
			errs = append(errs, fmt.Errorf("Worker: %s: error[] has %s", path, raw))
		}
		for typ := range res.Output {
			if !slices.Contains(types, typ) {
				errs = append(errs, fmt.Errorf("Worker: %s: output has %s, not asked for", path, typ))
			}
		}
		for _, typ := range types {
			if err := compareIDs("Worker: "+path+": "+typ, e.m.want(q, typ), res.IDs(typ)); err != nil {
				errs = append(errs, err)
			}
		}
	}

	if tp, types, err := typeParam(fhirbulk.LevelSystem); err != nil {
		errs = append(errs, err)
	} else {
		run("/$export?_type="+tp, &bulkexport.Query{Level: fhirbulk.LevelSystem}, types, nil)
	}
	if tp, types, err := typeParam(fhirbulk.LevelGroup); err != nil {
		errs = append(errs, err)
	} else {
		run("/Group/"+e.p.group+"/$export?_type="+tp, &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: e.p.group}, types, nil)
	}
	if tp, types, err := typeParam(fhirbulk.LevelPatient); err != nil {
		errs = append(errs, err)
	} else {
		run("/Patient/$export?_type="+tp+"&_since="+url.QueryEscape(fhirbulk.FormatInstant(e.p.since)),
			&bulkexport.Query{Level: fhirbulk.LevelPatient, Since: e.p.since}, types, nil)
		params := []any{map[string]any{"name": "_type", "valueString": tp}}
		for _, id := range e.p.patients {
			params = append(params, map[string]any{"name": "patient", "valueReference": map[string]any{"reference": "Patient/" + id}})
		}
		run("/Patient/$export", &bulkexport.Query{Level: fhirbulk.LevelPatient, Patients: e.p.patients}, types,
			map[string]any{"resourceType": "Parameters", "parameter": params})
	}
	return errors.Join(errs...)
}
