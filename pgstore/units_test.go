package pgstore

import (
	"context"
	"fmt"
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

// TestUnitPlansUseIndexes: with thousands of final units, units under live
// leases and a few pending ones in the table, and statistics gathered,
// ClaimUnit (by either clock) is a range scan of the claim index, and the
// statements on one job's units read the primary key; none scans the
// units table.
func TestUnitPlansUseIndexes(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	s := newTestStore(t, pool)
	base := baseTime()
	// 25 jobs of 200 units: 20 completed (their units closed), 4 running
	// with every unit under a live lease, and one whose 200 units are
	// pending.
	for i := range 25 {
		j := testJob(fmt.Sprintf("job-%02d", i), "alice", base.Add(time.Duration(i)*time.Millisecond))
		require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
		require.NoError(t, s.AddUnits(ctx, j.ID, unitPlan("Observation", 200)))
		switch {
		case i < 20:
			j.State = bulkexport.StateRunning
			require.NoError(t, s.Update(ctx, j))
			j.State = bulkexport.StateCompleted
			require.NoError(t, s.Update(ctx, j))
		case i < 24:
			for range 200 {
				_, err := s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "w", Now: base, Lease: time.Hour})
				require.NoError(t, err)
			}
		}
	}
	units := s.name + unitsSuffix
	_, err := pool.Exec(ctx, "ANALYZE "+qualify(s.schema, units))
	require.NoError(t, err)
	var counts [3]int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE state = 'closed'), count(*) FILTER (WHERE state = 'running'),
		count(*) FILTER (WHERE state = 'pending') FROM `+qualify(s.schema, units)).Scan(&counts[0], &counts[1], &counts[2]))
	require.Equal(t, [3]int{4000, 800, 200}, counts)

	end := storedTime(base.Add(time.Minute))
	plans := []struct{ name, index, plan string }{
		{"ClaimUnit, caller's clock", units + "_claim",
			explain(t, pool, s.uq.claim, ceilMicro(base), "w", end, jsonTime(end), time.Minute.Microseconds())},
		{"ClaimUnit, database clock", units + "_claim",
			explain(t, pool, s.uq.claim, nil, "w", nil, nil, time.Minute.Microseconds())},
		{"Units", units + "_pkey", explain(t, pool, s.uq.list, "job-24")},
		{"close units", units + "_pkey", explain(t, pool, s.uq.closeUnits, "job-24")},
		{"UpdateUnit", units + "_pkey", explain(t, pool, s.uq.update, "job-24", "Observation.p0001", int64(1), []string{"running"}, 0,
			"running", "w", end, 1, "{}", "Observation", "r0")},
	}
	for _, p := range plans {
		t.Logf("%s plan:\n%s", p.name, p.plan)
		require.NotContains(t, p.plan, "Seq Scan", "%s scans a table", p.name)
		require.Contains(t, p.plan, "Index Scan using "+p.index+" on "+units, "%s does not use %s", p.name, p.index)
	}
	for _, p := range plans[:2] {
		require.Regexp(t, `Index Cond: \(\(claimable_after IS NOT NULL\) AND \(claimable_after < `+"|"+`Index Cond: \(claimable_after < `, p.plan,
			"%s: the now bound is not an index condition", p.name)
	}

	// And the claim takes the pending job's first unit, past the closed
	// units and the live leases.
	u, err := s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "w", Now: base, Lease: time.Minute})
	require.NoError(t, err)
	require.Equal(t, "job-24/Observation.p0001", u.JobID+"/"+u.Key)
}

// TestUnitDatabaseClock: without Options.CallerClock, ClaimUnit judges and
// sets unit leases by the database's clock, as Claim does for jobs.
func TestUnitDatabaseClock(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	s, err := New(pool, &Options{Schema: freshSchema(t, pool)})
	require.NoError(t, err)
	require.NoError(t, s.Migrate(ctx))
	past := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	future := time.Date(2101, 2, 3, 4, 5, 6, 0, time.UTC)
	require.NoError(t, s.Create(ctx, testJob("job-clock", "alice", baseTime()), bulkexport.CreateParams{}))
	require.NoError(t, s.AddUnits(ctx, "job-clock", unitPlan("Patient", 1)))

	before := dbNow(t, s)
	u, err := s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "slow-clock", Lease: time.Hour, Now: past})
	require.NoError(t, err)
	after := dbNow(t, s)
	require.False(t, u.LeaseExpiresAt.Before(before.Add(time.Hour)), "lease end %s before db now %s + 1h", u.LeaseExpiresAt, before)
	require.False(t, u.LeaseExpiresAt.After(after.Add(time.Hour)), "lease end %s after db now %s + 1h", u.LeaseExpiresAt, after)
	require.Equal(t, u.Version, u.Fence)
	stored, err := s.Units(ctx, "job-clock")
	require.NoError(t, err)
	require.True(t, stored[0].LeaseExpiresAt.Equal(u.LeaseExpiresAt), "stored lease %s, claimed %s", stored[0].LeaseExpiresAt, u.LeaseExpiresAt)

	// A replica whose clock is a century ahead sees a live lease.
	_, err = s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "fast-clock", Lease: time.Hour, Now: future})
	require.ErrorIs(t, err, bulkexport.ErrNoJob)

	// Once the lease has passed by the database's clock, a replica with a
	// clock in the past takes the unit over.
	u.LeaseExpiresAt = dbNow(t, s).Add(-time.Second)
	require.NoError(t, s.UpdateUnit(ctx, u))
	got, err := s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "slow-clock-2", Lease: time.Minute, Now: past})
	require.NoError(t, err)
	require.Equal(t, "slow-clock-2", got.LeaseOwner)
	require.Greater(t, got.Fence, u.Fence)
}

// TestUnitColumnsMatchData checks, after every kind of write, that the
// units table's columns say what data says.
func TestUnitColumnsMatchData(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	s := newTestStore(t, pool)
	units := qualify(s.schema, s.name+unitsSuffix)
	check := func(what string) {
		t.Helper()
		var mismatches int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM `+units+` WHERE
			job_id IS DISTINCT FROM data->>'jobId' OR key IS DISTINCT FROM data->>'key' OR seq IS DISTINCT FROM (data->>'seq')::int OR
			state IS DISTINCT FROM data->>'state' OR version IS DISTINCT FROM (data->>'version')::bigint OR
			lease_owner IS DISTINCT FROM COALESCE(data->>'leaseOwner', '') OR
			attempts IS DISTINCT FROM COALESCE((data->>'attempts')::int, 0) OR
			lease_expires_at IS DISTINCT FROM (data->>'leaseExpiresAt')::timestamptz OR
			claimable_after IS DISTINCT FROM (CASE state WHEN 'pending' THEN '-infinity'::timestamptz
				WHEN 'running' THEN COALESCE(lease_expires_at, '0001-01-01 00:00:00+00') END)`).Scan(&mismatches))
		require.Zero(t, mismatches, what)
	}
	base := baseTime()
	j := testJob("job-1", "alice", base)
	require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	require.NoError(t, s.AddUnits(ctx, "job-1", unitPlan("Patient", 3)))
	check("after AddUnits")
	u, err := s.ClaimUnit(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: base.Add(time.Nanosecond), Lease: time.Minute})
	require.NoError(t, err)
	check("after ClaimUnit")
	u.LeaseExpiresAt = base.Add(2*time.Minute + 500*time.Nanosecond)
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
	got, err := s.Units(ctx, "job-1")
	require.NoError(t, err)
	for _, u := range got {
		require.Equal(t, bulkexport.UnitClosed, u.State)
		require.Empty(t, u.LeaseOwner)
		require.True(t, u.LeaseExpiresAt.IsZero())
	}
}
