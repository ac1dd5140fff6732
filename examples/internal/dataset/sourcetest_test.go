package dataset

import (
	"encoding/json"
	"fmt"
	"testing"

	"github.com/bulkfhir/bulkexport/sourcetest"
)

// TestSourceConformance runs the Source conformance suite against a small
// dataset, with the optional interfaces it implements (GroupChecker,
// TypeFilterChecker, Counter, Organizer).
func TestSourceConformance(t *testing.T) {
	t.Parallel()
	d := New(12).WithPartitionOwners(2)
	sourcetest.RunFixed(t, d, describe(d, "even", "odd"))
}

// describe lists every resource of d, generated one by one rather than
// exported, with the members of the given groups: the Dataset the
// conformance suite checks d's exports against.
func describe(d *Dataset, groups ...string) sourcetest.Dataset {
	var out sourcetest.Dataset
	add := func(k kind, idx, seq int) {
		var r rec
		d.gen(k, idx, seq, &r)
		out.Resources = append(out.Resources, json.RawMessage(encode(nil, &r, nil)))
	}
	for idx := 1; idx <= d.patients; idx++ {
		add(kindPatient, idx, 0)
		for _, k := range []kind{kindEncounter, kindCondition, kindObservation, kindMedicationRequest} {
			for seq := 1; seq <= d.perPatient(k, idx); seq++ {
				add(k, idx, seq)
			}
		}
	}
	for idx := 1; idx <= d.practitioners; idx++ {
		add(kindPractitioner, idx, 0)
	}
	for idx := 1; idx <= d.organizations; idx++ {
		add(kindOrganization, idx, 0)
	}
	out.Groups = map[string][]string{}
	for _, g := range groups {
		members, err := d.GroupMembers(g)
		if err != nil {
			panic(err)
		}
		for _, idx := range members {
			out.Groups[g] = append(out.Groups[g], fmt.Sprintf("p-%d", idx))
		}
	}
	return out
}
