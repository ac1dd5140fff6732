package bulkexport

import (
	"context"
	"fmt"
	"net/http"
	"reflect"
	"strconv"
	"sync"
	"time"
)

// admit applies the per-client kick-off limits. It returns the job to
// reuse when ReuseInFlight finds an identical one, or an error (429) when
// the client has too many active jobs.
func (h *Handler) admit(ctx context.Context, clientID string, level Level, groupID string, req *Request) (*Job, error) {
	max := h.opts.MaxActiveJobsPerClient
	if max < 0 && !h.opts.ReuseInFlight {
		return nil, nil
	}
	active, err := h.store.List(ctx, Filter{Owner: clientID, States: []JobState{StateQueued, StateRunning}})
	if err != nil {
		return nil, storeError(err)
	}
	if h.opts.ReuseInFlight {
		for _, j := range active {
			if j.Level == level && j.GroupID == groupID && sameRequest(&j.Request, req) {
				return j, nil
			}
		}
	}
	if max >= 0 && len(active) >= max {
		// Advise the wait the oldest active job is advised to poll at.
		retry := time.Duration(0)
		if len(active) > 0 {
			retry = h.opts.RetryAfter(active[0], h.now())
		}
		return nil, &tooManyRequests{retry: retry, msg: fmt.Sprintf("this client already has %d exports in progress; retry when one has finished", len(active))}
	}
	return nil, nil
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
	return &Error{Status: http.StatusTooManyRequests, Code: IssueThrottled, Message: e.msg}
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
	// Burst is how many polls a client may send back to back. Default: 10.
	Burst int
	// Rate is how many times faster than advised a client may poll in the
	// long run. Default: 2.
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

func newPollLimiter(l PollLimit) *pollLimiter {
	if l.Burst <= 0 {
		l.Burst = 10
	}
	if l.Rate <= 0 {
		l.Rate = 2
	}
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
