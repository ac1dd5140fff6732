package fhirbulk_test

import (
	"encoding/json"
	"fmt"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// A client decodes a completion manifest and an error answer with the wire
// types alone.
func Example() {
	var m fhirbulk.Manifest
	_ = json.Unmarshal([]byte(`{"transactionTime":"2026-01-02T03:04:05.000Z","request":"https://ehr.example/fhir/$export",
		"requiresAccessToken":true,"output":[{"type":"Patient","url":"https://ehr.example/files/1","count":3}],"error":[]}`), &m)
	fmt.Println(m.Output[0].Type, *m.Output[0].Count, m.RequiresAccessToken)

	var oo fhirbulk.OperationOutcome
	_ = json.Unmarshal([]byte(`{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"throttled"}]}`), &oo)
	fmt.Println(oo.Issue[0].Code, oo.Issue[0].Code.Transient())
	// Output:
	// Patient 3 true
	// throttled true
}
