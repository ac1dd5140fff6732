package pgstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/bulkfhir/bulkexport"
)

var _ bulkexport.UnitStore = (*Store)(nil)

// unitsSuffix names the units table after the jobs table. With the claim
// index's suffix ("_units_claim") it stays within maxTableLen's budget.
const unitsSuffix = "_units"

// unitQueries are the statements of the UnitStore methods, and the unit
// closing that Update adds when a job ends.
type unitQueries struct {
	lockJob, hasUnits, insert, claim, update, get, list, closeUnits string
}

func buildUnitQueries(jobs, units string) unitQueries {
	const leaseEndJSON = `to_char(l.lease_end AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')`
	return unitQueries{
		// AddUnits locks the job row against other AddUnits and against
		// the Update that would end the job, and reads its state.
		lockJob:  `SELECT state FROM ` + jobs + ` WHERE id = $1 FOR NO KEY UPDATE`,
		hasUnits: `SELECT EXISTS (SELECT 1 FROM ` + units + ` WHERE job_id = $1)`,
		// One INSERT for the whole plan; ORDER BY the position in the
		// arrays, so that added follows the order of the plan.
		insert: `INSERT INTO ` + units + ` (job_id, key, seq, state, version, lease_owner, attempts, claimable_after, data)
SELECT $1, x.key, x.seq, 'pending', 1, '', 0, '-infinity', x.data::jsonb
FROM unnest($2::text[], $3::integer[], $4::text[]) WITH ORDINALITY AS x(key, seq, data, n)
ORDER BY x.n`,
		// The claim, in the style of Claim: c takes the front of the claim
		// index (claimable_after before now, in (claimable_after, added)
		// order) and locks it, passing over rows that other claims hold;
		// the UPDATE moves it to running and patches data to match.
		//
		// The lease clock is Claim's: the database's now() unless the
		// caller's is given ($1 its now rounded up, $3 the lease's end, $4
		// that end as JSON text). $5 is the lease in microseconds. The now
		// expression is written out in c, not taken from a CTE, so that it
		// is an index condition of the claim index's range scan.
		claim: `WITH c AS (
	SELECT job_id, key FROM ` + units + `
	WHERE claimable_after IS NOT NULL AND claimable_after < COALESCE($1::timestamptz, now())
	ORDER BY claimable_after, added
	LIMIT 1
	FOR UPDATE SKIP LOCKED
)
UPDATE ` + units + ` AS u SET
	state = 'running',
	lease_owner = $2,
	lease_expires_at = l.lease_end,
	claimable_after = l.lease_end,
	attempts = u.attempts + 1,
	version = u.version + 1,
	data = u.data || jsonb_build_object(
		'state', 'running',
		'leaseOwner', $2::text,
		'leaseExpiresAt', COALESCE($4::text, ` + leaseEndJSON + `),
		'attempts', u.attempts + 1,
		'version', u.version + 1,
		'fence', u.version + 1)
FROM c, (SELECT COALESCE($3::timestamptz, now() + $5::bigint * interval '1 microsecond') AS lease_end) AS l
WHERE u.job_id = c.job_id AND u.key = c.key
RETURNING u.data`,
		// The compare-and-set: version, the states the new state may be
		// reached from ($4), and the identity (seq, type, partition) are
		// checked at once. A running unit without a lease gets Go's zero
		// time as claimable_after: expired, but after every pending unit.
		update: `UPDATE ` + units + ` SET state = $6, version = version + 1, lease_owner = $7, lease_expires_at = $8, attempts = $9,
	claimable_after = CASE $6::text WHEN 'pending' THEN '-infinity'::timestamptz
		WHEN 'running' THEN COALESCE($8::timestamptz, '0001-01-01 00:00:00+00'::timestamptz) END,
	data = $10
WHERE job_id = $1 AND key = $2 AND version = $3 AND state = ANY($4::text[]) AND seq = $5
	AND data->>'type' = $11 AND COALESCE(data->>'partition', '') = $12`,
		get:  `SELECT data FROM ` + units + ` WHERE job_id = $1 AND key = $2`,
		list: `SELECT data FROM ` + units + ` WHERE job_id = $1 ORDER BY seq, key`,
		// Run by Update in the transaction that ends the job.
		closeUnits: `UPDATE ` + units + ` SET state = 'closed', lease_owner = '', lease_expires_at = NULL, claimable_after = NULL,
	version = version + 1,
	data = (data || jsonb_build_object('state', 'closed', 'version', version + 1)) - 'leaseOwner' - 'leaseExpiresAt'
WHERE job_id = $1 AND state IN ('pending', 'running')`,
	}
}

// unitFromStates returns the states from which UpdateUnit may move a unit
// to to.
func unitFromStates(to bulkexport.UnitState) []string {
	var out []string
	for _, s := range []bulkexport.UnitState{bulkexport.UnitPending, bulkexport.UnitRunning, bulkexport.UnitDone, bulkexport.UnitFailed, bulkexport.UnitClosed} {
		if bulkexport.CheckUnitTransition(s, to) == nil {
			out = append(out, string(s))
		}
	}
	return out
}

// encodeUnit returns u's stored form, with the given Version and its times
// as the store keeps them, and that copy. u is not modified.
func encodeUnit(u *bulkexport.Unit, version int64) (*bulkexport.Unit, []byte, error) {
	c := *u // shallow: only value fields change below
	c.Version = version
	c.LeaseExpiresAt = storedTime(c.LeaseExpiresAt)
	c.UpdatedAt = storedTime(c.UpdatedAt)
	data, err := json.Marshal(&c)
	if err != nil {
		return nil, nil, fmt.Errorf("pgstore: encode unit %s/%s: %w", u.JobID, u.Key, err)
	}
	return &c, data, nil
}

func decodeUnit(what string, data []byte) (*bulkexport.Unit, error) {
	var u bulkexport.Unit
	if err := json.Unmarshal(data, &u); err != nil {
		return nil, fmt.Errorf("pgstore: %s: %w", what, err)
	}
	return &u, nil
}

// AddUnits implements bulkexport.UnitStore in one transaction: it locks
// the job's row (FOR NO KEY UPDATE, which an Update of the job and other
// AddUnits wait for), checks its state and that it has no units, and
// inserts the plan with one INSERT.
func (s *Store) AddUnits(ctx context.Context, jobID string, units []*bulkexport.Unit) error {
	if err := bulkexport.CheckUnits(units); err != nil {
		return err
	}
	keys := make([]string, len(units))
	seqs := make([]int, len(units))
	docs := make([]string, len(units))
	for i, u := range units {
		c := u.Clone()
		bulkexport.PrepareUnits(jobID, []*bulkexport.Unit{c})
		_, data, err := encodeUnit(c, 1)
		if err != nil {
			return err
		}
		keys[i], seqs[i], docs[i] = c.Key, c.Seq, string(data)
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var state string
		err := tx.QueryRow(ctx, s.uq.lockJob, jobID).Scan(&state)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("pgstore: job %s: %w", jobID, bulkexport.ErrNotFound)
		}
		if err != nil {
			return err
		}
		if bulkexport.JobState(state).Terminal() {
			return fmt.Errorf("pgstore: job %s is %s: %w", jobID, state, bulkexport.ErrInvalidTransition)
		}
		var has bool
		if err := tx.QueryRow(ctx, s.uq.hasUnits, jobID).Scan(&has); err != nil {
			return err
		}
		if has {
			return fmt.Errorf("pgstore: job %s has units: %w", jobID, bulkexport.ErrAlreadyExists)
		}
		_, err = tx.Exec(ctx, s.uq.insert, jobID, keys, seqs, docs)
		return err
	})
	switch {
	case errors.Is(err, bulkexport.ErrNotFound), errors.Is(err, bulkexport.ErrInvalidTransition), errors.Is(err, bulkexport.ErrAlreadyExists):
		return err
	case err != nil:
		return fmt.Errorf("pgstore: add units of job %s: %w", jobID, err)
	}
	bulkexport.PrepareUnits(jobID, units)
	return nil
}

// ClaimUnit implements bulkexport.UnitStore in one statement that locks
// the front of the claim index with FOR UPDATE SKIP LOCKED, as Claim does
// for jobs. Its lease clock is Claim's: the database server's, or p.Now
// with Options.CallerClock.
func (s *Store) ClaimUnit(ctx context.Context, p bulkexport.ClaimParams) (*bulkexport.Unit, error) {
	var nowArg, endArg, endJSON any
	if s.callerClock {
		end := storedTime(p.Now.Add(p.Lease))
		nowArg, endArg, endJSON = ceilMicro(p.Now), end, jsonTime(end)
	}
	var data []byte
	err := s.pool.QueryRow(ctx, s.uq.claim, nowArg, p.Worker, endArg, endJSON, p.Lease.Microseconds()).Scan(&data)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, bulkexport.ErrNoJob
	}
	if err != nil {
		return nil, fmt.Errorf("pgstore: claim unit: %w", err)
	}
	return decodeUnit("claimed unit", data)
}

// UpdateUnit implements bulkexport.UnitStore. The happy path is one
// compare-and-set statement; only when it changes no row does a second
// query read the unit, to tell ErrNotFound, ErrConflict and
// ErrInvalidTransition apart.
func (s *Store) UpdateUnit(ctx context.Context, u *bulkexport.Unit) error {
	if u == nil {
		return errors.New("pgstore: UpdateUnit: nil unit")
	}
	if from := unitFromStates(u.State); len(from) > 0 {
		c, data, err := encodeUnit(u, u.Version+1)
		if err != nil {
			return err
		}
		tag, err := s.pool.Exec(ctx, s.uq.update, u.JobID, u.Key, u.Version, from, c.Seq,
			string(c.State), c.LeaseOwner, nullTime(c.LeaseExpiresAt), c.Attempts, string(data), c.Type, c.Partition)
		if err != nil {
			return fmt.Errorf("pgstore: update unit %s/%s: %w", u.JobID, u.Key, err)
		}
		if tag.RowsAffected() == 1 {
			u.Version++
			return nil
		}
	}
	var data []byte
	err := s.pool.QueryRow(ctx, s.uq.get, u.JobID, u.Key).Scan(&data)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("pgstore: unit %s/%s: %w", u.JobID, u.Key, bulkexport.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("pgstore: update unit %s/%s: %w", u.JobID, u.Key, err)
	}
	stored, err := decodeUnit("unit "+u.JobID+"/"+u.Key, data)
	if err != nil {
		return err
	}
	if err := bulkexport.CheckUnitUpdate(stored, u); err != nil {
		return fmt.Errorf("pgstore: %w", err)
	}
	return fmt.Errorf("pgstore: unit %s/%s: changed concurrently: %w", u.JobID, u.Key, bulkexport.ErrConflict)
}

// Units implements bulkexport.UnitStore.
func (s *Store) Units(ctx context.Context, jobID string) ([]*bulkexport.Unit, error) {
	rows, err := s.pool.Query(ctx, s.uq.list, jobID)
	if err != nil {
		return nil, fmt.Errorf("pgstore: units of job %s: %w", jobID, err)
	}
	out := []*bulkexport.Unit{}
	var data []byte
	_, err = pgx.ForEachRow(rows, []any{&data}, func() error {
		u, err := decodeUnit("unit of job "+jobID, data)
		if err != nil {
			return err
		}
		out = append(out, u)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("pgstore: units of job %s: %w", jobID, err)
	}
	return out, nil
}

// updateEnding is Update for a job that moves to a final state: the
// compare-and-set and the closing of the job's units that are not final,
// in one transaction. The second statement's snapshot is taken after the
// first holds the job's row, so it sees every unit that an AddUnits
// committed before.
func (s *Store) updateEnding(ctx context.Context, job *bulkexport.Job, args []any) (int64, error) {
	var n int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, s.updateSQL, args...)
		if err != nil {
			return err
		}
		if n = tag.RowsAffected(); n != 1 {
			return nil
		}
		_, err = tx.Exec(ctx, s.uq.closeUnits, job.ID)
		return err
	})
	return n, err
}
