package storetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// The Units cases check the bulkexport.UnitStore contract. A store that is
// not a UnitStore skips them.

type unit = bulkexport.Unit

func unitCases() []testCase {
	return []testCase{
		{"AddAndList", unitAddAndList},
		{"AddOnce", unitAddOnce},
		{"AddRefused", unitAddRefused},
		{"ClaimFields", unitClaimFields},
		{"ClaimOrder", unitClaimOrder},
		{"LiveLease", unitLiveLease},
		{"ExpiredLease", unitExpiredLease},
		{"Update", unitUpdate},
		{"UpdateRefused", unitUpdateRefused},
		{"JobEndClosesUnits", unitJobEndCloses},
		{"DeleteRemovesUnits", unitDeleteRemoves},
		{"ClaimEachUnitOnce", unitClaimEachOnce},
	}
}

func unitStore(t *testing.T, s bulkexport.JobStore) bulkexport.UnitStore {
	t.Helper()
	us, ok := s.(bulkexport.UnitStore)
	if !ok {
		t.Skip("storetest: the store is not a bulkexport.UnitStore")
	}
	return us
}

// plan returns n units of typ, keyed typ.p0001 ..., with Seq from seq0.
func plan(typ string, n, seq0 int) []*unit {
	out := make([]*unit, n)
	for i := range n {
		out[i] = &unit{Key: fmt.Sprintf("%s.p%04d", typ, i+1), Type: typ, Partition: fmt.Sprintf("range-%d", i), Seq: seq0 + i,
			// AddUnits must ignore these.
			State: bulkexport.UnitDone, Version: 9, LeaseOwner: "x", Attempts: 3, Fence: 7}
	}
	return out
}

// runningJob creates a running job with the given id.
func runningJob(t *testing.T, ctx context.Context, s bulkexport.JobStore, id string, created time.Time) *job {
	t.Helper()
	return createIn(t, ctx, s, newJob(id, "alice", created), running)
}

func mustAddUnits(t *testing.T, ctx context.Context, us bulkexport.UnitStore, jobID string, units []*unit) {
	t.Helper()
	if err := us.AddUnits(ctx, jobID, units); err != nil {
		t.Fatalf("AddUnits(%s, %d units): %v", jobID, len(units), err)
	}
}

func mustUnits(t *testing.T, ctx context.Context, us bulkexport.UnitStore, jobID string) []*unit {
	t.Helper()
	got, err := us.Units(ctx, jobID)
	if err != nil {
		t.Fatalf("Units(%s): %v", jobID, err)
	}
	return got
}

func mustClaimUnit(t *testing.T, ctx context.Context, us bulkexport.UnitStore, worker string, now time.Time, lease time.Duration) *unit {
	t.Helper()
	u, err := us.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: worker, Now: now, Lease: lease})
	if err != nil {
		t.Fatalf("ClaimUnit(%s): %v", worker, err)
	}
	if u == nil {
		t.Fatalf("ClaimUnit(%s) = nil, nil", worker)
	}
	return u
}

func wantNoUnit(t *testing.T, ctx context.Context, us bulkexport.UnitStore, worker string, now time.Time) {
	t.Helper()
	u, err := us.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: worker, Now: now, Lease: time.Minute})
	if !errors.Is(err, bulkexport.ErrNoJob) {
		key := "<nil>"
		if u != nil {
			key = u.JobID + "/" + u.Key + " (" + string(u.State) + ")"
		}
		t.Fatalf("ClaimUnit(%s) = %s, %v; want ErrNoJob", worker, key, err)
	}
}

// assertUnit compares units field by field, times with Equal and JSON by
// meaning.
func assertUnit(t *testing.T, what string, want, got *unit) {
	t.Helper()
	if got == nil {
		t.Fatalf("%s: nil unit", what)
	}
	w, g := *want, *got
	if !jsonEqual(w.Checkpoint, g.Checkpoint) {
		t.Errorf("%s: Checkpoint = %s, want %s", what, g.Checkpoint, w.Checkpoint)
	}
	w.Checkpoint, g.Checkpoint = nil, nil
	if !w.LeaseExpiresAt.Equal(g.LeaseExpiresAt) || !w.UpdatedAt.Equal(g.UpdatedAt) {
		t.Errorf("%s: LeaseExpiresAt, UpdatedAt = %s, %s; want %s, %s", what, showTime(g.LeaseExpiresAt), showTime(g.UpdatedAt),
			showTime(w.LeaseExpiresAt), showTime(w.UpdatedAt))
	}
	w.LeaseExpiresAt, g.LeaseExpiresAt, w.UpdatedAt, g.UpdatedAt = time.Time{}, time.Time{}, time.Time{}, time.Time{}
	for _, p := range []*unit{&w, &g} {
		if len(p.Output) == 0 {
			p.Output = nil
		}
		if len(p.Deleted) == 0 {
			p.Deleted = nil
		}
		if len(p.Errors) == 0 {
			p.Errors = nil
		}
	}
	if !reflect.DeepEqual(w, g) {
		t.Errorf("%s:\n got %+v\nwant %+v", what, g, w)
	}
}

func unitKeys(us []*unit) []string {
	out := make([]string, len(us))
	for i, u := range us {
		out[i] = u.JobID + "/" + u.Key
	}
	return out
}

func unitAddAndList(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	runningJob(t, ctx, s, "job-u", baseTime())
	if got := mustUnits(t, ctx, us, "job-u"); len(got) != 0 {
		t.Fatalf("Units before AddUnits = %v, want none", unitKeys(got))
	}
	if got := mustUnits(t, ctx, us, "no-such-job"); len(got) != 0 {
		t.Fatalf("Units of a missing job = %v, want none", unitKeys(got))
	}
	// Seq, not the slice's order, orders Units.
	units := append(plan("Patient", 2, 10), plan("Observation", 3, 0)...)
	mustAddUnits(t, ctx, us, "job-u", units)
	for _, u := range units {
		if u.JobID != "job-u" || u.State != bulkexport.UnitPending || u.Version != 1 || u.LeaseOwner != "" || u.Attempts != 0 || u.Fence != 0 {
			t.Errorf("AddUnits wrote back %+v; want JobID job-u, pending, Version 1, no lease, attempts or fence", u)
		}
	}
	got := mustUnits(t, ctx, us, "job-u")
	want := []string{"job-u/Observation.p0001", "job-u/Observation.p0002", "job-u/Observation.p0003", "job-u/Patient.p0001", "job-u/Patient.p0002"}
	if !reflect.DeepEqual(unitKeys(got), want) {
		t.Fatalf("Units = %v, want %v", unitKeys(got), want)
	}
	assertUnit(t, "stored unit", units[2], got[0])
	// Copies out: changing what Units returned changes nothing stored.
	got[0].State = bulkexport.UnitDone
	got[0].Output = append(got[0].Output, bulkexport.File{Name: "x"})
	assertUnit(t, "stored unit after the caller scribbled", units[2], mustUnits(t, ctx, us, "job-u")[0])
}

func unitAddOnce(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	runningJob(t, ctx, s, "job-u", baseTime())
	mustAddUnits(t, ctx, us, "job-u", plan("Patient", 2, 0))
	err := us.AddUnits(ctx, "job-u", plan("Observation", 2, 2))
	if !errors.Is(err, bulkexport.ErrAlreadyExists) {
		t.Fatalf("second AddUnits: error = %v, want ErrAlreadyExists", err)
	}
	if got := unitKeys(mustUnits(t, ctx, us, "job-u")); !reflect.DeepEqual(got, []string{"job-u/Patient.p0001", "job-u/Patient.p0002"}) {
		t.Fatalf("Units after a refused AddUnits = %v", got)
	}
}

func unitAddRefused(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	base := baseTime()
	if err := us.AddUnits(ctx, "no-such-job", plan("Patient", 1, 0)); !errors.Is(err, bulkexport.ErrNotFound) {
		t.Errorf("AddUnits of a missing job: error = %v, want ErrNotFound", err)
	}
	for _, st := range []jobState{completed, failed, cancelled} {
		id := "job-" + string(st)
		createIn(t, ctx, s, newJob(id, "alice", base), st)
		if err := us.AddUnits(ctx, id, plan("Patient", 1, 0)); !errors.Is(err, bulkexport.ErrInvalidTransition) {
			t.Errorf("AddUnits of a %s job: error = %v, want ErrInvalidTransition", st, err)
		}
		if got := mustUnits(t, ctx, us, id); len(got) != 0 {
			t.Errorf("a %s job has units %v after a refused AddUnits", st, unitKeys(got))
		}
	}
	runningJob(t, ctx, s, "job-u", base)
	dup := plan("Patient", 2, 0)
	dup[1].Key = dup[0].Key
	bad := plan("Patient", 2, 0)
	bad[1].Key = "../x"
	for name, units := range map[string][]*unit{"no units": nil, "a key twice": dup, "an invalid key": bad} {
		if err := us.AddUnits(ctx, "job-u", units); err == nil {
			t.Errorf("AddUnits with %s: no error", name)
		}
	}
	if got := mustUnits(t, ctx, us, "job-u"); len(got) != 0 {
		t.Errorf("refused plans left units %v", unitKeys(got))
	}
}

func unitClaimFields(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	base := baseTime()
	runningJob(t, ctx, s, "job-u", base)
	units := plan("Patient", 1, 0)
	mustAddUnits(t, ctx, us, "job-u", units)
	got := mustClaimUnit(t, ctx, us, "worker-1", base, 5*time.Minute)
	want := units[0].Clone()
	want.State = bulkexport.UnitRunning
	want.LeaseOwner = "worker-1"
	want.LeaseExpiresAt = base.Add(5 * time.Minute)
	want.Attempts = 1
	want.Version = 2
	want.Fence = 2
	assertUnit(t, "ClaimUnit result", want, got)
	assertUnit(t, "stored unit after ClaimUnit", got, mustUnits(t, ctx, us, "job-u")[0])
}

func unitClaimOrder(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	base := baseTime()
	// Pending units in the order they were added (job by job, then the
	// slice's order, whatever the keys and Seq), then expired ones.
	runningJob(t, ctx, s, "job-b", base)
	runningJob(t, ctx, s, "job-a", base.Add(-time.Hour))
	mustAddUnits(t, ctx, us, "job-b", []*unit{{Key: "z", Type: "Patient", Seq: 0}, {Key: "a", Type: "Patient", Seq: 1}})
	mustAddUnits(t, ctx, us, "job-a", []*unit{{Key: "m", Type: "Patient", Seq: 0}})
	var got []string
	for range 3 {
		u := mustClaimUnit(t, ctx, us, "worker-1", base, time.Minute)
		got = append(got, u.JobID+"/"+u.Key)
	}
	if want := []string{"job-b/z", "job-b/a", "job-a/m"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("claim order = %v, want %v", got, want)
	}
	wantNoUnit(t, ctx, us, "worker-2", base)
	// All three expire; the earliest expiry is claimed first. Renew two of
	// them to later ends.
	units := map[string]*unit{}
	for _, id := range []string{"job-a", "job-b"} {
		for _, u := range mustUnits(t, ctx, us, id) {
			units[u.JobID+"/"+u.Key] = u
		}
	}
	for key, d := range map[string]time.Duration{"job-b/z": 3 * time.Minute, "job-a/m": 2 * time.Minute} {
		u := units[key]
		u.LeaseExpiresAt = base.Add(d)
		if err := us.UpdateUnit(ctx, u); err != nil {
			t.Fatalf("UpdateUnit(%s): %v", key, err)
		}
	}
	got = got[:0]
	for range 3 {
		u := mustClaimUnit(t, ctx, us, "worker-2", base.Add(time.Hour), time.Minute)
		got = append(got, u.JobID+"/"+u.Key)
	}
	if want := []string{"job-b/a", "job-a/m", "job-b/z"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("expired claim order = %v, want %v", got, want)
	}
}

func unitLiveLease(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	base := baseTime()
	runningJob(t, ctx, s, "job-u", base)
	mustAddUnits(t, ctx, us, "job-u", plan("Patient", 1, 0))
	first := mustClaimUnit(t, ctx, us, "worker-1", base, time.Minute)
	for _, at := range []time.Duration{0, time.Second, time.Minute} {
		wantNoUnit(t, ctx, us, "worker-2", base.Add(at))
	}
	assertUnit(t, "stored unit", first, mustUnits(t, ctx, us, "job-u")[0])
}

func unitExpiredLease(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	base := baseTime()
	runningJob(t, ctx, s, "job-u", base)
	mustAddUnits(t, ctx, us, "job-u", plan("Patient", 1, 0))
	stale := mustClaimUnit(t, ctx, us, "worker-1", base, time.Minute)
	now := base.Add(time.Minute + time.Millisecond)
	got := mustClaimUnit(t, ctx, us, "worker-2", now, 2*time.Minute)
	want := stale.Clone()
	want.LeaseOwner = "worker-2"
	want.LeaseExpiresAt = now.Add(2 * time.Minute)
	want.Attempts = 2
	want.Version = 3
	want.Fence = 3
	assertUnit(t, "re-claimed unit", want, got)
	wantNoUnit(t, ctx, us, "worker-3", now)
	stale.Written = 99
	if err := us.UpdateUnit(ctx, stale); !errors.Is(err, bulkexport.ErrConflict) {
		t.Errorf("UpdateUnit by the worker whose lease expired: error = %v, want ErrConflict", err)
	}
}

func unitUpdate(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	base := baseTime()
	runningJob(t, ctx, s, "job-u", base)
	mustAddUnits(t, ctx, us, "job-u", plan("Observation", 2, 0))
	u := mustClaimUnit(t, ctx, us, "worker-1", base, time.Minute)
	u.Checkpoint = json.RawMessage(`{"cursor":"k-100","seq":[2,0,1]}`)
	u.Output = []bulkexport.File{{Type: "Observation", Name: "Observation.p0001.000001.c2.ndjson", Count: 1000, Size: 123456}}
	u.Errors = []bulkexport.File{{Type: "OperationOutcome", Name: "Observation.p0001.error.000001.c2.ndjson", Count: 1, Size: 99}}
	u.Written, u.Estimate = 1000, 5000
	u.UpdatedAt = base.Add(time.Second)
	u.LeaseExpiresAt = base.Add(2 * time.Minute)
	if err := us.UpdateUnit(ctx, u); err != nil {
		t.Fatalf("UpdateUnit: %v", err)
	}
	if u.Version != 3 {
		t.Errorf("UpdateUnit wrote back Version %d, want 3", u.Version)
	}
	assertUnit(t, "stored unit", u, mustUnits(t, ctx, us, "job-u")[0])
	u.State = bulkexport.UnitFailed
	u.Failure = &bulkexport.Failure{Status: 500, Outcome: fhirbulk.NewOutcome(fhirbulk.SeverityFatal, fhirbulk.IssueProcessing, "the source failed")}
	u.LeaseOwner, u.LeaseExpiresAt = "", time.Time{}
	if err := us.UpdateUnit(ctx, u); err != nil {
		t.Fatalf("UpdateUnit to failed: %v", err)
	}
	assertUnit(t, "failed unit", u, mustUnits(t, ctx, us, "job-u")[0])
	// The other unit is untouched.
	if other := mustUnits(t, ctx, us, "job-u")[1]; other.State != bulkexport.UnitPending || other.Version != 1 {
		t.Errorf("the other unit changed: %+v", other)
	}
}

func unitUpdateRefused(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	base := baseTime()
	runningJob(t, ctx, s, "job-u", base)
	mustAddUnits(t, ctx, us, "job-u", plan("Patient", 2, 0))
	pending := mustUnits(t, ctx, us, "job-u")[1]
	u := mustClaimUnit(t, ctx, us, "worker-1", base, time.Minute)
	before := u.Clone()
	cases := []struct {
		name string
		edit func(*unit)
		want error
	}{
		{"stale version", func(x *unit) { x.Version-- }, bulkexport.ErrConflict},
		{"missing unit", func(x *unit) { x.Key = "Patient.p0099" }, bulkexport.ErrNotFound},
		{"missing job", func(x *unit) { x.JobID = "no-such-job" }, bulkexport.ErrNotFound},
		{"closing", func(x *unit) { x.State = bulkexport.UnitClosed }, bulkexport.ErrInvalidTransition},
		{"invalid state", func(x *unit) { x.State = "finished" }, bulkexport.ErrInvalidTransition},
		{"type changed", func(x *unit) { x.Type = "Observation" }, bulkexport.ErrInvalidTransition},
		{"partition changed", func(x *unit) { x.Partition = "other" }, bulkexport.ErrInvalidTransition},
	}
	for _, c := range cases {
		x := u.Clone()
		c.edit(x)
		if err := us.UpdateUnit(ctx, x); !errors.Is(err, c.want) {
			t.Errorf("UpdateUnit with %s: error = %v, want %v", c.name, err, c.want)
		}
	}
	// A pending unit only starts running through a claim... or an update
	// that moves it to running; it cannot end done without running.
	p := pending.Clone()
	p.State = bulkexport.UnitDone
	if err := us.UpdateUnit(ctx, p); !errors.Is(err, bulkexport.ErrInvalidTransition) {
		t.Errorf("UpdateUnit pending → done: error = %v, want ErrInvalidTransition", err)
	}
	// Nothing leaves done.
	u.State = bulkexport.UnitDone
	if err := us.UpdateUnit(ctx, u); err != nil {
		t.Fatalf("UpdateUnit to done: %v", err)
	}
	for _, st := range []bulkexport.UnitState{bulkexport.UnitRunning, bulkexport.UnitPending, bulkexport.UnitFailed} {
		x := u.Clone()
		x.State = st
		if err := us.UpdateUnit(ctx, x); !errors.Is(err, bulkexport.ErrInvalidTransition) {
			t.Errorf("UpdateUnit done → %s: error = %v, want ErrInvalidTransition", st, err)
		}
	}
	before.State, before.Version = bulkexport.UnitDone, u.Version
	assertUnit(t, "stored unit after refused updates", before, mustUnits(t, ctx, us, "job-u")[0])
}

func unitJobEndCloses(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	base := baseTime()
	for _, end := range []jobState{completed, failed, cancelled} {
		t.Run(string(end), func(t *testing.T) {
			id := "job-" + string(end)
			j := runningJob(t, ctx, s, id, base)
			mustAddUnits(t, ctx, us, id, plan("Patient", 3, 0))
			held := mustClaimUnit(t, ctx, us, "worker-1", base, time.Minute)
			done := mustClaimUnit(t, ctx, us, "worker-1", base, time.Minute)
			done.State = bulkexport.UnitDone
			if err := us.UpdateUnit(ctx, done); err != nil {
				t.Fatalf("UpdateUnit to done: %v", err)
			}
			j.State = end
			if end == failed {
				j.Failure = &bulkexport.Failure{Status: 500, Outcome: fhirbulk.NewOutcome(fhirbulk.SeverityFatal, fhirbulk.IssueException, "x")}
			}
			mustUpdate(t, ctx, s, j)
			wantNoUnit(t, ctx, us, "worker-2", base.Add(time.Hour))
			got := mustUnits(t, ctx, us, id)
			states := []bulkexport.UnitState{got[0].State, got[1].State, got[2].State}
			want := []bulkexport.UnitState{bulkexport.UnitClosed, bulkexport.UnitDone, bulkexport.UnitClosed}
			if !reflect.DeepEqual(states, want) {
				t.Fatalf("unit states after the job ended = %v, want %v", states, want)
			}
			if got[0].LeaseOwner != "" || !got[0].LeaseExpiresAt.IsZero() || got[0].Version != held.Version+1 {
				t.Errorf("closed unit = %+v; want no lease and Version %d", got[0], held.Version+1)
			}
			if got[1].Version != done.Version {
				t.Errorf("the done unit's Version moved from %d to %d", done.Version, got[1].Version)
			}
			held.Written = 5
			if err := us.UpdateUnit(ctx, held); !errors.Is(err, bulkexport.ErrConflict) {
				t.Errorf("UpdateUnit by the holder of a closed unit: error = %v, want ErrConflict", err)
			}
		})
	}
}

func unitDeleteRemoves(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	base := baseTime()
	runningJob(t, ctx, s, "job-u", base)
	mustAddUnits(t, ctx, us, "job-u", plan("Patient", 2, 0))
	if err := s.Delete(ctx, "job-u"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if got := mustUnits(t, ctx, us, "job-u"); len(got) != 0 {
		t.Fatalf("units after Delete = %v", unitKeys(got))
	}
	wantNoUnit(t, ctx, us, "worker-1", base)
	// A new job with the same id starts with no plan.
	runningJob(t, ctx, s, "job-u", base)
	mustAddUnits(t, ctx, us, "job-u", plan("Observation", 1, 0))
}

func unitClaimEachOnce(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
	us := unitStore(t, s)
	base := baseTime()
	const jobs, perJob = 4, 10
	for i := range jobs {
		id := fmt.Sprintf("job-%d", i)
		runningJob(t, ctx, s, id, base)
		mustAddUnits(t, ctx, us, id, plan("Observation", perJob, 0))
	}
	var (
		mu     sync.Mutex
		claims = map[string]string{}
		wg     sync.WaitGroup
	)
	start := make(chan struct{})
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			worker := fmt.Sprintf("worker-%d", g)
			for range jobs*perJob + 1 {
				u, err := us.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: worker, Now: base, Lease: time.Hour})
				if errors.Is(err, bulkexport.ErrNoJob) {
					return
				}
				if err != nil {
					t.Errorf("%s: ClaimUnit: %v", worker, err)
					return
				}
				key := u.JobID + "/" + u.Key
				mu.Lock()
				if prev, ok := claims[key]; ok {
					t.Errorf("unit %s claimed by %s and %s", key, prev, worker)
				}
				claims[key] = worker
				mu.Unlock()
			}
		}()
	}
	close(start)
	wg.Wait()
	if len(claims) != jobs*perJob {
		t.Errorf("%d units claimed, want %d", len(claims), jobs*perJob)
	}
}
