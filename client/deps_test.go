package client_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies: the client (and the command built on it) speaks the
// protocol through package fhirbulk and never pulls in the server package
// or OpenTelemetry.
func TestDependencies(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command on PATH")
	}
	out, err := exec.Command(goTool, "list", "-deps", ".", "../cmd/bulkexport").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		if p == "github.com/bulkfhir/bulkexport" || strings.HasPrefix(p, "go.opentelemetry.io/") {
			t.Errorf("the client depends on %s", p)
		}
	}
}
