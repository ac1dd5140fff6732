package sourcetest

import (
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Dataset is the data a Source under test serves. NewDataset's, which Run
// loads into the Source, has 30 FHIR R4 resources of six types, every one
// with an id and a meta.lastUpdated:
//
//   - Patient pt-1 … pt-6.
//   - Observation (subject), Condition (subject) and AllergyIntolerance
//     (patient) in the patients' compartments: one to three Observations
//     per patient, Conditions for pt-1 … pt-5, AllergyIntolerances for
//     pt-2 and pt-4. One more Observation, obs-qc-1, has no subject: it is
//     in no compartment and exported at system level only.
//   - Practitioner prac-1 and prac-2, outside every compartment.
//   - Group grp-odd (pt-1, pt-3, pt-5) and grp-two (pt-2, pt-6), with
//     their members in member[].entity.
//
// meta.lastUpdated values are spread over the 30 hours from
// 2024-03-01T00:00:00Z (on whole hours, some half a second past) and
// interleave the types, so that a _since or _until window cuts through
// each of them.
type Dataset struct {
	// Resources holds every resource as JSON, Groups included.
	Resources []json.RawMessage
	// Groups maps each Group's id to its members' patient ids, the same
	// membership as the Group resources', for hosts that keep it apart.
	Groups map[string][]string
}

// datasetEpoch is the earliest meta.lastUpdated in a Dataset.
var datasetEpoch = time.Date(2024, 3, 1, 0, 0, 0, 0, time.UTC)

// NewDataset returns the Dataset Run uses. It is the same every time.
func NewDataset() Dataset {
	var res []map[string]any
	add := func(r map[string]any) { res = append(res, r) }
	ref := func(s string) map[string]any { return map[string]any{"reference": s} }
	coding := func(system, code, display string) map[string]any {
		return map[string]any{"coding": []any{map[string]any{"system": system, "code": code, "display": display}}}
	}

	for i := 1; i <= 2; i++ {
		add(map[string]any{"resourceType": "Practitioner", "id": fmt.Sprintf("prac-%d", i),
			"name": []any{map[string]any{"family": fmt.Sprintf("Doctor%d", i)}}})
	}
	for i := 1; i <= 6; i++ {
		add(map[string]any{"resourceType": "Patient", "id": fmt.Sprintf("pt-%d", i),
			"gender": []string{"female", "male"}[i%2], "birthDate": fmt.Sprintf("19%d0-0%d-1%d", 4+i, i, i),
			"name": []any{map[string]any{"family": fmt.Sprintf("Family%d", i), "given": []any{fmt.Sprintf("Given%d", i)}}}})
	}
	loinc := [][2]string{{"8867-4", "Heart rate"}, {"29463-7", "Body weight"}, {"8310-5", "Body temperature"}}
	for i := 1; i <= 6; i++ {
		for k := 0; k < []int{2, 3, 1, 2, 3, 1}[i-1]; k++ {
			add(map[string]any{"resourceType": "Observation", "id": fmt.Sprintf("obs-%d-%d", i, k+1), "status": "final",
				"code":      coding("http://loinc.org", loinc[k][0], loinc[k][1]),
				"subject":   ref(fmt.Sprintf("Patient/pt-%d", i)),
				"performer": []any{ref(fmt.Sprintf("Practitioner/prac-%d", i%2+1))}})
		}
	}
	// An Observation about no patient: exported at system level only.
	add(map[string]any{"resourceType": "Observation", "id": "obs-qc-1", "status": "final",
		"code": coding("http://loinc.org", loinc[2][0], loinc[2][1]), "note": []any{map[string]any{"text": "thermometer calibration"}}})
	for i := 1; i <= 5; i++ {
		add(map[string]any{"resourceType": "Condition", "id": fmt.Sprintf("cond-%d", i),
			"clinicalStatus": coding("http://terminology.hl7.org/CodeSystem/condition-clinical", []string{"active", "resolved"}[i%2], ""),
			"code":           coding("http://snomed.info/sct", "38341003", "Hypertension"),
			"subject":        ref(fmt.Sprintf("Patient/pt-%d", i))})
	}
	for _, i := range []int{2, 4} {
		add(map[string]any{"resourceType": "AllergyIntolerance", "id": fmt.Sprintf("allergy-%d", i),
			"code":    coding("http://snomed.info/sct", "91936005", "Allergy to penicillin"),
			"patient": ref(fmt.Sprintf("Patient/pt-%d", i))})
	}
	groups := map[string][]string{"grp-odd": {"pt-1", "pt-3", "pt-5"}, "grp-two": {"pt-2", "pt-6"}}
	for _, id := range []string{"grp-odd", "grp-two"} {
		var members []any
		for _, p := range groups[id] {
			members = append(members, map[string]any{"entity": ref("Patient/" + p)})
		}
		add(map[string]any{"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": members})
	}

	d := Dataset{Groups: groups}
	for i, r := range res {
		// 30 resources, 30 hours: i*11 mod 30 visits every hour once.
		at := datasetEpoch.Add(time.Duration(i*11%len(res)) * time.Hour)
		if i%5 == 3 {
			at = at.Add(500 * time.Millisecond)
		}
		r["meta"] = map[string]any{"lastUpdated": fhirbulk.FormatInstant(at)}
		b, err := json.Marshal(r)
		if err != nil {
			panic(err)
		}
		d.Resources = append(d.Resources, b)
	}
	return d
}

// Types returns the resource types in the dataset, sorted.
func (d Dataset) Types() []string {
	var types []string
	for _, raw := range d.Resources {
		var v struct {
			ResourceType string `json:"resourceType"`
		}
		_ = json.Unmarshal(raw, &v)
		if !slices.Contains(types, v.ResourceType) {
			types = append(types, v.ResourceType)
		}
	}
	slices.Sort(types)
	return types
}

// OfType returns the resources of one type, in dataset order.
func (d Dataset) OfType(typ string) []json.RawMessage {
	var out []json.RawMessage
	for _, raw := range d.Resources {
		var v struct {
			ResourceType string `json:"resourceType"`
		}
		if json.Unmarshal(raw, &v) == nil && v.ResourceType == typ {
			out = append(out, raw)
		}
	}
	return out
}
