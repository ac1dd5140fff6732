package sqlitestore

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
)

// unitPlan returns n units of typ.
func unitPlan(typ string, n int) []*bulkexport.Unit {
	out := make([]*bulkexport.Unit, n)
	for i := range out {
		out[i] = &bulkexport.Unit{Key: fmt.Sprintf("%s.p%04d", typ, i+1), Type: typ, Partition: fmt.Sprintf("r%d", i), Seq: i}
	}
	return out
}

// TestUnitQueryPlans: ClaimUnit reads the front of the claim index, before
// and after ANALYZE, with thousands of final units and units under live
// leases in the table; the per-job statements use the (job_id, key) index.
func TestUnitQueryPlans(t *testing.T) {
	t.Parallel()
	s, db := newStore(t, nil)
	ctx := context.Background()
	base := time.Now()
	// 20 jobs of 200 units: 18 jobs completed (their units closed), one
	// running with every unit under a live lease, one with pending units.
	for i := range 20 {
		id := fmt.Sprintf("job-%02d", i)
		j := &bulkexport.Job{ID: id, Owner: "alice", State: bulkexport.StateQueued, CreatedAt: base}
		require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
		require.NoError(t, s.AddUnits(ctx, id, unitPlan("Observation", 200)))
		switch {
		case i < 18:
			j.State = bulkexport.StateRunning
			require.NoError(t, s.Update(ctx, j))
			j.State = bulkexport.StateCompleted
			require.NoError(t, s.Update(ctx, j))
		case i == 18:
			for range 200 {
				_, err := s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "w", Now: base, Lease: time.Hour})
				require.NoError(t, err)
			}
		}
	}
	scan := regexp.MustCompile(`^SCAN "?bulkexport_jobs_units"?( |$)`)
	for _, analyze := range []bool{false, true} {
		if analyze {
			_, err := db.Exec("ANALYZE")
			require.NoError(t, err)
		}
		check := func(name, q string, args []any, index string) {
			plan := queryPlan(t, db, q, args...)
			t.Logf("%s (analyze %v):\n  %s", name, analyze, strings.Join(plan, "\n  "))
			for _, line := range plan {
				require.False(t, scan.MatchString(line), "%s: full scan of the units table: %q", name, line)
			}
			require.Contains(t, strings.Join(plan, "\n"), index, "%s does not use %s", name, index)
		}
		now := ceilMicros(base)
		check("claim unit", s.uq.claim, []any{"w", 1, 1, "w", "x", now}, "COVERING INDEX bulkexport_jobs_units_claim_idx (claimable_after>? AND claimable_after<?)")
		check("units", s.uq.list, []any{"job-19"}, "sqlite_autoindex_bulkexport_jobs_units_1 (job_id=?)")
		check("close units", s.uq.closeUnits, []any{"job-19"}, "sqlite_autoindex_bulkexport_jobs_units_1 (job_id=?)")
		check("delete units", s.uq.deleteUnits, []any{"job-19"}, "sqlite_autoindex_bulkexport_jobs_units_1 (job_id=?)")
		check("update unit", s.uq.update[bulkexport.UnitRunning], make([]any, 15), "sqlite_autoindex_bulkexport_jobs_units_1 (job_id=? AND key=?)")
	}
	// And the claim takes job-19's first unit, past the closed units and
	// the live leases.
	u, err := s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "w", Now: base, Lease: time.Hour})
	require.NoError(t, err)
	require.Equal(t, "job-19/Observation.p0001", u.JobID+"/"+u.Key)
}

// TestUnitColumnsFollowData checks, after every kind of write, that the
// units table's columns say what data says.
func TestUnitColumnsFollowData(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, db := newStore(t, nil)
	base := time.Date(2030, 1, 2, 3, 4, 5, 678901234, time.FixedZone("X", -7*3600))
	check := func(what string) {
		t.Helper()
		var mismatches int
		require.NoError(t, db.QueryRow(`SELECT COUNT(*) FROM bulkexport_jobs_units WHERE
			job_id IS NOT data->>'$.jobId' OR key IS NOT data->>'$.key' OR seq IS NOT data->>'$.seq' OR
			state IS NOT data->>'$.state' OR version IS NOT data->>'$.version' OR
			lease_owner IS NOT COALESCE(data->>'$.leaseOwner', '') OR attempts IS NOT COALESCE(data->>'$.attempts', 0) OR
			claimable_after IS NOT (CASE state WHEN 'pending' THEN -9223372036854775808 WHEN 'running' THEN lease_expires_at END)`).Scan(&mismatches))
		require.Zero(t, mismatches, what)
		units, err := s.Units(ctx, "job-1")
		require.NoError(t, err)
		for _, u := range units {
			var lease int64
			require.NoError(t, db.QueryRow(`SELECT lease_expires_at FROM bulkexport_jobs_units WHERE job_id = ? AND key = ?`, u.JobID, u.Key).Scan(&lease))
			require.Equal(t, u.LeaseExpiresAt.UnixMicro(), lease, what)
		}
	}
	j := &bulkexport.Job{ID: "job-1", Owner: "alice", State: bulkexport.StateQueued, CreatedAt: base}
	require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	require.NoError(t, s.AddUnits(ctx, "job-1", unitPlan("Patient", 3)))
	check("after AddUnits")
	u, err := s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: base, Lease: time.Minute})
	require.NoError(t, err)
	check("after ClaimUnit")
	require.Equal(t, base.Add(time.Minute).UTC().Truncate(time.Microsecond), u.LeaseExpiresAt)
	u.LeaseExpiresAt = base.Add(2 * time.Minute)
	u.Written = 10
	require.NoError(t, s.UpdateUnit(ctx, u))
	check("after UpdateUnit")
	u.State = bulkexport.UnitPending // a hand-back
	u.LeaseOwner, u.LeaseExpiresAt = "", time.Time{}
	require.NoError(t, s.UpdateUnit(ctx, u))
	check("after a hand-back")
	_, err = s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "worker-2", Now: base, Lease: time.Minute})
	require.NoError(t, err)
	j.State = bulkexport.StateCancelled
	require.NoError(t, s.Update(ctx, j))
	check("after the job ended")
	units, err := s.Units(ctx, "job-1")
	require.NoError(t, err)
	for _, u := range units {
		require.Equal(t, bulkexport.UnitClosed, u.State)
		require.Empty(t, u.LeaseOwner)
		require.True(t, u.LeaseExpiresAt.IsZero())
	}
}

// TestUnitsCancelledWhileWaiting: the unit writes, like the job writes,
// give up waiting for the store's write turn when their context ends.
func TestUnitsCancelledWhileWaiting(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t, nil)
	ctx := context.Background()
	require.NoError(t, s.Create(ctx, &bulkexport.Job{ID: "job-1", State: bulkexport.StateQueued}, bulkexport.CreateParams{}))
	require.NoError(t, s.AddUnits(ctx, "job-1", unitPlan("Patient", 1)))
	s.writes <- struct{}{} // another write is under way
	defer func() { <-s.writes }()
	for name, call := range map[string]func(context.Context) error{
		"AddUnits": func(ctx context.Context) error { return s.AddUnits(ctx, "job-1", unitPlan("Observation", 1)) },
		"ClaimUnit": func(ctx context.Context) error {
			_, err := s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "w", Now: time.Now(), Lease: time.Minute})
			return err
		},
		"UpdateUnit": func(ctx context.Context) error {
			return s.UpdateUnit(ctx, &bulkexport.Unit{JobID: "job-1", Key: "Patient.p0001", Type: "Patient", Partition: "r0", State: bulkexport.UnitPending, Version: 1})
		},
		"Update to final": func(ctx context.Context) error {
			return s.Update(ctx, &bulkexport.Job{ID: "job-1", State: bulkexport.StateCancelled, Version: 1})
		},
	} {
		cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		err := call(cctx)
		cancel()
		require.ErrorIs(t, err, context.DeadlineExceeded, name)
	}
	units, err := s.Units(ctx, "job-1")
	require.NoError(t, err)
	require.Len(t, units, 1)
	require.Equal(t, bulkexport.UnitPending, units[0].State)
}
