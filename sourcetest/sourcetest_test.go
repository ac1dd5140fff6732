package sourcetest

import (
	"bytes"
	"context"
	"errors"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// loadFake is the newSource of the in-memory Source: the Group resources
// bring their membership.
func loadFake(t *testing.T, data Dataset) bulkexport.Source {
	src := bulkexporttest.NewSource()
	for _, r := range data.Resources {
		require.NoError(t, src.Add(r))
	}
	return src
}

func TestRunPassesTheFake(t *testing.T) {
	t.Parallel()
	Run(t, loadFake)
}

// TestRunPassesThePartitionedFake runs the checks against the fake split
// into parts, so that the Partitioner checks and the partitioned Worker
// run.
func TestRunPassesThePartitionedFake(t *testing.T) {
	t.Parallel()
	Run(t, func(t *testing.T, data Dataset) bulkexport.Source {
		return bulkexporttest.PartitionedSource{Source: loadFake(t, data).(*bulkexporttest.Source), Parts: 3}
	})
}

// overlapSource is the partitioned fake with a bug: its last part repeats
// the first.
type overlapSource struct {
	bulkexporttest.PartitionedSource
}

func (s overlapSource) Partitions(ctx context.Context, q *bulkexport.Query, typ string, max int) ([]string, error) {
	tokens, err := s.PartitionedSource.Partitions(ctx, q, typ, max-1)
	if err != nil || len(tokens) == 0 {
		return tokens, err
	}
	return append(tokens, tokens[0]), nil
}

// gapSource is the partitioned fake with a bug: it leaves out its last
// part.
type gapSource struct {
	bulkexporttest.PartitionedSource
}

func (s gapSource) Partitions(ctx context.Context, q *bulkexport.Query, typ string, max int) ([]string, error) {
	tokens, err := s.PartitionedSource.Partitions(ctx, q, typ, max)
	if err != nil || len(tokens) < 2 {
		return tokens, err
	}
	return tokens[:len(tokens)-1], nil
}

// tooManySource is the partitioned fake with a bug: it returns more parts
// than asked for.
type tooManySource struct {
	bulkexporttest.PartitionedSource
}

func (s tooManySource) Partitions(ctx context.Context, q *bulkexport.Query, typ string, max int) ([]string, error) {
	return bulkexporttest.PartitionedSource{Source: s.Source, Parts: max + 1}.Partitions(ctx, q, typ, max+1)
}

// querySource is the fake with a bug: it changes each query before
// answering it.
type querySource struct {
	*bulkexporttest.Source
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
	*bulkexporttest.Source
	wrap func(ctx context.Context, w bulkexport.ResourceWriter) (context.Context, bulkexport.ResourceWriter)
}

func (s wrappedSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	ctx, w = s.wrap(ctx, w)
	return s.Source.Export(ctx, q, typ, w)
}

// blockSource is the fake with a bug in ExportBlocks.
type blockSource struct {
	*bulkexporttest.Source
	wrap func(ctx context.Context, q *bulkexport.Query, w bulkexport.BlockWriter) (context.Context, *bulkexport.Query, bulkexport.BlockWriter)
}

func (s blockSource) ExportBlocks(ctx context.Context, q *bulkexport.Query, by string, types []string, w bulkexport.BlockWriter) error {
	qc := *q
	ctx, qp, w := s.wrap(ctx, &qc, w)
	return s.Source.ExportBlocks(ctx, qp, by, types, w)
}

// oneBlockWriter passes on only the first StartBlock: every resource ends
// up in the first block.
type oneBlockWriter struct {
	bulkexport.BlockWriter
	started bool
}

func (w *oneBlockWriter) StartBlock(ref string) error {
	if w.started {
		return nil
	}
	w.started = true
	return w.BlockWriter.StartBlock(ref)
}

// lateCheckpointWriter holds each Checkpoint back until the first resource
// of the next block is written: the cursor falls inside a block.
type lateCheckpointWriter struct {
	bulkexport.BlockWriter
	pending string
}

func (w *lateCheckpointWriter) Checkpoint(cursor string) error {
	w.pending = cursor
	return nil
}

func (w *lateCheckpointWriter) Write(b []byte) error {
	if err := w.BlockWriter.Write(b); err != nil {
		return err
	}
	if c := w.pending; c != "" {
		w.pending = ""
		return w.BlockWriter.Checkpoint(c)
	}
	return nil
}

// swallowBlockWriter drops the errors of Write.
type swallowBlockWriter struct{ bulkexport.BlockWriter }

func (w swallowBlockWriter) Write(b []byte) error {
	_ = w.BlockWriter.Write(b)
	return nil
}

// filterSource is the fake with a CheckTypeFilter of its own.
type filterSource struct {
	*bulkexporttest.Source
	check func(typ string, q url.Values) error
}

func (s filterSource) CheckTypeFilter(typ string, q url.Values) error { return s.check(typ, q) }

// plainSource has the fake's Source methods and no optional interface.
type plainSource struct{ src *bulkexporttest.Source }

func (s plainSource) ResourceTypes(ctx context.Context, level fhirbulk.Level) ([]string, error) {
	return s.src.ResourceTypes(ctx, level)
}

func (s plainSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	return s.src.Export(ctx, q, typ, w)
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
			var skip skipError
			if err := c.run(context.Background(), &ce); err != nil && !errors.As(err, &skip) {
				failed[g.name+"/"+c.name] = err
			}
		}
	}
	return failed
}

// TestRunCatchesBrokenSources runs the checks against sources with
// one bug each: exactly the checks about that bug fail.
func TestRunCatchesBrokenSources(t *testing.T) {
	t.Parallel()
	fake := func() *bulkexporttest.Source { return loadFake(t, NewDataset()).(*bulkexporttest.Source) }
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
			wantFailed: []string{"Level/Group", "Level/Patient", "Level/System", "Optional/TypeFilterChecker", "Patients/GroupMembersOnly", "Patients/PatientLevel",
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
	blocks := func(wrap func(ctx context.Context, q *bulkexport.Query, w bulkexport.BlockWriter) (context.Context, *bulkexport.Query, bulkexport.BlockWriter)) bulkexport.Source {
		return blockSource{fake(), wrap}
	}
	tests = append(tests, []struct {
		name       string
		src        bulkexport.Source
		wantFailed []string
		mention    string
	}{
		{
			name: "puts every resource in one block",
			src: blocks(func(ctx context.Context, q *bulkexport.Query, w bulkexport.BlockWriter) (context.Context, *bulkexport.Query, bulkexport.BlockWriter) {
				return ctx, q, &oneBlockWriter{BlockWriter: w}
			}),
			wantFailed: []string{"Organizer/Blocks", "Organizer/Resume", "Organizer/Worker"},
			mention:    "it belongs to Patient/",
		},
		{
			name: "restarts blocks instead of resuming",
			src: blocks(func(ctx context.Context, q *bulkexport.Query, w bulkexport.BlockWriter) (context.Context, *bulkexport.Query, bulkexport.BlockWriter) {
				q.Cursor = ""
				return ctx, q, w
			}),
			wantFailed: []string{"Organizer/Resume"},
			mention:    "already written before the cursor",
		},
		{
			name: "checkpoints inside a block",
			src: blocks(func(ctx context.Context, q *bulkexport.Query, w bulkexport.BlockWriter) (context.Context, *bulkexport.Query, bulkexport.BlockWriter) {
				return ctx, q, &lateCheckpointWriter{BlockWriter: w}
			}),
			wantFailed: []string{"Organizer/Blocks", "Organizer/Resume"},
			mention:    "a Checkpoint must fall between blocks",
		},
		{
			name: "swallows block Write errors",
			src: blocks(func(ctx context.Context, q *bulkexport.Query, w bulkexport.BlockWriter) (context.Context, *bulkexport.Query, bulkexport.BlockWriter) {
				return ctx, q, swallowBlockWriter{w}
			}),
			wantFailed: []string{"Organizer/Cancel", "Organizer/WriteFails"},
			mention:    "returned nil after Write failed",
		},
		{
			name: "organizes ignoring its context",
			src: blocks(func(ctx context.Context, q *bulkexport.Query, w bulkexport.BlockWriter) (context.Context, *bulkexport.Query, bulkexport.BlockWriter) {
				return context.Background(), q, w
			}),
			wantFailed: []string{"Organizer/Cancel"},
			mention:    "does not look at ctx",
		},
		{
			name:       "overlapping parts",
			src:        overlapSource{bulkexporttest.PartitionedSource{Source: fake(), Parts: 3}},
			wantFailed: []string{"Partitioner/Parts", "Worker/Exports"},
			mention:    "written more than once",
		},
		{
			name:       "parts that leave resources out",
			src:        gapSource{bulkexporttest.PartitionedSource{Source: fake(), Parts: 3}},
			wantFailed: []string{"Partitioner/Parts", "Worker/Exports"},
			mention:    "missing",
		},
		{
			name:       "more parts than max",
			src:        tooManySource{bulkexporttest.PartitionedSource{Source: fake(), Parts: 3}},
			wantFailed: []string{"Partitioner/Parts", "Partitioner/Resume", "Worker/Exports"},
			mention:    "returned 3 tokens",
		},
		{
			name:       "accepts every _typeFilter",
			src:        filterSource{fake(), func(string, url.Values) error { return nil }},
			wantFailed: []string{"Optional/TypeFilterChecker"},
			mention:    "no Source can run",
		},
		{
			name:       "ignores _typeFilter",
			src:        querySource{fake(), func(q *bulkexport.Query) { q.TypeFilters = nil }},
			wantFailed: []string{"Optional/TypeFilterChecker"},
			mention:    "not matching the filter",
		},
	}...)
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

// TestRunSkipsWhatTheSourceLacks runs the checks against a Source with no
// optional interface: their checks skip, saying what the host loses.
func TestRunSkipsWhatTheSourceLacks(t *testing.T) {
	t.Parallel()
	src := plainSource{loadFake(t, NewDataset()).(*bulkexporttest.Source)}
	env, err := newSourceEnv(src, NewDataset())
	require.NoError(t, err)
	skipped := map[string]string{}
	for _, g := range sourceChecks() {
		for _, c := range g.cases {
			ce := *env
			err := c.run(context.Background(), &ce)
			var skip skipError
			if errors.As(err, &skip) {
				skipped[g.name+"/"+c.name] = skip.why
				continue
			}
			require.NoError(t, err, "%s/%s", g.name, c.name)
		}
	}
	for name, loses := range map[string]string{
		"Optional/GroupChecker":      "instead of 404",
		"Optional/Counter":           "without a percentage",
		"Optional/TypeFilterChecker": "exports too much",
		"Organizer/OrganizeTypes":    "organizeOutputBy gets 400",
		"Organizer/Blocks":           "organizeOutputBy gets 400",
		"Organizer/Resume":           "organizeOutputBy gets 400",
		"Organizer/WriteFails":       "organizeOutputBy gets 400",
		"Organizer/Cancel":           "organizeOutputBy gets 400",
		"Organizer/Worker":           "organizeOutputBy gets 400",
		"Partitioner/Parts":          "one Export call",
		"Partitioner/Resume":         "one Export call",
	} {
		require.Contains(t, skipped, name)
		require.Contains(t, skipped[name], loses, name)
	}
	require.Len(t, skipped, 11, "%v", skipped)
}

// TestRunFailsTheTest runs Run, as a host would, against a
// Source that ignores _since, in a child process (a *testing.T cannot be
// made otherwise), and checks that it fails the test, naming the subtests.
func TestRunFailsTheTest(t *testing.T) {
	if os.Getenv("SOURCETEST_CHILD") == "ignores-since" {
		Run(t, func(t *testing.T, data Dataset) bulkexport.Source {
			return querySource{loadFake(t, data).(*bulkexporttest.Source), func(q *bulkexport.Query) { q.Since = time.Time{} }}
		})
		return
	}
	t.Parallel()
	cmd := exec.Command(os.Args[0], "-test.run=^TestRunFailsTheTest$", "-test.v")
	cmd.Env = append(os.Environ(), "SOURCETEST_CHILD=ignores-since")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	require.Error(t, err, "Run passed a Source that ignores _since:\n%s", out.String())
	for _, want := range []string{
		"--- FAIL: TestRunFailsTheTest/Time/Since ",
		"--- PASS: TestRunFailsTheTest/Level/System ",
		"--- PASS: TestRunFailsTheTest/Time/Until ",
		"_since=2024-03-01T10:30:00.000Z",
	} {
		require.True(t, strings.Contains(out.String(), want), "no %q in:\n%s", want, out.String())
	}
}
