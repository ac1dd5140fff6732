package bulkexport

import (
	"context"
	"errors"
	"fmt"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"log/slog"
	"net/http"
	"reflect"
	"strconv"
	"sync"
	"time"
)

// admit looks for a job to reuse when ReuseInFlight is on: one of the
// client's queued or running jobs with the same level, group and
// parameters. The active-job cap is not checked here but by the store's
// Create, atomically (see create).
func (h *Handler) admit(ctx context.Context, clientID string, level fhirbulk.Level, groupID string, req *Request) (*Job, error) {
	if !h.opts.ReuseInFlight {
		return nil, nil
	}
	active, err := h.store.List(ctx, Filter{Owner: clientID, States: []JobState{StateQueued, StateRunning}})
	if err != nil {
		return nil, storeError(err)
	}
	for _, j := range active {
		if j.Level == level && j.GroupID == groupID && sameRequest(&j.Request, req) {
			return j, nil
		}
	}
	return nil, nil
}

// create stores a new job under the client's active-job cap. A store that
// refuses it for the cap gives 429, with the Retry-After that the client's
// oldest active job is advised to poll at.
func (h *Handler) create(ctx context.Context, job *Job) error {
	max := max(h.opts.MaxActiveJobsPerClient, 0)
	err := h.store.Create(ctx, job, CreateParams{MaxActivePerOwner: max})
	if !errors.Is(err, ErrTooManyJobs) {
		return err
	}
	retry := time.Duration(0)
	active, lerr := h.store.List(ctx, Filter{Owner: job.Owner, States: []JobState{StateQueued, StateRunning}, Limit: 1})
	if lerr == nil && len(active) > 0 {
		retry = h.opts.RetryAfter(active[0], h.now())
	}
	return &tooManyRequests{retry: retry, msg: fmt.Sprintf("this client already has %d exports in progress; retry when one has finished", max)}
}

// trimFinished keeps at most MaxFinishedJobsPerClient of a client's
// finished (completed, failed or cancelled) jobs: the oldest beyond the
// cap expire at once, so that polls of them answer 404 and the Worker's
// next purge removes them and their files. It runs after a kick-off and
// never fails it: a job it could not expire now is expired by a later
// kick-off.
func (h *Handler) trimFinished(ctx context.Context, clientID string) {
	keep := h.opts.MaxFinishedJobsPerClient
	if keep < 0 {
		return
	}
	now := h.now()
	done, err := h.store.List(ctx, Filter{Owner: clientID, States: []JobState{StateCompleted, StateFailed, StateCancelled}, NotExpiredAt: now})
	if err != nil || len(done) <= keep {
		return
	}
	// Oldest first: List orders by CreatedAt.
	for _, j := range done[:len(done)-keep] {
		if !j.ExpiresAt.IsZero() && !j.ExpiresAt.After(now) {
			continue
		}
		j.ExpiresAt = now
		j.UpdatedAt = now
		if err := h.store.Update(ctx, j); err != nil && ctx.Err() == nil {
			h.log.LogAttrs(ctx, slog.LevelDebug, "bulkexport: could not expire a finished job beyond the cap", append(jobAttrs(j), slog.Any("err", err))...)
		}
	}
}

// sameRequest reports whether two kick-offs ask for the same export.
func sameRequest(a, b *Request) bool {
	x, y := a.clone(), b.clone()
	x.URL, y.URL = "", ""
	return reflect.DeepEqual(x, y)
}

// tooManyRequests is a 429 answer with a Retry-After.
type tooManyRequests struct {
	retry time.Duration
	msg   string
}

func (e *tooManyRequests) Error() string { return e.msg }

// asError is the 429 as an *Error, for the ErrorMapper.
func (e *tooManyRequests) asError() *Error {
	return &Error{Status: http.StatusTooManyRequests, Code: fhirbulk.IssueThrottled, Message: e.msg}
}

// retryAfterSeconds is d in whole seconds, at least 1.
func retryAfterSeconds(d time.Duration) string {
	return strconv.FormatInt(max(int64((d+time.Second-1)/time.Second), 1), 10)
}

// PollLimit rate-limits status requests per client and job with a token
// bucket: Burst polls at once, then one more for every Retry-After interval
// the handler advises divided by Rate. A client over the limit gets 429
// with Retry-After and an OperationOutcome. The state is kept in memory by
// each Handler, so with several replicas the limit applies per replica.
type PollLimit struct {
	// Burst is how many polls a client may send back to back. Default:
	// DefaultPollBurst (10).
	Burst int
	// Rate is how many times faster than advised a client may poll in the
	// long run. Default: DefaultPollRate (2).
	Rate float64
}

// pollLimiter keeps one token bucket per client and job.
type pollLimiter struct {
	burst float64
	rate  float64

	mu      sync.Mutex
	buckets map[string]*bucket
	sweep   time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

// newPollLimiter takes l with its defaults filled (Options.fill).
func newPollLimiter(l PollLimit) *pollLimiter {
	return &pollLimiter{burst: float64(l.Burst), rate: l.Rate, buckets: map[string]*bucket{}}
}

// allow takes a token for key, refilled at rate per advised interval. It
// returns how long to wait when there is none.
func (p *pollLimiter) allow(key string, now time.Time, advised time.Duration) (bool, time.Duration) {
	advised = max(advised, time.Second)
	per := time.Duration(float64(advised) / p.rate) // time to earn one token
	p.mu.Lock()
	defer p.mu.Unlock()
	if now.Sub(p.sweep) > 10*time.Minute {
		// Forget buckets idle long enough to be full again.
		for k, b := range p.buckets {
			if now.Sub(b.last) > 10*time.Minute {
				delete(p.buckets, k)
			}
		}
		p.sweep = now
	}
	b, ok := p.buckets[key]
	if !ok {
		b = &bucket{tokens: p.burst, last: now}
		p.buckets[key] = b
	}
	b.tokens = min(p.burst, b.tokens+float64(now.Sub(b.last))/float64(per))
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) * float64(per))
}
