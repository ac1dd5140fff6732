// Package bulkexport gives a Go FHIR server the FHIR Bulk Data async
// export protocol (HL7 Bulk Data Access IG, STU2 baseline with STU3
// features) and the eHealth $export-poll-status operation, over storage
// the host chooses.
//
// # The flow
//
// A client kicks an export off, polls its status, downloads the files, and
// may cancel:
//
//	GET  [base]/$export?_type=Patient,Observation     Prefer: respond-async
//	  → 202 Accepted, Content-Location: [base]/$export-poll-status?_jobId=ID
//	GET  [base]/$export-poll-status?_jobId=ID
//	  → 202 Accepted, X-Progress: 42% complete: Observation, Retry-After: 3
//	  → 200 OK, Expires: …, the manifest (output[], error[], …)
//	GET  [base]/bulkfiles/ID/Observation.000001.c2.ndjson
//	  → 200 OK, application/fhir+ndjson (Range and gzip supported)
//	DELETE [base]/$export-poll-status?_jobId=ID
//	  → 202 Accepted (queued or running job cancelled)
//
// Kick-off works at three levels — [base]/$export (system),
// [base]/Patient/$export and [base]/Group/{id}/$export — by GET with a
// query string or POST with a FHIR Parameters body. The status URL also
// answers as [base]/$export-poll-status/ID, and to POST with a Parameters
// body carrying _jobId.
//
// # Wiring it up
//
// NewServer takes one Config (the JobStore, the Source, the Storage, and
// the Options and WorkerOptions of the two halves), checks all of it at
// once, and wires a Handler and a Worker that agree: the handler accepts
// only what the Source can export, and every kick-off wakes the Worker.
// Register mounts the Server on an http.ServeMux beside the host's own
// FHIR routes (Routes lists the method-qualified patterns for other
// routers); Run runs the exports until its context ends; Serve does both
// with an http.Server and shuts them down in order; Close releases what
// the Server registered.
//
// Wire types the server and the client share (Manifest, OperationOutcome,
// Level, FHIR instants) live in the leaf package fhirbulk.
//
// # The pieces
//
// Each layer is usable without the ones above it:
//
//   - Handler (NewHandler) is the http.Handler for the whole protocol. It
//     validates kick-offs and creates Jobs in a JobStore, answers polls
//     from the store, cancels, and serves files from a Storage. A host that
//     runs exports its own way can use it alone and update the jobs itself.
//   - JobStore keeps Job records: MemoryStore here; SQLite and PostgreSQL
//     stores live in their own modules. Compare-and-set on Job.Version and
//     leases (Claim) let several workers and replicas share one store.
//   - Worker claims queued jobs and runs them: it asks the host's Source
//     for the resources of each type, validates every line, and streams
//     NDJSON files into a Storage, split by count and size. It records
//     checkpoints so that a job interrupted by a crash resumes where it
//     stopped, honours cancels within a second, and purges expired jobs.
//   - Source is the one interface a host implements to export its data.
//   - Storage holds the files: DirStorage (a local directory) here; object
//     storage lives in the blobstorage module.
//
// # Optional Source interfaces
//
// A Source (or the TypeLister in Options.Types, which is the Source unless
// the host sets another) may implement more, detected by type assertion.
// This is the one list of them; package sourcetest checks each one a
// Source implements.
//
//   - GroupChecker: an unknown Group gets 404 at kick-off, instead of a
//     job that fails later.
//   - TypeFilterChecker: a _typeFilter search the host cannot run gets 400
//     at kick-off (or is dropped under lenient handling), instead of
//     reaching Export, which would have to reject or apply it itself.
//   - AssociatedDataLister: the includeAssociatedData codes the Source
//     honours are accepted at kick-off, besides Options.AssociatedData.
//   - Counter: X-Progress shows a percentage, not just a count.
//   - Organizer: the organizeOutputBy parameter (Bulk Data STU3) is
//     accepted for the types it lists, and output comes in resource blocks;
//     without it organizeOutputBy gets 400.
//   - Partitioner: one export uses every worker of every replica (see
//     Partitioned export below).
//
// # Partitioned export
//
// Without a Partitioner, one worker runs a job (WorkerOptions.TypeConcurrency
// types at once). When the Source is a Partitioner and the JobStore a
// UnitStore (MemoryStore, sqlitestore and pgstore are), the worker that
// claims a job asks for the parts of each type (at most
// WorkerOptions.Partitions) and stores them as units; if no type splits,
// the job runs whole as before. Every worker, in every replica sharing
// the store, claims units (WorkerOptions.UnitConcurrency at once), and
// exports each with Query.Partition set, under the unit's own lease,
// fence and checkpoints, so a crash loses at most one unit's work since
// its last checkpoint. The job's claim holder watches the units: it sums
// their progress into X-Progress, lists each unit's files when the unit is
// done, fails the job when one fails, and completes it, after the usual
// check of every file, when all are done. The manifest lists a type's
// files part by part: names are the unit's key ("Observation.p0003"), the
// file's number and the claim's fence. docs/correctness.md gives the
// invariants.
//
// # Jobs
//
// A job moves queued → running → completed | failed, or to cancelled from
// queued or running (JobState.CanTransition is the one definition). Every
// job belongs to the client that created it (Options.Authenticate gives
// the client id); any other client gets 404 for its status URL and files,
// so a job's existence does not leak. Job ids are 128 random bits.
//
// # Errors
//
// Every error answer is an OperationOutcome. One function, the
// ErrorMapper (DefaultErrorMapper unless the host sets its own), maps
// errors to status codes: bad input gets a 4xx naming the parameter at
// fault, an unavailable store gets 503 with a transient issue code.
//
// # Observability
//
// The Handler and the Worker log through the host's *slog.Logger (every
// line about a job names the job, its client and its export level; no
// token or signed URL is ever logged), and report OpenTelemetry metrics
// and spans through the MeterProvider and TracerProvider of Options and
// WorkerOptions: job transitions and durations, exported resources and
// bytes, polls by status code, download bytes, queue depth, reclaims and
// purges; spans per kick-off, job run, resource type, file and download.
// The context a Source's Export receives carries the span of its type.
// Only the OpenTelemetry API is imported; without providers nothing is
// measured. docs/observability.md lists every instrument and span.
//
// # Compatibility
//
// DELETE on a finished job answers 404 by default, as the eHealth operation
// defines; DeleteFinishedRemoves follows the IG instead (202, files
// removed). Prefer: respond-async is required unless
// Options.AllowMissingRespondAsync is set.
package bulkexport
