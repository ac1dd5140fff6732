package bulkexport

import (
	"context"
	"time"
)

// JobStore persists export jobs. The handler creates jobs and answers polls
// from it; the Worker claims, updates and purges them. Implementations must
// be safe for concurrent use, and every method takes the caller's context.
//
// Jobs are copied in and out: a store never keeps a *Job it was handed and
// never hands out one it keeps. The package storetest checks every point of
// this contract; an implementation runs it with storetest.Run.
type JobStore interface {
	// Create stores a new job. It sets job.Version to 1 (in the stored copy
	// and in job). An id that already exists gives ErrAlreadyExists and
	// leaves the stored job as it was.
	//
	// When p.MaxActivePerOwner is positive and job.Owner already has that
	// many jobs queued or running, Create stores nothing and returns an
	// error wrapping ErrTooManyJobs. The count and the insert are one
	// atomic step: however many Creates for one owner race, no more than
	// MaxActivePerOwner of that owner's jobs are ever active at once
	// through Create.
	Create(ctx context.Context, job *Job, p CreateParams) error

	// Get returns the job with the given id, or an error wrapping
	// ErrNotFound. It never returns (nil, nil).
	Get(ctx context.Context, id string) (*Job, error)

	// Update replaces the stored job with job if, and only if, the stored
	// Version equals job.Version (compare-and-set). On success it stores
	// and writes back job.Version+1. A stale Version gives ErrConflict; a
	// missing job gives ErrNotFound; a state change that CheckTransition
	// refuses (for instance leaving a terminal state) gives
	// ErrInvalidTransition. On any error the stored job is unchanged.
	Update(ctx context.Context, job *Job) error

	// Delete removes the job. A missing job gives ErrNotFound.
	Delete(ctx context.Context, id string) error

	// Claim hands one job to a worker: the oldest (by CreatedAt, then ID)
	// job that is queued, or running with an expired lease (LeaseExpiresAt
	// before the lease clock's now); see Claimable. It moves the job to
	// StateRunning, sets LeaseOwner to p.Worker and LeaseExpiresAt to
	// now+p.Lease, increments Attempts and Version, sets Fence to the new
	// Version, and returns the stored copy. With nothing to claim it
	// returns ErrNoJob. Concurrent claims never hand out the same job twice
	// while its lease is live.
	//
	// The lease clock is p.Now, unless the store has a clock of its own
	// that every host sharing it sees (a database server's): such a store
	// says so in its documentation, and then both judges and sets leases
	// by its own clock. Either way, a lease holder renews on the timebase
	// of the LeaseExpiresAt that Claim returned (see Job.LeaseExpiresAt).
	Claim(ctx context.Context, p ClaimParams) (*Job, error)

	// List returns the jobs that match every set field of f, oldest
	// CreatedAt first (then ID). An empty result is not an error.
	List(ctx context.Context, f Filter) ([]*Job, error)
}

// CreateParams are the conditions of JobStore.Create. The zero value
// creates unconditionally.
type CreateParams struct {
	// MaxActivePerOwner caps the owner's queued and running jobs: 0 (or
	// less) means no cap.
	MaxActivePerOwner int
}

// ClaimParams are the arguments of JobStore.Claim.
type ClaimParams struct {
	// Worker names the claiming worker; it becomes the job's LeaseOwner.
	Worker string
	// Lease is how long the claim holds without renewal.
	Lease time.Duration
	// Now is the caller's clock reading: the lease clock of a store that
	// has none of its own.
	Now time.Time
}

// Filter selects jobs for JobStore.List. Zero fields match everything.
type Filter struct {
	// Owner keeps the jobs of one client.
	Owner string
	// States keeps jobs in any of these states.
	States []JobState
	// ExpiresBefore keeps jobs with a non-zero ExpiresAt before it: the
	// purge's query.
	ExpiresBefore time.Time
	// NotExpiredAt keeps jobs that have not expired at that time: a zero
	// ExpiresAt, or one after it. The handler's cap on finished jobs uses
	// it, so that jobs already expired (and waiting for the purge) cost it
	// nothing.
	NotExpiredAt time.Time
	// Limit caps the result; 0 means no cap.
	Limit int
}

// Match reports whether j satisfies f (ignoring Limit). Stores that filter
// in memory use it, so that every store agrees on the meaning of a Filter.
func (f Filter) Match(j *Job) bool {
	if f.Owner != "" && j.Owner != f.Owner {
		return false
	}
	if len(f.States) > 0 {
		ok := false
		for _, s := range f.States {
			if j.State == s {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	if !f.ExpiresBefore.IsZero() && (j.ExpiresAt.IsZero() || !j.ExpiresAt.Before(f.ExpiresBefore)) {
		return false
	}
	if !f.NotExpiredAt.IsZero() && !j.ExpiresAt.IsZero() && !j.ExpiresAt.After(f.NotExpiredAt) {
		return false
	}
	return true
}

// Claimable reports whether Claim may hand j out at now: it is queued, or
// running with an expired lease.
func Claimable(j *Job, now time.Time) bool {
	return j.State == StateQueued || (j.State == StateRunning && j.LeaseExpiresAt.Before(now))
}
