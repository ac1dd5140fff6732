package bulkexporttest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// loadFake is the newSource of the in-memory Source: the Group resources
// bring their membership.
func loadFake(t *testing.T, data Dataset) bulkexport.Source {
	src := NewSource()
	for _, r := range data.Resources {
		require.NoError(t, src.Add(r))
	}
	return src
}

func TestSourceTestPassesTheFake(t *testing.T) {
	t.Parallel()
	SourceTest(t, loadFake)
}

// querySource is the fake with a bug: it changes each query before
// answering it.
type querySource struct {
	*Source
	rewrite func(q *bulkexport.Query)
}

func (s querySource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	qc := *q
	s.rewrite(&qc)
	return s.Source.Export(ctx, &qc, typ, w)
}

// swallowWriter drops the errors of Write.
type swallowWriter struct{ bulkexport.ResourceWriter }

func (w swallowWriter) Write(b []byte) error {
	_ = w.ResourceWriter.Write(b)
	return nil
}

// basicWriter adds a Basic resource after every resource.
type basicWriter struct{ bulkexport.ResourceWriter }

func (w basicWriter) Write(b []byte) error {
	if err := w.ResourceWriter.Write(b); err != nil {
		return err
	}
	return w.ResourceWriter.Write([]byte(`{"resourceType":"Basic","id":"stray"}`))
}

// wrappedSource is the fake with a bug in how it treats its context or
// writer.
type wrappedSource struct {
	*Source
	wrap func(ctx context.Context, w bulkexport.ResourceWriter) (context.Context, bulkexport.ResourceWriter)
}

func (s wrappedSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	ctx, w = s.wrap(ctx, w)
	return s.Source.Export(ctx, q, typ, w)
}

// runChecks runs every check against src and returns the names of those
// that failed, with their errors.
func runChecks(t *testing.T, src bulkexport.Source) map[string]error {
	t.Helper()
	env, err := newSourceEnv(src, NewDataset())
	require.NoError(t, err)
	failed := map[string]error{}
	for _, g := range sourceChecks() {
		for _, c := range g.cases {
			ce := *env
			if err := c.run(context.Background(), &ce); err != nil {
				failed[g.name+"/"+c.name] = err
			}
		}
	}
	return failed
}

// TestSourceTestCatchesBrokenSources runs the checks against sources with
// one bug each: exactly the checks about that bug fail.
func TestSourceTestCatchesBrokenSources(t *testing.T) {
	t.Parallel()
	fake := func() *Source { return loadFake(t, NewDataset()).(*Source) }
	tests := []struct {
		name       string
		src        bulkexport.Source
		wantFailed []string
		mention    string // in the first failure's message
	}{
		{
			name:       "ignores _since",
			src:        querySource{fake(), func(q *bulkexport.Query) { q.Since = time.Time{} }},
			wantFailed: []string{"Time/ExclusiveBounds", "Time/Since", "Time/SinceAndUntil", "Time/TransactionTime", "Worker/Exports"},
			mention:    "_since=",
		},
		{
			name:       "inclusive _since",
			src:        querySource{fake(), func(q *bulkexport.Query) { q.Since = q.Since.Add(-time.Nanosecond) }},
			wantFailed: []string{"Time/ExclusiveBounds"},
			mention:    "exclusive",
		},
		{
			name:       "ignores _until",
			src:        querySource{fake(), func(q *bulkexport.Query) { q.Until = time.Time{} }},
			wantFailed: []string{"Time/ExclusiveBounds", "Time/SinceAndUntil", "Time/Until"},
			mention:    "_until=",
		},
		{
			name:       "ignores the transaction time",
			src:        querySource{fake(), func(q *bulkexport.Query) { q.TransactionTime = time.Time{} }},
			wantFailed: []string{"Time/TransactionTime"},
			mention:    "transaction time",
		},
		{
			name:       "ignores the patient parameter",
			src:        querySource{fake(), func(q *bulkexport.Query) { q.Patients = nil }},
			wantFailed: []string{"Patients/GroupMembersOnly", "Patients/PatientLevel", "Worker/Exports"},
			mention:    "patient=",
		},
		{
			name: "ignores Group membership",
			src: querySource{fake(), func(q *bulkexport.Query) {
				if q.Level == fhirbulk.LevelGroup {
					q.Level, q.GroupID = fhirbulk.LevelPatient, ""
				}
			}},
			wantFailed: []string{"Level/Group", "Patients/GroupMembersOnly", "Time/Since", "Worker/Exports"},
			mention:    "Group/grp-odd",
		},
		{
			name: "leaves the Patient compartment",
			src: querySource{fake(), func(q *bulkexport.Query) {
				if q.Level == fhirbulk.LevelPatient {
					q.Level = fhirbulk.LevelSystem
				}
			}},
			wantFailed: []string{"Level/Patient", "Time/SinceAndUntil", "Time/Until"},
			mention:    "obs-qc-1",
		},
		{
			name:       "restarts instead of resuming",
			src:        querySource{fake(), func(q *bulkexport.Query) { q.Cursor = "" }},
			wantFailed: []string{"Resume/FromCheckpoints"},
			mention:    "already written before the cursor",
		},
		{
			name: "swallows Write errors",
			src: wrappedSource{fake(), func(ctx context.Context, w bulkexport.ResourceWriter) (context.Context, bulkexport.ResourceWriter) {
				return ctx, swallowWriter{w}
			}},
			wantFailed: []string{"Errors/WriteFails"},
			mention:    "returned nil after Write failed",
		},
		{
			name: "writes other types",
			src: wrappedSource{fake(), func(ctx context.Context, w bulkexport.ResourceWriter) (context.Context, bulkexport.ResourceWriter) {
				return ctx, basicWriter{w}
			}},
			wantFailed: []string{"Level/Group", "Level/Patient", "Level/System", "Patients/GroupMembersOnly", "Patients/PatientLevel",
				"Resume/FromCheckpoints", "Time/ExclusiveBounds", "Time/Since", "Time/SinceAndUntil", "Time/TransactionTime", "Time/Until", "Worker/Exports"},
			mention: "wrote a Basic",
		},
		{
			name: "ignores its context",
			src: wrappedSource{fake(), func(ctx context.Context, w bulkexport.ResourceWriter) (context.Context, bulkexport.ResourceWriter) {
				return context.Background(), w
			}},
			wantFailed: []string{"Cancel/BeforeStart"},
			mention:    "does not look at ctx",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			failed := runChecks(t, tc.src)
			var names []string
			for name := range failed {
				names = append(names, name)
			}
			slices.Sort(names)
			require.Equal(t, tc.wantFailed, names, "%v", failed)
			require.Contains(t, failed[tc.wantFailed[len(tc.wantFailed)-1]].Error()+failed[tc.wantFailed[0]].Error(), tc.mention)
		})
	}
}

// TestSourceTestFailsTheTest runs SourceTest, as a host would, against a
// Source that ignores _since, in a child process (a *testing.T cannot be
// made otherwise), and checks that it fails the test, naming the subtests.
func TestSourceTestFailsTheTest(t *testing.T) {
	if os.Getenv("BULKEXPORTTEST_CHILD") == "ignores-since" {
		SourceTest(t, func(t *testing.T, data Dataset) bulkexport.Source {
			return querySource{loadFake(t, data).(*Source), func(q *bulkexport.Query) { q.Since = time.Time{} }}
		})
		return
	}
	t.Parallel()
	cmd := exec.Command(os.Args[0], "-test.run=^TestSourceTestFailsTheTest$", "-test.v")
	cmd.Env = append(os.Environ(), "BULKEXPORTTEST_CHILD=ignores-since")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	require.Error(t, err, "SourceTest passed a Source that ignores _since:\n%s", out.String())
	for _, want := range []string{
		"--- FAIL: TestSourceTestFailsTheTest/Time/Since ",
		"--- PASS: TestSourceTestFailsTheTest/Level/System ",
		"--- PASS: TestSourceTestFailsTheTest/Time/Until ",
		"_since=2024-03-01T10:30:00.000Z",
	} {
		require.True(t, strings.Contains(out.String(), want), "no %q in:\n%s", want, out.String())
	}
}
