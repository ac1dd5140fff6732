package pgstore

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
)

// dbNow reads the database server's clock.
func dbNow(t *testing.T, s *Store) time.Time {
	t.Helper()
	var now time.Time
	require.NoError(t, s.pool.QueryRow(context.Background(), "SELECT now()").Scan(&now))
	return now
}

// TestDatabaseClock: by default leases are judged and set by the
// database's clock, whatever clock the claiming worker has: a replica
// whose clock runs years ahead cannot take a live lease, and one whose
// clock runs years behind still sets a lease that expires on time.
func TestDatabaseClock(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	s, err := New(pool, &Options{Schema: freshSchema(t, pool)})
	require.NoError(t, err)
	require.NoError(t, s.Migrate(ctx))

	past := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	future := time.Date(2101, 2, 3, 4, 5, 6, 0, time.UTC)
	require.NoError(t, s.Create(ctx, testJob("job-clock", "alice", baseTime()), bulkexport.CreateParams{}))

	before := dbNow(t, s)
	j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "slow-clock", Lease: time.Hour, Now: past})
	require.NoError(t, err)
	after := dbNow(t, s)
	// now() is the statement's transaction start: between the two reads.
	require.False(t, j.LeaseExpiresAt.Before(before.Add(time.Hour)), "lease end %s before db now %s + 1h", j.LeaseExpiresAt, before)
	require.False(t, j.LeaseExpiresAt.After(after.Add(time.Hour)), "lease end %s after db now %s + 1h", j.LeaseExpiresAt, after)
	require.Equal(t, j.Version, j.Fence)
	stored, err := s.Get(ctx, "job-clock")
	require.NoError(t, err)
	require.True(t, stored.LeaseExpiresAt.Equal(j.LeaseExpiresAt), "stored lease %s, claimed %s", stored.LeaseExpiresAt, j.LeaseExpiresAt)

	// A replica whose clock is a century ahead sees a live lease.
	_, err = s.Claim(ctx, bulkexport.ClaimParams{Worker: "fast-clock", Lease: time.Hour, Now: future})
	require.ErrorIs(t, err, bulkexport.ErrNoJob)

	// The holder renews on the store's timebase; once that renewal has
	// passed by the database's clock, a replica with a clock in the past
	// takes the job over.
	j.LeaseExpiresAt = dbNow(t, s).Add(-time.Second)
	require.NoError(t, s.Update(ctx, j))
	got, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "slow-clock-2", Lease: time.Minute, Now: past})
	require.NoError(t, err)
	require.Equal(t, "job-clock", got.ID)
	require.Equal(t, "slow-clock-2", got.LeaseOwner)
	require.Greater(t, got.Fence, j.Fence)
}
