package bulkexporttest

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Source is a bulkexport.Source that serves resources from memory. It
// honours the level, Group membership, the patient parameter, _since and
// _until (by meta.lastUpdated), the transaction time, _typeFilter (token
// and string matching on top-level elements) and _elements. It resumes from
// checkpoints, records deletions, and can inject failures (FailOn,
// OnResource), pauses (Pause) and delays (Delay).
//
// A resource belongs to the Patient compartment of the patient its
// subject, patient or beneficiary element references (a Patient to its
// own); resources without one, such as Practitioner, are exported at
// system level only. Group membership comes from AddGroup and from the
// member[].entity references of Group resources added.
//
// It is safe for concurrent use; add data before exports start.
type Source struct {
	mu        sync.Mutex
	resources map[string][]*entry // by type, in the order added
	groups    map[string][]string
	deleted   map[string][]deletion
	failures  map[string]failure // by type; "" for every type
	pauses    []*Pause

	// OnResource, if set, is called before each resource is written, with
	// the type and the resource's position in the type (from 0). An error
	// fails the export of that type (and so the job); blocking in it holds
	// the export, for cancel tests.
	OnResource func(ctx context.Context, typ string, n int) error
	// Delay is slept before each resource (honouring the context).
	Delay time.Duration
}

type failure struct {
	after int
	err   error
}

type entry struct {
	id          string
	patient     string // Patient compartment owner, or ""
	target      string // Provenance: its first target reference
	recorded    string // Provenance: when it was recorded
	lastUpdated time.Time
	fields      map[string]json.RawMessage
	raw         []byte
}

type deletion struct {
	id string
	at time.Time
}

var (
	_ bulkexport.Source            = (*Source)(nil)
	_ bulkexport.GroupChecker      = (*Source)(nil)
	_ bulkexport.TypeFilterChecker = (*Source)(nil)
	_ bulkexport.Counter           = (*Source)(nil)
)

// NewSource returns an empty Source.
func NewSource() *Source {
	return &Source{resources: map[string][]*entry{}, groups: map[string][]string{}, deleted: map[string][]deletion{}, failures: map[string]failure{}}
}

// FailOn makes every later export of typ (of every type when typ is "")
// fail with err once it has written afterN resources; with afterN 0 it
// fails before writing anything, even when there is nothing to write. An
// export with fewer than afterN resources to write succeeds. The Worker
// fails the job: err's status and message reach the client when it is a
// *bulkexport.Error. A rule for typ takes precedence over the one for
// every type; a nil err removes the rule for typ.
func (s *Source) FailOn(typ string, afterN int, err error) *Source {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		delete(s.failures, typ)
	} else {
		s.failures[typ] = failure{after: max(afterN, 0), err: err}
	}
	return s
}

// failureFor returns the failure rule for typ, if any.
func (s *Source) failureFor(typ string) (failure, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f, ok := s.failures[typ]; ok {
		return f, true
	}
	f, ok := s.failures[""]
	return f, ok
}

// Pause holds one export part way, for tests of cancel, shutdown and
// progress: see Source.Pause.
type Pause struct {
	typ     string
	after   int
	taken   atomic.Bool
	reached chan struct{}
	release chan struct{}
	once    sync.Once
}

// Pause makes the first export of typ (of any type when typ is "") that
// has written afterN resources stop before the next one: Reached is closed
// and the export waits until Release is called, or until its context is
// done, when it returns the context's error (as when the job is cancelled
// or the Worker shuts down). Later exports pass the point freely, so that
// a resumed job completes.
func (s *Source) Pause(typ string, afterN int) *Pause {
	p := &Pause{typ: typ, after: max(afterN, 0), reached: make(chan struct{}), release: make(chan struct{})}
	s.mu.Lock()
	s.pauses = append(s.pauses, p)
	s.mu.Unlock()
	return p
}

// Reached is closed once an export has stopped at the pause.
func (p *Pause) Reached() <-chan struct{} { return p.reached }

// Release lets the paused export go on (or lets the next one pass, when
// none has stopped yet). It may be called more than once.
func (p *Pause) Release() { p.once.Do(func() { close(p.release) }) }

// hold stops at p if this export of typ, having written written
// resources, is the first to reach it.
func (p *Pause) hold(ctx context.Context, typ string, written int) error {
	if (p.typ != "" && p.typ != typ) || written != p.after || !p.taken.CompareAndSwap(false, true) {
		return nil
	}
	close(p.reached)
	select {
	case <-p.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// before runs the injected behaviour before a resource is written: the
// OnResource hook (pos is the resource's position in its type), FailOn
// rules and pauses (written is how many resources this export has
// written), and Delay.
func (s *Source) before(ctx context.Context, typ string, pos, written int) error {
	if s.OnResource != nil {
		if err := s.OnResource(ctx, typ, pos); err != nil {
			return err
		}
	}
	if f, ok := s.failureFor(typ); ok && written >= f.after {
		return f.err
	}
	s.mu.Lock()
	pauses := slices.Clone(s.pauses)
	s.mu.Unlock()
	for _, p := range pauses {
		if err := p.hold(ctx, typ, written); err != nil {
			return err
		}
	}
	if s.Delay > 0 {
		t := time.NewTimer(s.Delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// Add adds resources: JSON as []byte, json.RawMessage or string, or any Go
// value that encodes to a JSON object. Each needs resourceType and id; a
// meta.lastUpdated, when present, must be a FHIR instant. A Group resource
// also makes its member[].entity Patient references members of the Group.
func (s *Source) Add(resources ...any) error {
	for _, r := range resources {
		var raw []byte
		switch v := r.(type) {
		case []byte:
			raw = v
		case json.RawMessage:
			raw = v
		case string:
			raw = []byte(v)
		default:
			b, err := json.Marshal(v)
			if err != nil {
				return fmt.Errorf("bulkexporttest: %w", err)
			}
			raw = b
		}
		e, typ, err := s.parseEntry(raw)
		if err != nil {
			return err
		}
		s.mu.Lock()
		s.resources[typ] = append(s.resources[typ], e)
		if typ == "Group" {
			s.groups[e.id] = append(s.groups[e.id], groupMembers(e.fields)...)
		}
		s.mu.Unlock()
	}
	return nil
}

// MustAdd is Add that panics on error, for test set-up.
func (s *Source) MustAdd(resources ...any) *Source {
	if err := s.Add(resources...); err != nil {
		panic(err)
	}
	return s
}

func (s *Source) parseEntry(raw []byte) (*entry, string, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, "", fmt.Errorf("bulkexporttest: resource is not a JSON object: %w", err)
	}
	var typ, id string
	_ = json.Unmarshal(fields["resourceType"], &typ)
	_ = json.Unmarshal(fields["id"], &id)
	if typ == "" || id == "" {
		return nil, "", fmt.Errorf("bulkexporttest: resource needs resourceType and id: %.80s", raw)
	}
	compact, err := compactJSON(raw)
	if err != nil {
		return nil, "", err
	}
	e := &entry{id: id, fields: fields, raw: compact}
	var meta struct {
		LastUpdated string `json:"lastUpdated"`
	}
	if json.Unmarshal(fields["meta"], &meta) == nil && meta.LastUpdated != "" {
		t, err := fhirbulk.ParseInstant(meta.LastUpdated)
		if err != nil {
			return nil, "", fmt.Errorf("bulkexporttest: %s/%s: meta.lastUpdated: %w", typ, id, err)
		}
		e.lastUpdated = t
	}
	if typ == "Patient" {
		e.patient = id
	} else if typ == "Provenance" {
		e.patient, e.target, e.recorded = s.provenanceTarget(fields)
	} else {
		for _, k := range []string{"subject", "patient", "beneficiary"} {
			var ref struct {
				Reference string `json:"reference"`
			}
			if json.Unmarshal(fields[k], &ref) == nil {
				if pid, ok := strings.CutPrefix(ref.Reference, "Patient/"); ok {
					e.patient = pid
					break
				}
			}
		}
	}
	return e, typ, nil
}

// groupMembers returns the patient ids a Group resource's member[].entity
// references.
func groupMembers(fields map[string]json.RawMessage) []string {
	var members []struct {
		Entity struct {
			Reference string `json:"reference"`
		} `json:"entity"`
	}
	_ = json.Unmarshal(fields["member"], &members)
	ids := []string{}
	for _, m := range members {
		if id, ok := strings.CutPrefix(m.Entity.Reference, "Patient/"); ok && id != "" {
			ids = append(ids, id)
		}
	}
	return ids
}

// provenanceTarget finds a Provenance's first target, the patient it
// belongs to (the target's compartment, for targets added before it), and
// its recorded time.
func (s *Source) provenanceTarget(fields map[string]json.RawMessage) (patient, target, recorded string) {
	var targets []struct {
		Reference string `json:"reference"`
	}
	_ = json.Unmarshal(fields["target"], &targets)
	_ = json.Unmarshal(fields["recorded"], &recorded)
	if len(targets) == 0 {
		return "", "", recorded
	}
	target = targets[0].Reference
	typ, id, _ := strings.Cut(target, "/")
	if typ == "Patient" {
		return id, target, recorded
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.resources[typ] {
		if e.id == id {
			return e.patient, target, recorded
		}
	}
	return "", target, recorded
}

// latestProvenance returns the ids of the newest Provenance per target
// among the selected ones, when the query asks for only the latest.
func latestProvenance(q *bulkexport.Query, selected []*entry) map[string]bool {
	if !slices.Contains(q.IncludeAssociatedData, bulkexport.AssociatedLatestProvenance) ||
		slices.Contains(q.IncludeAssociatedData, bulkexport.AssociatedRelevantProvenance) {
		return nil // the least restrictive code wins
	}
	newest := map[string]*entry{}
	for _, e := range selected {
		if cur, ok := newest[e.target]; !ok || e.recorded > cur.recorded {
			newest[e.target] = e
		}
	}
	keep := map[string]bool{}
	for _, e := range newest {
		keep[e.id] = true
	}
	return keep
}

// AddGroup defines a Group and its member patient ids.
func (s *Source) AddGroup(id string, patientIDs ...string) *Source {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.groups[id] = append(s.groups[id], patientIDs...)
	return s
}

// AddDeleted records that typ/id was deleted at the given time. Exports with
// _since before it list it in deleted[].
func (s *Source) AddDeleted(typ, id string, at time.Time) *Source {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deleted[typ] = append(s.deleted[typ], deletion{id, at})
	return s
}

// ResourceTypes implements bulkexport.Source: at system level every type
// added, at Patient and Group level the types with Patient compartment
// members; sorted by name.
func (s *Source) ResourceTypes(ctx context.Context, level fhirbulk.Level) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for typ, es := range s.resources {
		if level == fhirbulk.LevelSystem || typ == "Patient" || slices.ContainsFunc(es, func(e *entry) bool { return e.patient != "" }) {
			out = append(out, typ)
		}
	}
	slices.Sort(out)
	return out, nil
}

// CheckGroup implements bulkexport.GroupChecker.
func (s *Source) CheckGroup(ctx context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.groups[id]; !ok {
		return fmt.Errorf("Group/%s: %w", id, bulkexport.ErrNotFound)
	}
	return nil
}

// CheckTypeFilter implements bulkexport.TypeFilterChecker: search
// parameters with modifiers or chains, and _-prefixed ones, are refused.
func (s *Source) CheckTypeFilter(typ string, q url.Values) error {
	for k := range q {
		if strings.ContainsAny(k, ":.") || strings.HasPrefix(k, "_") {
			return fmt.Errorf("search parameter %q is not supported", k)
		}
	}
	return nil
}

// Count implements bulkexport.Counter.
func (s *Source) Count(ctx context.Context, q *bulkexport.Query, typ string) (int64, error) {
	sel, err := s.selected(ctx, q, typ)
	if keep := latestProvenance(q, sel); typ == "Provenance" && keep != nil {
		return int64(len(keep)), err
	}
	return int64(len(sel)), err
}

// Export implements bulkexport.Source. The cursor is the position of the
// next resource of the type.
func (s *Source) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	if f, ok := s.failureFor(typ); ok && f.after == 0 {
		return f.err
	}
	start := 0
	if q.Cursor != "" {
		n, err := strconv.Atoi(q.Cursor)
		if err != nil || n < 0 {
			return fmt.Errorf("bulkexporttest: bad cursor %q", q.Cursor)
		}
		start = n
	}
	s.mu.Lock()
	all := s.resources[typ]
	s.mu.Unlock()
	lo, hi, err := partitionRange(q.Partition, len(all))
	if err != nil {
		return err
	}
	start = max(start, lo)
	all = all[:hi]
	members, err := s.members(q)
	if err != nil {
		return err
	}
	// Deletions go first, before the first checkpoint: a resumed export
	// (Cursor set) has already recorded them. Of a partitioned type, the
	// first part has them.
	if !q.Since.IsZero() && q.Cursor == "" && lo == 0 {
		s.mu.Lock()
		dels := slices.Clone(s.deleted[typ])
		s.mu.Unlock()
		for _, d := range dels {
			if d.at.After(q.Since) && (q.TransactionTime.IsZero() || !d.at.After(q.TransactionTime)) {
				if err := w.Deleted(d.id, d.at); err != nil {
					return err
				}
			}
		}
	}
	var keep map[string]bool
	if typ == "Provenance" {
		sel, err := s.selected(ctx, q, typ)
		if err != nil {
			return err
		}
		keep = latestProvenance(q, sel)
	}
	written := 0
	for i := start; i < len(all); i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		e := all[i]
		if !s.match(e, q, typ, members) || (keep != nil && !keep[e.id]) {
			continue
		}
		if err := s.before(ctx, typ, i, written); err != nil {
			return err
		}
		if err := w.Write(s.view(e, q)); err != nil {
			return err
		}
		written++
		if err := w.Checkpoint(strconv.Itoa(i + 1)); err != nil {
			return err
		}
	}
	return nil
}

// partitionRange parses a Partition token of PartitionedSource, "lo-hi":
// the positions [lo, hi) of the type's resources. "" is every position.
func partitionRange(tok string, n int) (lo, hi int, err error) {
	if tok == "" {
		return 0, n, nil
	}
	a, b, ok := strings.Cut(tok, "-")
	lo, err1 := strconv.Atoi(a)
	hi, err2 := strconv.Atoi(b)
	if !ok || err1 != nil || err2 != nil || lo < 0 || hi < lo {
		return 0, 0, fmt.Errorf("bulkexporttest: bad partition %q", tok)
	}
	return min(lo, n), min(hi, n), nil
}

// PartitionedSource is a Source that is also a bulkexport.Partitioner: it
// splits each type into up to Parts ranges of the order resources were
// added in (all of them, whatever the query selects), so that a Worker
// whose store keeps units exports each range as a unit of its own. Parts
// of 1 or less leave types whole.
type PartitionedSource struct {
	*Source
	Parts int
}

var _ bulkexport.Partitioner = PartitionedSource{}

// Partitions implements bulkexport.Partitioner with tokens "lo-hi".
func (p PartitionedSource) Partitions(ctx context.Context, q *bulkexport.Query, typ string, limit int) ([]string, error) {
	p.mu.Lock()
	n := len(p.resources[typ])
	p.mu.Unlock()
	parts := min(p.Parts, limit)
	if parts <= 1 || n == 0 {
		return nil, nil
	}
	out := make([]string, 0, parts)
	for i := range parts {
		lo, hi := n*i/parts, n*(i+1)/parts
		if i == parts-1 {
			// Resources added later (they are not selected: their
			// lastUpdated is past the transaction time) still belong
			// to a part.
			hi = 1 << 30
		}
		out = append(out, strconv.Itoa(lo)+"-"+strconv.Itoa(hi))
	}
	return out, nil
}

// members is the set of patients the query may export, or nil for no
// restriction.
func (s *Source) members(q *bulkexport.Query) (map[string]bool, error) {
	var set map[string]bool
	if q.Level == fhirbulk.LevelGroup {
		s.mu.Lock()
		ids, ok := s.groups[q.GroupID]
		s.mu.Unlock()
		if !ok {
			return nil, fmt.Errorf("Group/%s: %w", q.GroupID, bulkexport.ErrNotFound)
		}
		set = map[string]bool{}
		for _, id := range ids {
			set[id] = true
		}
	}
	if len(q.Patients) > 0 {
		p := map[string]bool{}
		for _, id := range q.Patients {
			if set == nil || set[id] {
				p[id] = true
			}
		}
		set = p
	}
	return set, nil
}

func (s *Source) selected(ctx context.Context, q *bulkexport.Query, typ string) ([]*entry, error) {
	members, err := s.members(q)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	all := s.resources[typ]
	s.mu.Unlock()
	lo, hi, err := partitionRange(q.Partition, len(all))
	if err != nil {
		return nil, err
	}
	var out []*entry
	for _, e := range all[lo:hi] {
		if s.match(e, q, typ, members) {
			out = append(out, e)
		}
	}
	return out, nil
}

func (s *Source) match(e *entry, q *bulkexport.Query, typ string, members map[string]bool) bool {
	if q.Level != fhirbulk.LevelSystem && e.patient == "" {
		return false
	}
	if members != nil && !members[e.patient] {
		return false
	}
	if !e.lastUpdated.IsZero() {
		if !q.Since.IsZero() && !e.lastUpdated.After(q.Since) {
			return false
		}
		if !q.Until.IsZero() && !e.lastUpdated.Before(q.Until) {
			return false
		}
		if !q.TransactionTime.IsZero() && e.lastUpdated.After(q.TransactionTime) {
			return false
		}
	}
	if len(q.TypeFilters) == 0 {
		return true
	}
	for _, f := range q.TypeFilters {
		if f.Type == typ && matchFilter(e, f.Values()) {
			return true
		}
	}
	return false
}

// matchFilter: every parameter must match (AND); a parameter's comma
// values are OR'd. The parameter names a top-level element (kebab-case →
// camelCase); a value matches a string anywhere in it, or a token
// "system|code" against a Coding.
func matchFilter(e *entry, q url.Values) bool {
	for name, vals := range q {
		raw, ok := e.fields[camel(name)]
		if !ok {
			return false
		}
		var v any
		if json.Unmarshal(raw, &v) != nil {
			return false
		}
		found := false
		for _, list := range vals {
			for _, want := range strings.Split(list, ",") {
				if matchValue(v, want) {
					found = true
				}
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func matchValue(v any, want string) bool {
	system, code, hasSystem := strings.Cut(want, "|")
	if !hasSystem {
		code = want
	}
	switch x := v.(type) {
	case string:
		return !hasSystem && strings.EqualFold(x, code)
	case bool:
		return strconv.FormatBool(x) == want
	case []any:
		return slices.ContainsFunc(x, func(it any) bool { return matchValue(it, want) })
	case map[string]any:
		if c, ok := x["code"].(string); ok && c == code {
			if !hasSystem || x["system"] == system {
				return true
			}
		}
		for k, it := range x {
			if k == "coding" || k == "value" {
				if matchValue(it, want) {
					return true
				}
			}
		}
	}
	return false
}

func camel(s string) string {
	parts := strings.Split(s, "-")
	for i := 1; i < len(parts); i++ {
		if parts[i] != "" {
			parts[i] = strings.ToUpper(parts[i][:1]) + parts[i][1:]
		}
	}
	return strings.Join(parts, "")
}

// subset keeps resourceType, id, meta and the listed elements, and tags
// the result SUBSETTED.
func subset(e *entry, keep []string) []byte {
	out := map[string]json.RawMessage{}
	for k, v := range e.fields {
		if k == "resourceType" || k == "id" || slices.Contains(keep, k) {
			out[k] = v
		}
	}
	var meta map[string]any
	_ = json.Unmarshal(e.fields["meta"], &meta)
	if meta == nil {
		meta = map[string]any{}
	}
	tags, _ := meta["tag"].([]any)
	meta["tag"] = append(tags, map[string]any{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"})
	out["meta"], _ = json.Marshal(meta)
	b, _ := json.Marshal(out)
	return b
}

func compactJSON(raw []byte) ([]byte, error) {
	var v json.RawMessage
	if err := json.Unmarshal(raw, &v); err != nil {
		return nil, err
	}
	b, err := json.Marshal(v) // compacts
	return b, err
}

var (
	_ bulkexport.Organizer            = (*Source)(nil)
	_ bulkexport.AssociatedDataLister = (*Source)(nil)
)

// OrganizeTypes implements bulkexport.Organizer: output can be organized
// by Patient at every level.
func (s *Source) OrganizeTypes(ctx context.Context, level fhirbulk.Level) ([]string, error) {
	return []string{"Patient"}, nil
}

// ExportBlocks implements bulkexport.Organizer for organizeOutputBy=Patient:
// one block per selected Patient, holding the patient and the resources
// of the given types in its compartment. Resources outside every
// compartment are left out. The cursor is the position of the next
// patient.
func (s *Source) ExportBlocks(ctx context.Context, q *bulkexport.Query, by string, types []string, w bulkexport.BlockWriter) error {
	if by != "Patient" {
		return fmt.Errorf("bulkexporttest: cannot organize by %s", by)
	}
	start := 0
	if q.Cursor != "" {
		n, err := strconv.Atoi(q.Cursor)
		if err != nil || n < 0 {
			return fmt.Errorf("bulkexporttest: bad cursor %q", q.Cursor)
		}
		start = n
	}
	members, err := s.members(q)
	if err != nil {
		return err
	}
	s.mu.Lock()
	patients := s.resources["Patient"]
	s.mu.Unlock()
	wantPatients := slices.Contains(types, "Patient")
	written := map[string]int{}
	for _, typ := range types {
		if f, ok := s.failureFor(typ); ok && f.after == 0 {
			return f.err
		}
	}
	for i := start; i < len(patients); i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		p := patients[i]
		if members != nil && !members[p.id] {
			continue
		}
		if err := w.StartBlock("Patient/" + p.id); err != nil {
			return err
		}
		if wantPatients && s.match(p, q, "Patient", members) {
			if err := w.Write(s.view(p, q)); err != nil {
				return err
			}
		}
		for _, typ := range types {
			if typ == "Patient" {
				continue
			}
			s.mu.Lock()
			all := s.resources[typ]
			s.mu.Unlock()
			for n, e := range all {
				if e.patient != p.id || !s.match(e, q, typ, members) {
					continue
				}
				if err := s.before(ctx, typ, n, written[typ]); err != nil {
					return err
				}
				if err := w.Write(s.view(e, q)); err != nil {
					return err
				}
				written[typ]++
			}
		}
		if err := w.Checkpoint(strconv.Itoa(i + 1)); err != nil {
			return err
		}
	}
	return nil
}

// view is the resource as the query wants it (subset by _elements).
func (s *Source) view(e *entry, q *bulkexport.Query) []byte {
	if q.Elements != nil {
		return subset(e, q.Elements)
	}
	return e.raw
}

// AssociatedData implements bulkexport.AssociatedDataLister. With
// LatestProvenanceResources, a Provenance export keeps only the newest
// Provenance (by recorded, then meta.lastUpdated) per target; with
// RelevantProvenanceResources, or without either code, every Provenance
// whose target is exported is kept (the IG's default rule).
func (s *Source) AssociatedData() []string {
	return []string{bulkexport.AssociatedLatestProvenance, bulkexport.AssociatedRelevantProvenance}
}
