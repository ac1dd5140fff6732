package bulkexport

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sync"
	"time"
)

// MemoryStore is a JobStore that keeps jobs in a map. It is meant for tests,
// examples and single-process servers that can lose their jobs on restart.
// It copies jobs in and out, starts no goroutines, and is safe for
// concurrent use. The zero value is not usable; call NewMemoryStore.
type MemoryStore struct {
	mu   sync.RWMutex
	jobs map[string]*Job
}

var _ JobStore = (*MemoryStore)(nil)

// NewMemoryStore returns an empty MemoryStore.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{jobs: make(map[string]*Job)}
}

// Create implements JobStore.
func (s *MemoryStore) Create(ctx context.Context, job *Job) error {
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
	job.Version = 1
	s.jobs[job.ID] = job.Clone()
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
	s.jobs[job.ID] = job.Clone()
	return nil
}

// Delete implements JobStore.
func (s *MemoryStore) Delete(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.jobs[id]; !ok {
		return fmt.Errorf("job %s: %w", id, ErrNotFound)
	}
	delete(s.jobs, id)
	return nil
}

// Claim implements JobStore.
func (s *MemoryStore) Claim(ctx context.Context, worker string, now time.Time, lease time.Duration) (*Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var best *Job
	for _, j := range s.jobs {
		if Claimable(j, now) && (best == nil || jobOrder(j, best) < 0) {
			best = j
		}
	}
	if best == nil {
		return nil, ErrNoJob
	}
	best.State = StateRunning
	best.LeaseOwner = worker
	best.LeaseExpiresAt = now.Add(lease)
	best.Attempts++
	best.Version++
	best.UpdatedAt = now
	return best.Clone(), nil
}

// List implements JobStore.
func (s *MemoryStore) List(ctx context.Context, f Filter) ([]*Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.RLock()
	var out []*Job
	for _, j := range s.jobs {
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
