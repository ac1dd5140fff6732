// Package dataset is a deterministic synthetic FHIR R4 dataset that
// implements bulkexport.Source, for the examples and their tests.
//
// Nothing is stored: every resource is generated on the fly from its
// patient's index and the dataset's seed, so a dataset of a million
// patients costs no more memory than one of ten, and the same (patients,
// seed) always yields byte-identical resources.
//
// # Content
//
// Patients are p-1 … p-N. Each has 1 to 3 of each of Encounter (e-<n>-<k>),
// Condition (c-<n>-<k>), Observation (o-<n>-<k>) and MedicationRequest
// (m-<n>-<k>), all referring to it with subject {"reference":
// "Patient/p-<n>"} and to one of its encounters. Observations are vital
// signs and a glucose lab with LOINC codes (8867-4 heart rate, 8480-6
// systolic and 8462-4 diastolic blood pressure, 29463-7 body weight,
// 8302-2 body height, 8310-5 body temperature, 9279-1 respiratory rate,
// 2339-0 glucose) and a valueQuantity in UCUM units; Conditions have
// SNOMED CT codes and a clinicalStatus of active or resolved;
// MedicationRequests have an RxNorm medicationCodeableConcept, status
// active, completed or stopped, and intent order. Practitioners
// (pr-1 … pr-P, P = 1 + N/20) and Organizations (org-1 … org-O,
// O = 1 + N/200) are exported at system level only.
//
// meta.lastUpdated of every resource lies in the two years before the
// fixed instant Reference (2026-01-01T00:00:00Z), in whole seconds, so
// that _since and _until select subsets whatever the clock says.
//
// # Groups
//
// Group export knows these groups:
//
//   - "all": every patient;
//   - "even" and "odd": the patients whose index n (in p-<n>) is even, or odd;
//   - "cohort-0" … "cohort-9": the patients with n % 10 == k.
//
// Any other id is unknown: CheckGroup returns an error wrapping
// bulkexport.ErrNotFound, so the kick-off answers 404.
//
// # Queries
//
// Export honours the level and Group membership, the patient parameter
// (ids that are unknown or not members of the Group are left out and
// reported once, as a warning in the Patient type's error file), _since
// and _until (exclusive bounds on meta.lastUpdated), the transaction time
// (resources updated after it are left out), _typeFilter (see
// SearchParams: token searches, filters on one type OR'd) and _elements
// (the listed top-level elements plus resourceType, id, meta and the
// elements FHIR makes mandatory, with a SUBSETTED meta.tag).
//
// ExportBlocks (bulkexport.Organizer) serves organizeOutputBy=Patient at
// every level: one block per patient with its resources of the asked
// types.
//
// Export checkpoints after every patient (or practitioner, organization)
// with its index as the cursor, and a resumed export continues after it,
// so that every resource is written exactly once.
package dataset

import (
	"context"
	"fmt"
	"net/url"
	"strconv"
	"strings"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// DefaultSeed is the seed New uses.
const DefaultSeed uint64 = 20260101

// Dataset is a synthetic FHIR R4 dataset. It is immutable and safe for
// concurrent use.
type Dataset struct {
	patients      int
	practitioners int
	organizations int
	seed          uint64
	partOwners    int // the fewest owners a partition gets (Partitions)
}

var (
	_ bulkexport.Source            = (*Dataset)(nil)
	_ bulkexport.GroupChecker      = (*Dataset)(nil)
	_ bulkexport.TypeFilterChecker = (*Dataset)(nil)
	_ bulkexport.Counter           = (*Dataset)(nil)
	_ bulkexport.Partitioner       = (*Dataset)(nil)
)

// New returns a dataset of the given number of patients with DefaultSeed.
func New(patients int) *Dataset { return NewSeeded(patients, DefaultSeed) }

// NewSeeded returns a dataset of the given number of patients whose
// content derives from seed. A negative count is taken as 0.
func NewSeeded(patients int, seed uint64) *Dataset {
	patients = max(patients, 0)
	return &Dataset{
		patients:      patients,
		practitioners: 1 + patients/20,
		organizations: 1 + patients/200,
		seed:          seed,
		partOwners:    DefaultPartitionOwners,
	}
}

// WithPartitionOwners returns a copy of d whose Partitions gives each
// part at least n owners (patients, practitioners or organizations), for
// tests of partitioned exports on small datasets. n below 1 is taken as 1.
func (d *Dataset) WithPartitionOwners(n int) *Dataset {
	c := *d
	c.partOwners = max(n, 1)
	return &c
}

// Patients returns the number of patients.
func (d *Dataset) Patients() int { return d.patients }

// Practitioners returns the number of practitioners.
func (d *Dataset) Practitioners() int { return d.practitioners }

// Organizations returns the number of organizations.
func (d *Dataset) Organizations() int { return d.organizations }

// Types in export order.
var (
	compartmentTypes = []string{"Patient", "Encounter", "Condition", "Observation", "MedicationRequest"}
	systemTypes      = append(append([]string(nil), compartmentTypes...), "Practitioner", "Organization")
)

// ResourceTypes implements bulkexport.Source: the compartment types at
// patient and group level, those plus Practitioner and Organization at
// system level.
func (d *Dataset) ResourceTypes(ctx context.Context, level fhirbulk.Level) ([]string, error) {
	switch level {
	case fhirbulk.LevelSystem:
		return append([]string(nil), systemTypes...), nil
	case fhirbulk.LevelPatient, fhirbulk.LevelGroup:
		return append([]string(nil), compartmentTypes...), nil
	}
	return nil, fmt.Errorf("dataset: unknown export level %q", level)
}

// Groups returns the ids of the groups the dataset knows.
func Groups() []string {
	out := []string{"all", "even", "odd"}
	for k := range 10 {
		out = append(out, "cohort-"+strconv.Itoa(k))
	}
	return out
}

// GroupName returns the human name of a group the dataset knows ("" for
// an unknown id).
func GroupName(groupID string) string {
	switch groupID {
	case "all":
		return "All patients"
	case "even":
		return "Patients with an even number"
	case "odd":
		return "Patients with an odd number"
	}
	if _, err := membership(groupID); err == nil {
		k := strings.TrimPrefix(groupID, "cohort-")
		return "Cohort " + k + ": patients whose number ends in " + k
	}
	return ""
}

// GroupMembers returns the indices n of the patients p-<n> in a group, in
// increasing order, or an error wrapping bulkexport.ErrNotFound.
func (d *Dataset) GroupMembers(groupID string) ([]int, error) {
	m, err := membership(groupID)
	if err != nil {
		return nil, err
	}
	var out []int
	for idx := 1; idx <= d.patients; idx++ {
		if m(idx) {
			out = append(out, idx)
		}
	}
	return out, nil
}

// membership returns the membership test of a group, or an error wrapping
// bulkexport.ErrNotFound.
func membership(groupID string) (func(idx int) bool, error) {
	switch groupID {
	case "all":
		return func(int) bool { return true }, nil
	case "even":
		return func(idx int) bool { return idx%2 == 0 }, nil
	case "odd":
		return func(idx int) bool { return idx%2 == 1 }, nil
	}
	if rest, ok := strings.CutPrefix(groupID, "cohort-"); ok && len(rest) == 1 && rest[0] >= '0' && rest[0] <= '9' {
		k := int(rest[0] - '0')
		return func(idx int) bool { return idx%10 == k }, nil
	}
	return nil, fmt.Errorf("dataset: Group/%s: %w", groupID, bulkexport.ErrNotFound)
}

// IsMember reports whether patient p-<idx> belongs to the group (false for
// an unknown group).
func (d *Dataset) IsMember(groupID string, idx int) bool {
	m, err := membership(groupID)
	return err == nil && idx >= 1 && idx <= d.patients && m(idx)
}

// CheckGroup implements bulkexport.GroupChecker.
func (d *Dataset) CheckGroup(ctx context.Context, groupID string) error {
	_, err := membership(groupID)
	return err
}

// CheckTypeFilter implements bulkexport.TypeFilterChecker: it accepts the
// token searches listed by SearchParams and rejects anything else.
func (d *Dataset) CheckTypeFilter(typ string, query url.Values) error {
	k := kindOf(typ)
	if k == 0 {
		return fmt.Errorf("resource type %s is not in the dataset", typ)
	}
	_, err := parseFilter(k, query)
	return err
}

// patientIndex parses a patient id p-<n> of this dataset.
func (d *Dataset) patientIndex(id string) (int, bool) {
	rest, ok := strings.CutPrefix(id, "p-")
	if !ok || rest == "" || rest[0] == '0' || rest[0] == '+' {
		return 0, false
	}
	n, err := strconv.Atoi(rest)
	if err != nil || n < 1 || n > d.patients {
		return 0, false
	}
	return n, true
}

// Export implements bulkexport.Source.
func (d *Dataset) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	p, err := d.newPlan(q, typ, true)
	if err != nil {
		return err
	}
	if p.kind == kindPatient && q.Cursor == "" && p.lo == 0 {
		if err := p.reportMissing(q, w); err != nil {
			return err
		}
	}
	var r rec
	buf := make([]byte, 0, 2048)
	var cursor []byte
	return p.each(ctx, func(idx int) error {
		err := p.resources(idx, &r, func(r *rec) error {
			buf = encode(buf[:0], r, p.keep)
			return w.Write(buf)
		})
		if err != nil {
			return err
		}
		cursor = strconv.AppendInt(cursor[:0], int64(idx), 10)
		return w.Checkpoint(string(cursor))
	})
}

// reportMissing writes a warning for every patient the patient parameter
// named in vain (unknown, or not in the Group).
func (p *plan) reportMissing(q *bulkexport.Query, w bulkexport.ResourceWriter) error {
	for _, id := range p.missing {
		msg := "Patient/" + id + " is not known; it was left out"
		if q.Level == fhirbulk.LevelGroup {
			msg = "Patient/" + id + " is not a member of Group/" + q.GroupID + "; it was left out"
		}
		if err := w.Issue(fhirbulk.Issue{Severity: fhirbulk.SeverityWarning, Code: fhirbulk.IssueNotFound,
			Diagnostics: msg, Expression: []string{"patient"}}); err != nil {
			return err
		}
	}
	return nil
}

// Count implements bulkexport.Counter: the exact number of resources Export
// writes for q from the start (the cursor is ignored, so that progress
// counts what a resumed job wrote before). It generates the resources'
// selecting fields only, without JSON.
func (d *Dataset) Count(ctx context.Context, q *bulkexport.Query, typ string) (int64, error) {
	p, err := d.newPlan(q, typ, false)
	if err != nil {
		return 0, err
	}
	var n int64
	var r rec
	err = p.each(ctx, func(idx int) error {
		return p.resources(idx, &r, func(*rec) error { n++; return nil })
	})
	return n, err
}

// Expected returns the ids of the resources of type typ that Export writes
// for q, in the order it writes them, continuing after q.Cursor when set.
// Tests compare exports against it.
func (d *Dataset) Expected(q *bulkexport.Query, typ string) ([]string, error) {
	p, err := d.newPlan(q, typ, true)
	if err != nil {
		return nil, err
	}
	var ids []string
	var r rec
	err = p.each(context.Background(), func(idx int) error {
		return p.resources(idx, &r, func(r *rec) error {
			ids = append(ids, string(appendID(nil, r)))
			return nil
		})
	})
	return ids, err
}

// Resource returns the JSON of one resource by type and id, as an
// unrestricted Export writes it, or an error wrapping bulkexport.ErrNotFound.
func (d *Dataset) Resource(typ, id string) ([]byte, error) {
	k := kindOf(typ)
	idx, seq, ok := d.parseID(k, id)
	if !ok {
		return nil, fmt.Errorf("dataset: %s/%s: %w", typ, id, bulkexport.ErrNotFound)
	}
	var r rec
	d.gen(k, idx, seq, &r)
	return encode(nil, &r, nil), nil
}

// parseID splits an id of kind k into owner index and sequence number and
// checks that the resource exists.
func (d *Dataset) parseID(k kind, id string) (idx, seq int, ok bool) {
	rest, found := strings.CutPrefix(id, idPrefix[k])
	if k == 0 || !found {
		return 0, 0, false
	}
	num := func(s string) (int, bool) {
		if s == "" || s[0] == '0' || s[0] == '+' || s[0] == '-' {
			return 0, false
		}
		n, err := strconv.Atoi(s)
		return n, err == nil
	}
	switch k {
	case kindPatient, kindPractitioner, kindOrganization:
		idx, ok = num(rest)
		limit := map[kind]int{kindPatient: d.patients, kindPractitioner: d.practitioners, kindOrganization: d.organizations}[k]
		return idx, 0, ok && idx <= limit
	}
	a, b, found := strings.Cut(rest, "-")
	if !found {
		return 0, 0, false
	}
	var ok1, ok2 bool
	idx, ok1 = num(a)
	seq, ok2 = num(b)
	if !ok1 || !ok2 || idx > d.patients || seq > d.perPatient(k, idx) {
		return 0, 0, false
	}
	return idx, seq, true
}
