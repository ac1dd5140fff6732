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
// other methods (ResourceTypes, Count, CheckGroup, CheckTypeFilter) are the
// dataset's.
type pacedSource struct {
	*dataset.Dataset
	pace time.Duration
}

// Export implements bulkexport.Source.
func (s pacedSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	return s.Dataset.Export(ctx, q, typ, &pacedWriter{ResourceWriter: w, ctx: ctx, pace: s.pace})
}

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
