package bulkexport

import (
	"sync"
	"time"
)

// maxFinishedCached bounds the finished-job cache; past it, an arbitrary
// entry makes room for a new one.
const maxFinishedCached = 10_000

// finishedCache keeps completed jobs in memory for a short while after a
// poll has read them from the JobStore (Options.FinishedJobCache), so that
// the next polls of the same job skip the store. A completed job never
// changes in the store, except when it is removed or expired early; the
// Handler drops its entries itself when it does either, and an entry lives
// at most ttl, which bounds how long a removal by another replica goes
// unseen.
type finishedCache struct {
	ttl time.Duration

	mu      sync.Mutex
	jobs    map[string]cachedJob
	byOwner map[string]map[string]struct{}
	// gen counts the drops. A poll that read a job from the store before
	// a drop must not cache what it read after the drop (the job may be
	// gone), so put refuses a read made under an older generation. Drops
	// are rare (a DELETE, a kick-off), so the next poll caches the job.
	gen uint64
}

type cachedJob struct {
	job   *Job // a clone, never changed: read by concurrent polls
	until time.Time
	pages map[int][]byte // encoded manifest pages, when not signed per poll
}

func newFinishedCache(ttl time.Duration) *finishedCache {
	return &finishedCache{ttl: ttl, jobs: map[string]cachedJob{}, byOwner: map[string]map[string]struct{}{}}
}

// get returns the cached job id of owner, or nil when there is none that
// is still fresh and unexpired at now.
func (c *finishedCache) get(id, owner string, now time.Time) *Job {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.jobs[id]
	if !ok {
		return nil
	}
	if !now.Before(e.until) || (!e.job.ExpiresAt.IsZero() && !now.Before(e.job.ExpiresAt)) {
		c.removeLocked(id, e.job.Owner)
		return nil
	}
	if e.job.Owner != owner {
		return nil
	}
	return e.job
}

// generation is taken before a store read, for put.
func (c *finishedCache) generation() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen
}

// put caches a completed job read from the store under generation gen,
// unless something was dropped since, and returns the job to use: the
// cached copy, or job itself.
func (c *finishedCache) put(job *Job, now time.Time, gen uint64) *Job {
	if job.State != StateCompleted {
		return job
	}
	clone := job.Clone()
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return job
	}
	if _, ok := c.jobs[job.ID]; !ok && len(c.jobs) >= maxFinishedCached {
		for id, e := range c.jobs {
			c.removeLocked(id, e.job.Owner)
			break
		}
	}
	c.jobs[job.ID] = cachedJob{job: clone, until: now.Add(c.ttl)}
	ids := c.byOwner[job.Owner]
	if ids == nil {
		ids = map[string]struct{}{}
		c.byOwner[job.Owner] = ids
	}
	ids[job.ID] = struct{}{}
	return clone
}

// drop forgets a job (it is being deleted).
func (c *finishedCache) drop(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	if e, ok := c.jobs[id]; ok {
		c.removeLocked(id, e.job.Owner)
	}
}

// dropOwner forgets every job of owner (its finished jobs may just have
// been expired early).
func (c *finishedCache) dropOwner(owner string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	for id := range c.byOwner[owner] {
		delete(c.jobs, id)
	}
	delete(c.byOwner, owner)
}

// page returns manifest page k of job, when job is the cached one and the
// page was encoded already.
func (c *finishedCache) page(job *Job, k int) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.jobs[job.ID]; ok && e.job == job {
		return e.pages[k]
	}
	return nil
}

// setPage keeps the encoded page k of job, when job is the cached one.
func (c *finishedCache) setPage(job *Job, k int, b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.jobs[job.ID]
	if !ok || e.job != job {
		return
	}
	if e.pages == nil {
		e.pages = map[int][]byte{}
		c.jobs[job.ID] = e
	}
	e.pages[k] = b
}

func (c *finishedCache) removeLocked(id, owner string) {
	delete(c.jobs, id)
	if ids := c.byOwner[owner]; ids != nil {
		delete(ids, id)
		if len(ids) == 0 {
			delete(c.byOwner, owner)
		}
	}
}
