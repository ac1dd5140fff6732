package bulkexporttest

import (
	"bytes"
	"encoding/json"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Recorder is a bulkexport.ResourceWriter that keeps everything a Source
// gives it, for tests that call Source.Export directly, without a Worker.
// It is also a bulkexport.BlockWriter, for tests of an Organizer's
// ExportBlocks:
//
//	var rec bulkexporttest.Recorder
//	err := src.Export(ctx, &bulkexport.Query{Level: fhirbulk.LevelSystem}, "Patient", &rec)
//	// rec.IDs() are the Patients written, rec.Checkpoints the cursors
//
// Unlike the Worker's writer it checks nothing: it records what it is
// given as given. Its zero value is ready to use. Like every
// ResourceWriter it is not safe for concurrent use.
type Recorder struct {
	// Resources holds the resources written, in order (copies).
	Resources []json.RawMessage
	// Deletions, Issues and Checkpoints hold the other calls, in order.
	Deletions   []Deletion
	Issues      []fhirbulk.Issue
	Checkpoints []Checkpoint
	// Blocks holds the StartBlock calls, in order.
	Blocks []Block

	// OnWrite, if set, is called at the start of every Write with the
	// number of Write calls before it. An error is returned by Write and
	// the resource is not kept: a storage failure, or a cancelled job.
	OnWrite func(n int) error

	writes int
}

// Deletion is a call of ResourceWriter.Deleted.
type Deletion struct {
	ID string
	At time.Time
}

// Checkpoint is a call of ResourceWriter.Checkpoint.
type Checkpoint struct {
	Cursor string
	// Written is how many resources had been kept when it was called.
	Written int
}

// Block is a call of BlockWriter.StartBlock.
type Block struct {
	Ref string
	// Start is how many resources had been kept when it was called: the
	// block holds Resources[Start:] up to the next block's Start.
	Start int
}

var _ bulkexport.BlockWriter = (*Recorder)(nil)

// Write implements bulkexport.ResourceWriter.
func (r *Recorder) Write(resource []byte) error {
	n := r.writes
	r.writes++
	if r.OnWrite != nil {
		if err := r.OnWrite(n); err != nil {
			return err
		}
	}
	r.Resources = append(r.Resources, bytes.Clone(resource))
	return nil
}

// Deleted implements bulkexport.ResourceWriter.
func (r *Recorder) Deleted(id string, at time.Time) error {
	r.Deletions = append(r.Deletions, Deletion{ID: id, At: at})
	return nil
}

// Issue implements bulkexport.ResourceWriter.
func (r *Recorder) Issue(issue fhirbulk.Issue) error {
	r.Issues = append(r.Issues, issue)
	return nil
}

// Checkpoint implements bulkexport.ResourceWriter.
func (r *Recorder) Checkpoint(cursor string) error {
	r.Checkpoints = append(r.Checkpoints, Checkpoint{Cursor: cursor, Written: len(r.Resources)})
	return nil
}

// StartBlock implements bulkexport.BlockWriter.
func (r *Recorder) StartBlock(ref string) error {
	r.Blocks = append(r.Blocks, Block{Ref: ref, Start: len(r.Resources)})
	return nil
}

// Writes returns how many times Write was called, failed calls included.
func (r *Recorder) Writes() int { return r.writes }

// IDs returns the ids of the resources written, in order ("" for a
// resource without one, or one that is not a JSON object).
func (r *Recorder) IDs() []string {
	ids := make([]string, len(r.Resources))
	for i, raw := range r.Resources {
		var v struct {
			ID string `json:"id"`
		}
		_ = json.Unmarshal(raw, &v)
		ids[i] = v.ID
	}
	return ids
}
