package exampleserver

import (
	"context"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
)

// pacedSource is the dataset with a pause after every owner (patient,
// practitioner, organization) that Export visits: the dataset checkpoints
// after each, and the pause follows the checkpoint. It makes exports of a
// small dataset last long enough to be interrupted, for crash tests. The
// other methods (ResourceTypes, Count, CheckGroup, CheckTypeFilter,
// OrganizeTypes) are the dataset's.
type pacedSource struct {
	*dataset.Dataset
	pace time.Duration
}

// Export implements bulkexport.Source.
func (s pacedSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	return s.Dataset.Export(ctx, q, typ, &pacedWriter{ResourceWriter: w, ctx: ctx, pace: s.pace})
}

// ExportBlocks implements bulkexport.Organizer, paced as Export is.
func (s pacedSource) ExportBlocks(ctx context.Context, q *bulkexport.Query, by string, types []string, w bulkexport.BlockWriter) error {
	return s.Dataset.ExportBlocks(ctx, q, by, types, pacedBlockWriter{
		pacedWriter: &pacedWriter{ResourceWriter: w, ctx: ctx, pace: s.pace}, blocks: w})
}

// pacedBlockWriter is a pacedWriter that passes block starts on.
type pacedBlockWriter struct {
	*pacedWriter
	blocks bulkexport.BlockWriter
}

func (w pacedBlockWriter) StartBlock(ref string) error { return w.blocks.StartBlock(ref) }

type pacedWriter struct {
	bulkexport.ResourceWriter
	ctx   context.Context
	pace  time.Duration
	timer *time.Timer
}

// Checkpoint records the cursor, then pauses (until ctx is done at most).
func (w *pacedWriter) Checkpoint(cursor string) error {
	if err := w.ResourceWriter.Checkpoint(cursor); err != nil {
		return err
	}
	if w.timer == nil {
		w.timer = time.NewTimer(w.pace)
	} else {
		w.timer.Reset(w.pace)
	}
	select {
	case <-w.timer.C:
		return nil
	case <-w.ctx.Done():
		return context.Cause(w.ctx)
	}
}
