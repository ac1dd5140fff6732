package bulkexport

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sync"
)

// MemoryStore is a JobStore that keeps jobs in a map. It is meant for tests,
// examples and single-process servers that can lose their jobs on restart.
// It copies jobs in and out, starts no goroutines, and is safe for
// concurrent use. The zero value is not usable; call NewMemoryStore.
//
// Its lease clock is the caller's (ClaimParams.Now). Claim looks only at
// active jobs, and List with an Owner only at that owner's jobs, so that
// neither slows down as finished jobs accumulate.
type MemoryStore struct {
	mu      sync.RWMutex
	jobs    map[string]*Job
	active  map[string]*Job            // queued and running jobs
	byOwner map[string]map[string]*Job // every job, by Owner

	units     map[string][]*memUnit // the units of a job, by Seq
	unitAdded int64                 // units ever added: their add order
}

// memUnit is a stored unit with the order AddUnits stored it in.
type memUnit struct {
	u     *Unit
	added int64
}

var (
	_ JobStore  = (*MemoryStore)(nil)
	_ UnitStore = (*MemoryStore)(nil)
)

// NewMemoryStore returns an empty MemoryStore.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{jobs: make(map[string]*Job), active: make(map[string]*Job), byOwner: make(map[string]map[string]*Job),
		units: make(map[string][]*memUnit)}
}

// put stores j (owned by the store) and updates the indexes; old is the
// job it replaces, or nil.
func (s *MemoryStore) put(old, j *Job) {
	if old != nil {
		s.unindex(old)
	}
	s.jobs[j.ID] = j
	if !j.State.Terminal() {
		s.active[j.ID] = j
	}
	m := s.byOwner[j.Owner]
	if m == nil {
		m = make(map[string]*Job)
		s.byOwner[j.Owner] = m
	}
	m[j.ID] = j
}

func (s *MemoryStore) unindex(j *Job) {
	delete(s.jobs, j.ID)
	delete(s.active, j.ID)
	if m := s.byOwner[j.Owner]; m != nil {
		delete(m, j.ID)
		if len(m) == 0 {
			delete(s.byOwner, j.Owner)
		}
	}
}

// Create implements JobStore.
func (s *MemoryStore) Create(ctx context.Context, job *Job, p CreateParams) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if job == nil || job.ID == "" {
		return fmt.Errorf("bulkexport: MemoryStore.Create: job has no id")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.jobs[job.ID]; ok {
		return fmt.Errorf("job %s: %w", job.ID, ErrAlreadyExists)
	}
	if p.MaxActivePerOwner > 0 {
		n := 0
		for _, j := range s.byOwner[job.Owner] {
			if !j.State.Terminal() {
				n++
			}
		}
		if n >= p.MaxActivePerOwner {
			return fmt.Errorf("owner %q has %d active jobs: %w", job.Owner, n, ErrTooManyJobs)
		}
	}
	job.Version = 1
	s.put(nil, job.Clone())
	return nil
}

// Get implements JobStore.
func (s *MemoryStore) Get(ctx context.Context, id string) (*Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.RLock()
	j, ok := s.jobs[id]
	if !ok {
		s.mu.RUnlock()
		return nil, fmt.Errorf("job %s: %w", id, ErrNotFound)
	}
	c := j.Clone()
	s.mu.RUnlock()
	return c, nil
}

// Update implements JobStore.
func (s *MemoryStore) Update(ctx context.Context, job *Job) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	cur, ok := s.jobs[job.ID]
	if !ok {
		return fmt.Errorf("job %s: %w", job.ID, ErrNotFound)
	}
	if cur.Version != job.Version {
		return fmt.Errorf("job %s: version %d, stored %d: %w", job.ID, job.Version, cur.Version, ErrConflict)
	}
	if err := CheckTransition(cur.State, job.State); err != nil {
		return fmt.Errorf("job %s: %w", job.ID, err)
	}
	job.Version++
	s.put(cur, job.Clone())
	if job.State.Terminal() {
		s.closeUnits(job.ID)
	}
	return nil
}

// Delete implements JobStore.
func (s *MemoryStore) Delete(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.jobs[id]
	if !ok {
		return fmt.Errorf("job %s: %w", id, ErrNotFound)
	}
	s.unindex(j)
	delete(s.units, id)
	return nil
}

// Claim implements JobStore. Leases are judged and set by p.Now.
func (s *MemoryStore) Claim(ctx context.Context, p ClaimParams) (*Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var best *Job
	for _, j := range s.active {
		if Claimable(j, p.Now) && (best == nil || jobOrder(j, best) < 0) {
			best = j
		}
	}
	if best == nil {
		return nil, ErrNoJob
	}
	best.State = StateRunning
	best.LeaseOwner = p.Worker
	best.LeaseExpiresAt = p.Now.Add(p.Lease)
	best.Attempts++
	best.Version++
	best.Fence = best.Version
	best.UpdatedAt = p.Now
	return best.Clone(), nil
}

// List implements JobStore.
func (s *MemoryStore) List(ctx context.Context, f Filter) ([]*Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.RLock()
	src := s.jobs
	switch {
	case f.Owner != "":
		src = s.byOwner[f.Owner]
	case len(f.States) > 0 && !slices.ContainsFunc(f.States, JobState.Terminal):
		src = s.active
	}
	var out []*Job
	for _, j := range src {
		if f.Match(j) {
			out = append(out, j.Clone())
		}
	}
	s.mu.RUnlock()
	slices.SortFunc(out, jobOrder)
	if f.Limit > 0 && len(out) > f.Limit {
		out = out[:f.Limit]
	}
	return out, nil
}

func jobOrder(a, b *Job) int {
	if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
		return c
	}
	return cmp.Compare(a.ID, b.ID)
}
