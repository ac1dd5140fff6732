package bulkexport

import "encoding/json"

// Canonical URLs the CapabilityStatement fragment advertises.
const (
	CapabilityBulkData        = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
	OperationExport           = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"
	OperationPatientExport    = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"
	OperationGroupExport      = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"
	OperationExportPollStatus = "http://ehealth.sundhed.dk/fhir/OperationDefinition/-s-export-poll-status"
)

// CapabilityOperation is a CapabilityStatement.rest[.resource].operation.
type CapabilityOperation struct {
	Name       string `json:"name"`
	Definition string `json:"definition"`
}

// CapabilityResource is a CapabilityStatement.rest.resource entry carrying
// operations.
type CapabilityResource struct {
	Type      string                `json:"type"`
	Operation []CapabilityOperation `json:"operation"`
}

// Capability is the part of a server's CapabilityStatement that advertises
// bulk export: what to add to instantiates, rest.operation and
// rest.resource. All three export operations are named "export", as STU3
// and the Inferno tests expect, with the IG's canonical definitions.
type Capability struct {
	Instantiates []string              `json:"instantiates"`
	Operations   []CapabilityOperation `json:"operation"`
	Resources    []CapabilityResource  `json:"resource"`
}

// Capability returns the CapabilityStatement fragment for the levels this
// handler serves (all three, plus $export-poll-status).
func (h *Handler) Capability() Capability {
	return Capability{
		Instantiates: []string{CapabilityBulkData},
		Operations: []CapabilityOperation{
			{Name: "export", Definition: OperationExport},
			{Name: "export-poll-status", Definition: OperationExportPollStatus},
		},
		Resources: []CapabilityResource{
			{Type: "Patient", Operation: []CapabilityOperation{{Name: "export", Definition: OperationPatientExport}}},
			{Type: "Group", Operation: []CapabilityOperation{{Name: "export", Definition: OperationGroupExport}}},
		},
	}
}

// MergeInto adds the fragment to a CapabilityStatement held as decoded
// JSON: it appends to instantiates, to rest[0].operation, and to the
// operations of rest[0].resource entries (creating entries as needed).
func (c Capability) MergeInto(cs map[string]any) {
	cs["instantiates"] = appendAny(cs["instantiates"], c.Instantiates)
	rests, _ := cs["rest"].([]any)
	if len(rests) == 0 {
		rests = []any{map[string]any{"mode": "server"}}
	}
	rest, _ := rests[0].(map[string]any)
	if rest == nil {
		rest = map[string]any{"mode": "server"}
	}
	rest["operation"] = appendAny(rest["operation"], c.Operations)
	resources, _ := rest["resource"].([]any)
	for _, cr := range c.Resources {
		var entry map[string]any
		for _, r := range resources {
			if m, ok := r.(map[string]any); ok && m["type"] == cr.Type {
				entry = m
				break
			}
		}
		if entry == nil {
			entry = map[string]any{"type": cr.Type}
			resources = append(resources, entry)
		}
		entry["operation"] = appendAny(entry["operation"], cr.Operation)
	}
	rest["resource"] = resources
	rests[0] = rest
	cs["rest"] = rests
}

// appendAny appends the JSON form of items to a decoded JSON array.
func appendAny[T any](existing any, items []T) []any {
	arr, _ := existing.([]any)
	for _, it := range items {
		var v any
		b, _ := json.Marshal(it)
		_ = json.Unmarshal(b, &v)
		arr = append(arr, v)
	}
	return arr
}
