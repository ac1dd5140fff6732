package bulkexport

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"time"
)

// closeUnits closes the units of a job that ended (see UnitStore). Called
// with s.mu held.
func (s *MemoryStore) closeUnits(jobID string) {
	for _, m := range s.units[jobID] {
		if !m.u.State.Final() {
			m.u.State = UnitClosed
			m.u.LeaseOwner, m.u.LeaseExpiresAt = "", time.Time{}
			m.u.Version++
		}
	}
}

// AddUnits implements UnitStore.
func (s *MemoryStore) AddUnits(ctx context.Context, jobID string, units []*Unit) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := CheckUnits(units); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.jobs[jobID]
	switch {
	case !ok:
		return fmt.Errorf("job %s: %w", jobID, ErrNotFound)
	case j.State.Terminal():
		return fmt.Errorf("job %s is %s: %w", jobID, j.State, ErrInvalidTransition)
	case len(s.units[jobID]) > 0:
		return fmt.Errorf("job %s has units: %w", jobID, ErrAlreadyExists)
	}
	PrepareUnits(jobID, units)
	stored := make([]*memUnit, len(units))
	for i, u := range units {
		s.unitAdded++
		stored[i] = &memUnit{u: u.Clone(), added: s.unitAdded}
	}
	slices.SortFunc(stored, func(a, b *memUnit) int {
		return cmp.Or(cmp.Compare(a.u.Seq, b.u.Seq), cmp.Compare(a.u.Key, b.u.Key))
	})
	s.units[jobID] = stored
	return nil
}

// ClaimUnit implements UnitStore. Leases are judged and set by p.Now.
func (s *MemoryStore) ClaimUnit(ctx context.Context, p ClaimParams) (*Unit, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var best *memUnit
	for id := range s.active {
		for _, m := range s.units[id] {
			if UnitClaimable(m.u, p.Now) && (best == nil || unitClaimOrder(m, best) < 0) {
				best = m
			}
		}
	}
	if best == nil {
		return nil, ErrNoJob
	}
	u := best.u
	u.State = UnitRunning
	u.LeaseOwner = p.Worker
	u.LeaseExpiresAt = p.Now.Add(p.Lease)
	u.Attempts++
	u.Version++
	u.Fence = u.Version
	return u.Clone(), nil
}

// unitClaimOrder orders claimable units: pending ones first, by add order,
// then expired ones by expiry (then add order).
func unitClaimOrder(a, b *memUnit) int {
	ap, bp := a.u.State == UnitPending, b.u.State == UnitPending
	switch {
	case ap && !bp:
		return -1
	case bp && !ap:
		return 1
	case !ap:
		if c := a.u.LeaseExpiresAt.Compare(b.u.LeaseExpiresAt); c != 0 {
			return c
		}
	}
	return cmp.Compare(a.added, b.added)
}

// UpdateUnit implements UnitStore.
func (s *MemoryStore) UpdateUnit(ctx context.Context, u *Unit) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range s.units[u.JobID] {
		if m.u.Key != u.Key {
			continue
		}
		if err := CheckUnitUpdate(m.u, u); err != nil {
			return err
		}
		u.Version++
		m.u = u.Clone()
		return nil
	}
	return fmt.Errorf("unit %s/%s: %w", u.JobID, u.Key, ErrNotFound)
}

// Units implements UnitStore.
func (s *MemoryStore) Units(ctx context.Context, jobID string) ([]*Unit, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*Unit, 0, len(s.units[jobID]))
	for _, m := range s.units[jobID] {
		out = append(out, m.u.Clone())
	}
	return out, nil
}
