package bulkexport

import (
	"context"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"time"
)

// Source is what a host implements: where its resources live. The Worker
// calls Export once per resource type of a job (several types at once, on
// separate goroutines), and the handler calls ResourceTypes to validate
// _type at kick-off.
//
// A Source may also implement optional interfaces (GroupChecker,
// TypeFilterChecker, AssociatedDataLister, Counter, Organizer): the
// package documentation lists them under "Optional Source interfaces",
// with what each one gives the host.
type Source interface {
	// ResourceTypes lists the types exported at a level, in export order.
	ResourceTypes(ctx context.Context, level fhirbulk.Level) ([]string, error)

	// Export streams every resource of type typ that q selects into w, and
	// returns when done. It must honour ctx: when ctx is done it returns
	// promptly (its error is then ignored). An error fails the job; an
	// *Error keeps its status and message in the job's OperationOutcome,
	// any other error is reported as a generic processing failure (and
	// logged).
	//
	// To make long exports resumable, Export calls w.Checkpoint with a
	// cursor after which it could continue; a job resumed after a crash
	// calls Export again with q.Cursor set to the last recorded cursor.
	Export(ctx context.Context, q *Query, typ string, w ResourceWriter) error
}

// Query is what one Source.Export call selects.
type Query struct {
	// JobID and Owner identify the job and the client that started it (for
	// sources that apply per-client authorization).
	JobID string
	Owner string
	// Level and GroupID: for LevelGroup the Source resolves membership.
	Level   fhirbulk.Level
	GroupID string
	// Patients restricts Patient/Group exports to these patient ids (the
	// patient parameter); empty means no restriction.
	Patients []string
	// Since and Until bound meta.lastUpdated (exclusive); zero when unset.
	Since time.Time
	Until time.Time
	// TypeFilters are the _typeFilter searches for this type, OR'd. Empty
	// means no filter.
	TypeFilters []TypeFilter
	// Elements are the top-level elements _elements keeps for this type;
	// nil means all. A Source keeps those plus resourceType, id, meta and
	// the elements FHIR makes mandatory for the type, and marks each
	// resource it cut with the SUBSETTED tag in meta.tag (system
	// http://terminology.hl7.org/CodeSystem/v3-ObservationValue), as the
	// example dataset and the bulkexporttest fake do.
	Elements []string
	// IncludeAssociatedData holds the requested codes the handler accepted.
	IncludeAssociatedData []string
	// TransactionTime: resources changed after it are left out.
	TransactionTime time.Time
	// Cursor is the last cursor passed to ResourceWriter.Checkpoint for
	// this type, when the job resumes; "" starts from the beginning.
	Cursor string
	// Partition is one of the tokens Partitioner.Partitions returned for
	// this type: Export writes only that part's resources (and Counter
	// counts only those). "" means the whole type.
	Partition string
}

// ResourceWriter receives what a Source exports for one type. It is not
// safe for concurrent use: one Export call owns its writer.
type ResourceWriter interface {
	// Write adds one resource: a JSON object whose resourceType is the
	// type being exported. Multi-line JSON is compacted. A resource that is
	// not a JSON object of that type is rejected: it is left out and
	// reported in the manifest's error[], and Write returns nil. Write
	// returns an error only when the export must stop (cancelled, storage
	// failure); Export should then return.
	Write(resource []byte) error

	// Deleted records that the resource typ/id was deleted (at the given
	// time) within the _since window. It is listed in the manifest's
	// deleted[] as a transaction Bundle entry with request DELETE.
	Deleted(id string, at time.Time) error

	// Issue records a problem with one resource, such as a resource that
	// was withheld by policy, as an OperationOutcome in error[]. It does not
	// fail the job.
	Issue(issue fhirbulk.Issue) error

	// Checkpoint declares that every resource up to cursor has been
	// written: if the job is interrupted, Export is called again with
	// Query.Cursor = cursor and must continue after it. The writer makes
	// what was written durable at this point (syncing or committing the
	// open files, see SyncedOpener). It is cheap to call often;
	// the writer records checkpoints at most every
	// WorkerOptions.CheckpointInterval.
	Checkpoint(cursor string) error
}

// Partitioner is an optional interface of a Source that can split the
// export of one type into parts that any worker of any replica exports
// independently and at once. The Worker uses it when its JobStore is a
// UnitStore (MemoryStore, sqlitestore and pgstore are) and
// WorkerOptions.Partitions is more than 1, for every job without
// organizeOutputBy: it asks for the parts of each type when the job
// starts, stores them as units (see Unit), and calls Export once per part
// with Query.Partition set to its token. Each part checkpoints and resumes
// on its own, with its own Query.Cursor.
type Partitioner interface {
	// Partitions returns at most max tokens (ranges of a key, patient id
	// ranges, time slices: the Source decides) whose parts together select
	// exactly what Export selects for typ and q without a partition, each
	// resource in exactly one part, whenever Export runs. A type that is
	// small or cannot be split returns one token, or none (the whole type
	// is then one part). The manifest lists the files of a type part by
	// part, in the order of the tokens (a partial manifest, under
	// allowPartialManifests, lists each part's files once the part is
	// done, in the order the parts end). Tokens are stored with the job:
	// keep them short (at most a few hundred bytes).
	Partitions(ctx context.Context, q *Query, typ string, max int) ([]string, error)
}

// Counter is an optional interface of a Source: it estimates how many
// resources Export will write, so that progress can be reported as a
// percentage. An estimate is fine; an error leaves the type without one.
// The Worker calls Count at the same time as Export for the same type and
// query (so that counting never delays the export), and cancels its
// context when Export returns first.
type Counter interface {
	Count(ctx context.Context, q *Query, typ string) (int64, error)
}

// Organizer is an optional interface of a Source that can arrange output in
// resource blocks, for the organizeOutputBy kick-off parameter (Bulk Data
// STU3). The handler accepts organizeOutputBy only for the types
// OrganizeTypes lists; the Worker then calls ExportBlocks once for the
// job, instead of Export per type.
type Organizer interface {
	// OrganizeTypes lists the types output can be organized by at a level
	// (typically "Patient"); none means organizeOutputBy gets 400 there.
	OrganizeTypes(ctx context.Context, level fhirbulk.Level) ([]string, error)

	// ExportBlocks streams the resources of the given types that q selects,
	// in blocks, one per instance of the organizing type by:
	//
	//   - A block starts with w.StartBlock(ref), ref being the instance's
	//     reference ("Patient/123"), and holds the resources written until
	//     the next StartBlock. Nothing is written before the first one.
	//   - An instance gets at most one block, and only an instance that q
	//     selects (a member of the Group, one of q.Patients) gets one. An
	//     instance with nothing to write may have no block.
	//   - Each resource that q selects and that belongs to an instance (for
	//     by "Patient", the Patient compartment) is written exactly once, in
	//     that instance's block. Resources that belong to no instance (a
	//     Practitioner, an Observation without a subject) are left out.
	//   - The instance itself, when it is among types and q selects it
	//     (under _since it may not be), is the first resource of its block.
	//
	// types always includes by. Other rules are those of Source.Export:
	// q's filters apply as there, the engine writes each block's header,
	// a failing Write stops the export (ExportBlocks returns an error), and
	// ctx is honoured. Checkpoints work as in Source.Export, with the cursor
	// between blocks: a Checkpoint is called only after a block's last
	// resource, and a resumed ExportBlocks starts with the next block.
	// The sourcetest package checks these rules.
	ExportBlocks(ctx context.Context, q *Query, by string, types []string, w BlockWriter) error
}

// BlockWriter receives resource blocks from an Organizer.
type BlockWriter interface {
	ResourceWriter
	// StartBlock ends the current block, if any, and starts the block of
	// the instance ref ("Type/id"). The engine writes the block's header:
	// a Parameters resource whose "header" parameter references ref.
	StartBlock(ref string) error
}
