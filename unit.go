package bulkexport

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"
)

// UnitState is where a Unit is in its life.
type UnitState string

// The states of a Unit. A unit is added pending, runs under claims
// (ClaimUnit), and ends done or failed by its claim holder's update, or
// closed by the store when its job ends first. Done, failed and closed are
// final.
const (
	UnitPending UnitState = "pending"
	UnitRunning UnitState = "running"
	UnitDone    UnitState = "done"
	UnitFailed  UnitState = "failed"
	UnitClosed  UnitState = "closed"
)

// Final reports whether s is done, failed or closed.
func (s UnitState) Final() bool {
	return s == UnitDone || s == UnitFailed || s == UnitClosed
}

// Valid reports whether s is one of the five unit states.
func (s UnitState) Valid() bool {
	switch s {
	case UnitPending, UnitRunning, UnitDone, UnitFailed, UnitClosed:
		return true
	}
	return false
}

// CheckUnitTransition returns nil when UnitStore.UpdateUnit may move a
// unit from one state to another, and an error wrapping
// ErrInvalidTransition otherwise. Staying in a state that is not final is
// allowed; a pending unit may only start running (its claim does that), a
// running one may end done or failed or go back to pending (a hand-back on
// shutdown), and nothing leaves a final state. Closing is the store's own
// move, never an update's.
func CheckUnitTransition(from, to UnitState) error {
	ok := false
	switch {
	case !from.Valid() || !to.Valid() || from.Final() || to == UnitClosed:
	case from == to:
		ok = true
	case from == UnitPending:
		ok = to == UnitRunning
	case from == UnitRunning:
		ok = to == UnitDone || to == UnitFailed || to == UnitPending
	}
	if ok {
		return nil
	}
	return fmt.Errorf("%w: unit %s → %s", ErrInvalidTransition, from, to)
}

// Unit is one independently claimed piece of a partitioned job: one
// partition of one resource type (see Partitioner). Its claim holder
// exports it, checkpoints it and records its files in the unit, exactly as
// a job's claim holder does for a whole job; the job's own claim holder
// gathers the files of all units into the job when the last one is done.
type Unit struct {
	// JobID is the job the unit belongs to.
	JobID string `json:"jobId"`
	// Key names the unit within its job: 1 to 64 characters of
	// [A-Za-z0-9._-]. The engine uses it as the stem of the unit's file
	// names ("Observation.p0003").
	Key string `json:"key"`
	// Type is the resource type the unit exports.
	Type string `json:"type"`
	// Partition is the Source's token for the unit's part of Type
	// (Query.Partition).
	Partition string `json:"partition,omitempty"`
	// Seq is the unit's place in its job's plan: the order in which the
	// manifest lists the files of a type's units.
	Seq int `json:"seq"`

	State UnitState `json:"state"`
	// Version is the compare-and-set version, as Job.Version.
	Version int64 `json:"version"`
	// LeaseOwner, LeaseExpiresAt, Attempts and Fence mean what they mean
	// on a Job, for the unit's claims.
	LeaseOwner     string    `json:"leaseOwner,omitempty"`
	LeaseExpiresAt time.Time `json:"leaseExpiresAt,omitzero"`
	Attempts       int       `json:"attempts,omitempty"`
	Fence          int64     `json:"fence,omitempty"`

	// Checkpoint is the engine's resume state for the unit.
	Checkpoint json.RawMessage `json:"checkpoint,omitempty"`
	// Output, Deleted and Errors are the unit's committed files.
	Output  []File `json:"output,omitempty"`
	Deleted []File `json:"deleted,omitempty"`
	Errors  []File `json:"errors,omitempty"`
	// Written counts the resources in the unit's recorded files; Estimate
	// is the Source's estimate for the unit (0 when unknown). The job's
	// progress sums them.
	Written  int64 `json:"written,omitempty"`
	Estimate int64 `json:"estimate,omitempty"`
	// Failure says why a failed unit failed; the job fails with it.
	Failure *Failure `json:"failure,omitempty"`
	// UpdatedAt is when the unit's holder last wrote it.
	UpdatedAt time.Time `json:"updatedAt,omitzero"`
}

// Clone returns a deep copy of u.
func (u *Unit) Clone() *Unit {
	if u == nil {
		return nil
	}
	c := *u
	c.Checkpoint = slices.Clone(u.Checkpoint)
	c.Output = slices.Clone(u.Output)
	c.Deleted = slices.Clone(u.Deleted)
	c.Errors = slices.Clone(u.Errors)
	if u.Failure != nil {
		f := *u.Failure
		f.Outcome = f.Outcome.Clone()
		c.Failure = &f
	}
	return &c
}

// UnitClaimable reports whether ClaimUnit may hand u out at now: it is
// pending, or running with an expired lease.
func UnitClaimable(u *Unit, now time.Time) bool {
	return u.State == UnitPending || (u.State == UnitRunning && u.LeaseExpiresAt.Before(now))
}

// ValidUnitKey reports whether key can name a unit (see Unit.Key).
func ValidUnitKey(key string) bool {
	return len(key) <= 64 && validJobID(key)
}

// UnitStore is an optional interface of a JobStore that keeps the units of
// partitioned jobs, so that one job's work is shared by every worker of
// every replica. The Worker partitions a job only when its store is a
// UnitStore and its Source a Partitioner. MemoryStore, sqlitestore and
// pgstore implement it; storetest checks the contract (its Units cases)
// for any store that does.
//
// The JobStore methods change in two points for such a store: an Update
// that moves a job to a final state (completed, failed, cancelled) closes
// the job's units that are not final yet (State UnitClosed, lease cleared,
// Version incremented) in the same atomic step, so that they are never
// claimed again and their holders' next UpdateUnit meets ErrConflict; and
// Delete removes the job's units with it.
type UnitStore interface {
	// AddUnits stores the plan of a job: every unit at once, or none. The
	// job must exist (else ErrNotFound) and not be final (else
	// ErrInvalidTransition). A job has one plan: if it has units already,
	// AddUnits adds nothing and returns ErrAlreadyExists. units must not
	// be empty, and their keys must be valid (ValidUnitKey) and distinct.
	// Each unit is stored with JobID set to jobID, State UnitPending,
	// Version 1, and no lease, attempts or fence; those values are written
	// back to units.
	AddUnits(ctx context.Context, jobID string, units []*Unit) error

	// ClaimUnit hands one unit, of any job, to a worker: a pending unit if
	// there is one (the earliest added, in the order AddUnits got them),
	// else a running unit whose lease expired (the earliest expired; see
	// UnitClaimable). It moves the unit to UnitRunning, sets LeaseOwner,
	// LeaseExpiresAt (now+p.Lease), increments Attempts and Version, sets
	// Fence to the new Version, and returns the stored copy; with nothing
	// to claim it returns ErrNoJob. The lease clock is Claim's, and
	// concurrent claims never hand out one unit twice while its lease is
	// live.
	ClaimUnit(ctx context.Context, p ClaimParams) (*Unit, error)

	// UpdateUnit replaces the stored unit (found by JobID and Key) with u
	// if, and only if, the stored Version equals u.Version. On success it
	// stores and writes back u.Version+1. A stale Version gives
	// ErrConflict, a missing unit ErrNotFound, and a state change that
	// CheckUnitTransition refuses ErrInvalidTransition; on any error the
	// stored unit is unchanged. JobID, Key, Type, Partition and Seq never
	// change: an update that changes them gives ErrInvalidTransition.
	UpdateUnit(ctx context.Context, u *Unit) error

	// Units returns the units of a job, by Seq, then Key. A job without units (or no
	// job) gives an empty list, not an error.
	Units(ctx context.Context, jobID string) ([]*Unit, error)
}

// CheckUnits validates the plan handed to UnitStore.AddUnits: not empty,
// valid and distinct keys. Stores call it first.
func CheckUnits(units []*Unit) error {
	if len(units) == 0 {
		return fmt.Errorf("bulkexport: AddUnits: no units")
	}
	seen := make(map[string]bool, len(units))
	for _, u := range units {
		if u == nil || !ValidUnitKey(u.Key) {
			return fmt.Errorf("bulkexport: AddUnits: invalid unit key")
		}
		if seen[u.Key] {
			return fmt.Errorf("bulkexport: AddUnits: unit key %s twice", u.Key)
		}
		seen[u.Key] = true
	}
	return nil
}

// PrepareUnits sets the fields AddUnits stores for a new plan (JobID,
// pending, Version 1, no lease, no attempts, no fence) on each unit.
func PrepareUnits(jobID string, units []*Unit) {
	for _, u := range units {
		u.JobID = jobID
		u.State = UnitPending
		u.Version = 1
		u.LeaseOwner, u.LeaseExpiresAt = "", time.Time{}
		u.Attempts, u.Fence = 0, 0
	}
}

// CheckUnitUpdate returns the error UpdateUnit gives when u may not replace
// stored (both of one job and key): a stale version, a refused transition,
// or a change of identity. Stores that compare in memory use it.
func CheckUnitUpdate(stored, u *Unit) error {
	if stored.Version != u.Version {
		return fmt.Errorf("unit %s/%s: version %d, stored %d: %w", u.JobID, u.Key, u.Version, stored.Version, ErrConflict)
	}
	if u.Type != stored.Type || u.Partition != stored.Partition || u.Seq != stored.Seq {
		return fmt.Errorf("%w: unit %s/%s: identity changed", ErrInvalidTransition, u.JobID, u.Key)
	}
	return CheckUnitTransition(stored.State, u.State)
}
