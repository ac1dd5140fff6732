package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/bulkfhir/bulkexport"
)

// FileStore is a bulkexport.JobStore that keeps every job in one JSON
// file, an object of job ids and their stored forms
// (bulkexport.MarshalStoredJob). It serves reads from memory and rewrites the whole file on every
// change, atomically (a temporary file in the same directory, synced, then
// renamed over the old one), so that a crash leaves either the old or the
// new state and never half a file. A change that cannot be saved is not
// made.
//
// It suits a single server process with a few hundred jobs; it is an
// example of the contract, not a database. The contract is
// bulkexport.JobStore's, checked by storetest.Run (see main_test.go).
type FileStore struct {
	path string
	mu   sync.Mutex
	jobs map[string]*bulkexport.Job
}

var _ bulkexport.JobStore = (*FileStore)(nil)

// OpenFileStore opens the store kept in the file at path, creating an
// empty store if the file does not exist. Only one process may use the
// file at a time.
func OpenFileStore(path string) (*FileStore, error) {
	s := &FileStore{path: path, jobs: map[string]*bulkexport.Job{}}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return s, nil
	case err != nil:
		return nil, err
	}
	var stored map[string]json.RawMessage
	if err := json.Unmarshal(b, &stored); err != nil {
		return nil, fmt.Errorf("filestore: %s: %w", path, err)
	}
	for id, raw := range stored {
		// A job a newer release wrote, in a format this one does not
		// know, is refused rather than misread.
		j, err := bulkexport.UnmarshalStoredJob(raw)
		if err != nil {
			return nil, fmt.Errorf("filestore: %s: job %s: %w", path, id, err)
		}
		s.jobs[id] = j
	}
	return s, nil
}

// save writes jobs to the file: temporary file, fsync, rename, and an
// fsync of the directory so that the rename itself survives a crash.
// The caller holds s.mu.
func (s *FileStore) save(jobs map[string]*bulkexport.Job) error {
	// Each job is kept in its stored form, which carries its format
	// version (bulkexport.JobFormatVersion).
	stored := make(map[string]json.RawMessage, len(jobs))
	for id, j := range jobs {
		raw, err := bulkexport.MarshalStoredJob(j)
		if err != nil {
			return fmt.Errorf("filestore: job %s: %w", id, err)
		}
		stored[id] = raw
	}
	b, err := json.Marshal(stored)
	if err != nil {
		return err
	}
	dir := filepath.Dir(s.path)
	tmp, err := os.CreateTemp(dir, filepath.Base(s.path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	defer os.Remove(tmp.Name()) // fails harmlessly after the rename
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("filestore: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("filestore: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	if err := os.Rename(tmp.Name(), s.path); err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// commit saves the jobs with id set to j (or removed, when j is nil) and,
// once the file holds them, makes the change in memory. The caller holds
// s.mu.
func (s *FileStore) commit(id string, j *bulkexport.Job) error {
	next := make(map[string]*bulkexport.Job, len(s.jobs)+1)
	for k, v := range s.jobs {
		next[k] = v
	}
	if j == nil {
		delete(next, id)
	} else {
		next[id] = j
	}
	if err := s.save(next); err != nil {
		return err
	}
	s.jobs = next
	return nil
}

// Create implements bulkexport.JobStore.
func (s *FileStore) Create(ctx context.Context, job *bulkexport.Job, p bulkexport.CreateParams) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if job == nil || job.ID == "" {
		return errors.New("filestore: Create: job has no id")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.jobs[job.ID]; ok {
		return fmt.Errorf("job %s: %w", job.ID, bulkexport.ErrAlreadyExists)
	}
	// The count and the insert happen under one lock, so the cap is exact
	// however many kick-offs race.
	if p.MaxActivePerOwner > 0 {
		n := 0
		for _, j := range s.jobs {
			if j.Owner == job.Owner && !j.State.Terminal() {
				n++
			}
		}
		if n >= p.MaxActivePerOwner {
			return fmt.Errorf("owner %q has %d active jobs: %w", job.Owner, n, bulkexport.ErrTooManyJobs)
		}
	}
	c := job.Clone()
	c.Version = 1
	if err := s.commit(c.ID, c); err != nil {
		return err
	}
	job.Version = 1
	return nil
}

// Get implements bulkexport.JobStore.
func (s *FileStore) Get(ctx context.Context, id string) (*bulkexport.Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.jobs[id]
	if !ok {
		return nil, fmt.Errorf("job %s: %w", id, bulkexport.ErrNotFound)
	}
	return j.Clone(), nil
}

// Update implements bulkexport.JobStore: compare-and-set on Version, and
// only the state changes bulkexport.CheckTransition allows.
func (s *FileStore) Update(ctx context.Context, job *bulkexport.Job) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	cur, ok := s.jobs[job.ID]
	if !ok {
		return fmt.Errorf("job %s: %w", job.ID, bulkexport.ErrNotFound)
	}
	if cur.Version != job.Version {
		return fmt.Errorf("job %s: version %d, stored %d: %w", job.ID, job.Version, cur.Version, bulkexport.ErrConflict)
	}
	if err := bulkexport.CheckTransition(cur.State, job.State); err != nil {
		return fmt.Errorf("job %s: %w", job.ID, err)
	}
	c := job.Clone()
	c.Version++
	if err := s.commit(c.ID, c); err != nil {
		return err
	}
	job.Version = c.Version
	return nil
}

// Delete implements bulkexport.JobStore.
func (s *FileStore) Delete(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.jobs[id]; !ok {
		return fmt.Errorf("job %s: %w", id, bulkexport.ErrNotFound)
	}
	return s.commit(id, nil)
}

// Claim implements bulkexport.JobStore: the oldest claimable job becomes
// running under worker's lease. The mutex makes it atomic, so two claims
// never get the same job. The file has no clock of its own, so leases are
// read and set on the caller's clock (p.Now).
func (s *FileStore) Claim(ctx context.Context, p bulkexport.ClaimParams) (*bulkexport.Job, error) {
	now := p.Now
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var best *bulkexport.Job
	for _, j := range s.jobs {
		if bulkexport.Claimable(j, now) && (best == nil || jobOrder(j, best) < 0) {
			best = j
		}
	}
	if best == nil {
		return nil, bulkexport.ErrNoJob
	}
	c := best.Clone()
	c.State = bulkexport.StateRunning
	c.LeaseOwner = p.Worker
	c.LeaseExpiresAt = now.Add(p.Lease)
	c.Attempts++
	c.Version++
	c.Fence = c.Version
	c.UpdatedAt = now
	if err := s.commit(c.ID, c); err != nil {
		return nil, err
	}
	return c.Clone(), nil
}

// List implements bulkexport.JobStore.
func (s *FileStore) List(ctx context.Context, f bulkexport.Filter) ([]*bulkexport.Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	var out []*bulkexport.Job
	for _, j := range s.jobs {
		if f.Match(j) {
			out = append(out, j.Clone())
		}
	}
	s.mu.Unlock()
	slices.SortFunc(out, jobOrder)
	if f.Limit > 0 && len(out) > f.Limit {
		out = out[:f.Limit]
	}
	return out, nil
}

// jobOrder is the order Claim and List use: oldest CreatedAt, then ID.
func jobOrder(a, b *bulkexport.Job) int {
	if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
		return c
	}
	return cmp.Compare(a.ID, b.ID)
}
