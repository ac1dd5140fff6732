package bulkexport

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"slices"
	"time"
)

// JobState is where a job is in its lifecycle:
//
//	queued → running → completed | failed
//	queued | running → cancelled
//	queued → failed (the host gives up before any worker claims it)
//	running → queued (a worker hands a job back)
//
// Terminal states (completed, failed, cancelled) are never left; the purge
// removes terminal jobs once they expire.
type JobState string

const (
	// StateQueued: the kick-off handler created the job; it waits for a
	// worker's Claim. A worker may also hand a running job back here.
	StateQueued JobState = "queued"
	// StateRunning: a worker claimed the job and holds its lease. A job
	// whose lease ran out stays running until another worker claims it.
	StateRunning JobState = "running"
	// StateCompleted: the worker finished; the manifest is final. Only the
	// purge removes it, once ExpiresAt has passed.
	StateCompleted JobState = "completed"
	// StateFailed: the worker (or the host) gave up; Failure says why.
	StateFailed JobState = "failed"
	// StateCancelled: the client sent DELETE while the job was queued or
	// running. The worker stops and removes partial files; the purge
	// removes the record later. Polls answer 404.
	StateCancelled JobState = "cancelled"
)

// Terminal reports whether s is completed, failed or cancelled.
func (s JobState) Terminal() bool {
	return s == StateCompleted || s == StateFailed || s == StateCancelled
}

// Valid reports whether s is one of the defined states.
func (s JobState) Valid() bool {
	switch s {
	case StateQueued, StateRunning, StateCompleted, StateFailed, StateCancelled:
		return true
	}
	return false
}

// CanTransition reports whether a stored job in state s may be updated to
// state to. Staying in the same state is always allowed (progress,
// checkpoints, lease renewal). This is the one place the lifecycle is
// defined; every JobStore's Update enforces it through CheckTransition.
func (s JobState) CanTransition(to JobState) bool {
	if !s.Valid() || !to.Valid() {
		return false
	}
	if s == to {
		return true
	}
	switch s {
	case StateQueued:
		return to == StateRunning || to == StateCancelled || to == StateFailed
	case StateRunning:
		return to == StateQueued || to == StateCompleted || to == StateFailed || to == StateCancelled
	}
	return false
}

// CheckTransition returns an error wrapping ErrInvalidTransition when from
// may not move to to. JobStore implementations call it in Update.
func CheckTransition(from, to JobState) error {
	if from.CanTransition(to) {
		return nil
	}
	return fmt.Errorf("%w: %s → %s", ErrInvalidTransition, from, to)
}

// Job is one export, as a JobStore keeps it. Stores copy jobs in and out;
// a *Job returned by a store belongs to the caller.
//
// The json tags below (and those of the types Job holds) are an on-disk
// format: stores that serialise jobs (sqlitestore, pgstore) keep the
// stored form that MarshalStoredJob writes, which adds the format version
// JobFormatVersion, and read it back with UnmarshalStoredJob. A tag must
// not change meaning within a format version; storetest pins format 1 to
// a golden document.
type Job struct {
	// ID is unguessable (128 random bits, hex); see NewJobID.
	ID string `json:"id"`
	// Owner is the client id that kicked the export off. Every poll,
	// cancel and download is checked against it.
	Owner string `json:"owner"`
	// Level and GroupID say what was exported ([base]/Group/{GroupID}/$export).
	Level   fhirbulk.Level `json:"level"`
	GroupID string         `json:"groupId,omitempty"`
	// Request is the parsed, validated kick-off request.
	Request Request `json:"request"`

	State    JobState `json:"state"`
	Progress Progress `json:"progress"`

	// TransactionTime is set by the worker when the job starts: resources
	// changed up to and including it are exported.
	TransactionTime time.Time `json:"transactionTime,omitzero"`

	// Output, Deleted and Errors are the manifest's output[], deleted[] and
	// error[] files. Only finalized files are ever listed.
	Output  []File `json:"output,omitempty"`
	Deleted []File `json:"deleted,omitempty"`
	Errors  []File `json:"errors,omitempty"`
	// Extension is copied into the manifest's "extension" when set; it must
	// be a JSON object.
	Extension json.RawMessage `json:"extension,omitempty"`

	// Failure is set when State is StateFailed.
	Failure *Failure `json:"failure,omitempty"`

	CreatedAt   time.Time `json:"createdAt"`
	UpdatedAt   time.Time `json:"updatedAt"`
	StartedAt   time.Time `json:"startedAt,omitzero"`
	CompletedAt time.Time `json:"completedAt,omitzero"`
	// ExpiresAt is when a terminal job and its files are purged. Zero
	// while the job is active.
	ExpiresAt time.Time `json:"expiresAt,omitzero"`

	// Version is the optimistic-concurrency token. Create stores 1; every
	// successful Update increments it and writes the new value back.
	Version int64 `json:"version"`

	// LeaseOwner and LeaseExpiresAt are set by Claim. A running job whose
	// lease has expired may be claimed again by another worker.
	// LeaseExpiresAt is on the store's lease clock (see JobStore.Claim):
	// the holder renews it as the claimed LeaseExpiresAt plus the time
	// elapsed since the claim, never from its own wall clock alone.
	LeaseOwner     string    `json:"leaseOwner,omitempty"`
	LeaseExpiresAt time.Time `json:"leaseExpiresAt,omitzero"`
	// Attempts counts claims that ended without a hand-back (a worker
	// that shuts down gives the claim back and takes its attempt back),
	// so that a job that keeps crashing workers can be failed instead of
	// retried forever.
	Attempts int `json:"attempts,omitempty"`
	// Fence is the fencing token of the current claim: Claim sets it to
	// the job's new Version, so it grows with every claim and is never
	// reused. The engine names the files a run writes after it and lists
	// a file only through a compare-and-set Update made under the same
	// Fence: a stale run (its lease lost while it was paused) can write
	// only files that no manifest will ever list. See docs/correctness.md.
	Fence int64 `json:"fence,omitempty"`

	// Checkpoint is the engine's resume state, opaque to stores.
	Checkpoint json.RawMessage `json:"checkpoint,omitempty"`
}

// Clone returns a deep copy of j.
func (j *Job) Clone() *Job {
	if j == nil {
		return nil
	}
	c := *j
	c.Request = j.Request.clone()
	c.Output = slices.Clone(j.Output)
	c.Deleted = slices.Clone(j.Deleted)
	c.Errors = slices.Clone(j.Errors)
	c.Extension = slices.Clone(j.Extension)
	c.Checkpoint = slices.Clone(j.Checkpoint)
	if j.Failure != nil {
		f := *j.Failure
		f.Outcome = f.Outcome.Clone()
		c.Failure = &f
	}
	return &c
}

// Progress is what the status endpoint reports while a job runs.
type Progress struct {
	// Percent is 0..100, or negative when unknown.
	Percent float64 `json:"percent"`
	// Message is a short free text, such as the type being exported.
	Message string `json:"message,omitempty"`
}

// File is one entry of a manifest's output[], deleted[] or error[] array.
type File struct {
	// Type is the resource type of every line (Bundle for deleted[],
	// OperationOutcome for error[]); empty for organized output, whose
	// files hold resource blocks of several types.
	Type string `json:"type"`
	// Name identifies the file within its job in Storage. The download URL
	// is derived from it.
	Name string `json:"name"`
	// Count is the number of resources (lines) in the file.
	Count int64 `json:"count"`
	// Size is the file's size in bytes.
	Size int64 `json:"size"`
	// ContinuesIn names the file where the last resource block of this
	// file continues (organized output only).
	ContinuesIn string `json:"continuesIn,omitempty"`
}

// Failure is why a job failed, as the status endpoint reports it.
type Failure struct {
	// Status is the HTTP status polls answer with; 0 means 500.
	Status  int                        `json:"status,omitempty"`
	Outcome *fhirbulk.OperationOutcome `json:"outcome"`
}

// NewJobID returns 128 random bits, hex encoded.
func NewJobID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("bulkexport: crypto/rand failed: " + err.Error())
	}
	return hex.EncodeToString(b[:])
}

// validJobID reports whether id is safe to look up: 1 to 128 characters of
// [A-Za-z0-9_.-]. Ids made by NewJobID always are; host-made ids must be too.
func validJobID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return id != "." && id != ".."
}
