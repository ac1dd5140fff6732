package dataset

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// blockWriter is a memWriter that records block starts as lines
// "block:<ref>".
type blockWriter struct{ memWriter }

func (w *blockWriter) StartBlock(ref string) error { return w.Write([]byte("block:" + ref)) }

// TestExportBlocksResume: an organized export interrupted after some
// checkpoints and resumed from the last cursor writes every block once, in
// patient order, each holding the patient's resources of the asked types.
func TestExportBlocksResume(t *testing.T) {
	t.Parallel()
	d := New(40)
	types := []string{"Condition", "Patient"}
	q := &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "odd"}

	full := &blockWriter{}
	require.NoError(t, d.ExportBlocks(context.Background(), q, "Patient", types, full))
	full.finish()

	part := &blockWriter{memWriter: memWriter{crashAfter: 7, crashWrites: 2}}
	err := d.ExportBlocks(context.Background(), q, "Patient", types, part)
	require.ErrorIs(t, err, errCrash)
	resumed := *q
	resumed.Cursor = part.cursors[len(part.cursors)-1]
	rest := &blockWriter{}
	require.NoError(t, d.ExportBlocks(context.Background(), &resumed, "Patient", types, rest))
	rest.finish()
	require.Equal(t, full.lines, append(part.lines, rest.lines...))

	// Every odd patient has a block: the block line, the Patient, then its
	// Conditions.
	blocks, conditions := 0, 0
	for _, l := range full.lines {
		switch s := string(l); {
		case len(s) > 6 && s[:6] == "block:":
			blocks++
		case decode(t, l).ResourceType == "Condition":
			conditions++
		}
	}
	require.Equal(t, 20, blocks)
	want, err := d.Expected(q, "Condition")
	require.NoError(t, err)
	require.Equal(t, len(want), conditions)
}

func TestExportBlocksRejects(t *testing.T) {
	t.Parallel()
	d := New(3)
	err := d.ExportBlocks(context.Background(), &bulkexport.Query{Level: fhirbulk.LevelSystem}, "Encounter", []string{"Encounter"}, &blockWriter{})
	require.Error(t, err)
	err = d.ExportBlocks(context.Background(), &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "nope"}, "Patient", []string{"Patient"}, &blockWriter{})
	require.True(t, errors.Is(err, bulkexport.ErrNotFound), "%v", err)
	types, err := d.OrganizeTypes(context.Background(), fhirbulk.LevelPatient)
	require.NoError(t, err)
	require.Equal(t, []string{"Patient"}, types)
}
