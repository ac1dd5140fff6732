package sqlitestore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport"
)

var _ bulkexport.UnitStore = (*Store)(nil)

// pendingClaimable is claimable_after for a pending unit: below every
// lease end, so that pending units come first in the claim index.
const pendingClaimable = math.MinInt64

// zeroMicros is micros(time.Time{}): the lease_expires_at of a unit
// without a lease.
var zeroMicros = micros(time.Time{})

// unitQueries are the statements of the UnitStore methods, written for the
// store's table.
type unitQueries struct {
	jobState, hasUnits, insertPrefix, claim, get, list, closeUnits, deleteUnits string
	// update holds the compare-and-set UPDATE for each unit state an
	// update may move to; updateFrom the states it may come from.
	update     map[bulkexport.UnitState]string
	updateFrom map[bulkexport.UnitState][]any
}

// unitStates lists every UnitState.
var unitStates = []bulkexport.UnitState{bulkexport.UnitPending, bulkexport.UnitRunning, bulkexport.UnitDone, bulkexport.UnitFailed, bulkexport.UnitClosed}

func buildUnitQueries(table string) unitQueries {
	t := `"` + table + `"`
	u := `"` + table + `_units"`
	q := unitQueries{
		jobState:     `SELECT state FROM ` + t + ` WHERE id = ?`,
		hasUnits:     `SELECT EXISTS (SELECT 1 FROM ` + u + ` WHERE job_id = ?)`,
		insertPrefix: `INSERT INTO ` + u + ` (job_id, key, seq, state, version, lease_owner, lease_expires_at, attempts, claimable_after, data) VALUES `,
		// The inner SELECT reads the front of the claim index: the first
		// entry whose claimable_after is before now. INDEXED BY keeps the
		// planner on it. SQLite runs the statement under the write lock,
		// so no other claim can take the same unit.
		claim: `UPDATE ` + u + ` SET
    state = 'running',
    lease_owner = ?,
    lease_expires_at = ?,
    claimable_after = ?,
    attempts = attempts + 1,
    version = version + 1,
    data = json_set(data,
        '$.state', 'running',
        '$.leaseOwner', ?,
        '$.leaseExpiresAt', ?,
        '$.attempts', attempts + 1,
        '$.version', version + 1,
        '$.fence', version + 1)
WHERE added = (
    SELECT added FROM ` + u + ` INDEXED BY "` + table + `_units_claim_idx"
    WHERE claimable_after IS NOT NULL AND claimable_after < ?
    ORDER BY claimable_after, added LIMIT 1
)
RETURNING data`,
		get:  `SELECT data FROM ` + u + ` WHERE job_id = ? AND key = ?`,
		list: `SELECT data FROM ` + u + ` WHERE job_id = ? ORDER BY seq, key`,
		// Closing keeps data in step with the columns: the lease keys are
		// removed, as encoding/json leaves out an empty lease.
		closeUnits: `UPDATE ` + u + ` SET
    state = 'closed',
    lease_owner = '',
    lease_expires_at = ` + fmt.Sprint(zeroMicros) + `,
    claimable_after = NULL,
    version = version + 1,
    data = json_remove(json_set(data, '$.state', 'closed', '$.version', version + 1), '$.leaseOwner', '$.leaseExpiresAt')
WHERE job_id = ? AND state IN ('pending', 'running')`,
		deleteUnits: `DELETE FROM ` + u + ` WHERE job_id = ?`,
		update:      map[bulkexport.UnitState]string{},
		updateFrom:  map[bulkexport.UnitState][]any{},
	}
	for _, to := range unitStates {
		var from []any
		for _, s := range unitStates {
			if bulkexport.CheckUnitTransition(s, to) == nil {
				from = append(from, string(s))
			}
		}
		if len(from) == 0 {
			continue
		}
		q.updateFrom[to] = from
		// The identity (Type, Partition, Seq) is checked with the version
		// and the state, so that the happy path is one statement.
		q.update[to] = `UPDATE ` + u + ` SET
    state = ?, version = version + 1, lease_owner = ?, lease_expires_at = ?, attempts = ?, claimable_after = ?, data = ?
WHERE job_id = ? AND key = ? AND version = ? AND seq = ?
    AND json_extract(data, '$.type') IS ? AND coalesce(json_extract(data, '$.partition'), '') = ?
    AND state IN (?` + strings.Repeat(", ?", len(from)-1) + `)`
	}
	return q
}

// tx runs f in a BEGIN IMMEDIATE transaction on one connection, while it
// holds the store's write turn, and commits when f returns nil.
func (s *Store) tx(ctx context.Context, f func(conn *sql.Conn) error) error {
	return s.write(ctx, func() error {
		conn, err := s.db.Conn(ctx)
		if err != nil {
			return err
		}
		defer conn.Close()
		if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
			return err
		}
		committed := false
		defer func() {
			if committed {
				return
			}
			// As in Migrate: a connection whose transaction cannot be
			// rolled back must not go back to the pool.
			if _, err := conn.ExecContext(context.WithoutCancel(ctx), "ROLLBACK"); err != nil {
				_ = conn.Raw(func(any) error { return driver.ErrBadConn })
			}
		}()
		if err := f(conn); err != nil {
			return err
		}
		if _, err := conn.ExecContext(ctx, "COMMIT"); err != nil {
			return err
		}
		committed = true
		return nil
	})
}

// unitRow is a unit as the units table's columns hold it.
type unitRow struct {
	state, leaseOwner string
	leaseExpiresAt    int64
	attempts          int64
	claimableAfter    sql.NullInt64
	data              string
}

// encodeUnit turns u into column values, with version as the stored
// Version. Times are stored as normTime leaves them. u is not changed.
func encodeUnit(u *bulkexport.Unit, version int64) (unitRow, error) {
	c := *u // shallow: only value fields are replaced below
	c.Version = version
	c.LeaseExpiresAt = normTime(c.LeaseExpiresAt)
	c.UpdatedAt = normTime(c.UpdatedAt)
	data, err := json.Marshal(&c)
	if err != nil {
		return unitRow{}, fmt.Errorf("sqlitestore: encode unit %s/%s: %w", u.JobID, u.Key, err)
	}
	r := unitRow{
		state:          string(c.State),
		leaseOwner:     c.LeaseOwner,
		leaseExpiresAt: micros(c.LeaseExpiresAt),
		attempts:       int64(c.Attempts),
		data:           string(data),
	}
	switch c.State {
	case bulkexport.UnitPending:
		r.claimableAfter = sql.NullInt64{Int64: pendingClaimable, Valid: true}
	case bulkexport.UnitRunning:
		r.claimableAfter = sql.NullInt64{Int64: r.leaseExpiresAt, Valid: true}
	}
	return r, nil
}

func decodeUnit(what, data string) (*bulkexport.Unit, error) {
	var u bulkexport.Unit
	if err := json.Unmarshal([]byte(data), &u); err != nil {
		return nil, fmt.Errorf("sqlitestore: %s: %w", what, err)
	}
	return &u, nil
}

// AddUnits implements bulkexport.UnitStore. It reads the job's state,
// checks that the job has no units, and inserts them, in one BEGIN
// IMMEDIATE transaction, in the order of units (their add order).
func (s *Store) AddUnits(ctx context.Context, jobID string, units []*bulkexport.Unit) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := bulkexport.CheckUnits(units); err != nil {
		return err
	}
	prepared := make([]*bulkexport.Unit, len(units))
	rows := make([]unitRow, len(units))
	for i, u := range units {
		c := u.Clone()
		bulkexport.PrepareUnits(jobID, []*bulkexport.Unit{c})
		r, err := encodeUnit(c, 1)
		if err != nil {
			return err
		}
		prepared[i], rows[i] = c, r
	}
	err := s.tx(ctx, func(conn *sql.Conn) error {
		var state string
		err := conn.QueryRowContext(ctx, s.uq.jobState, jobID).Scan(&state)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("sqlitestore: job %s: %w", jobID, bulkexport.ErrNotFound)
		}
		if err != nil {
			return err
		}
		if bulkexport.JobState(state).Terminal() {
			return fmt.Errorf("sqlitestore: job %s is %s: %w", jobID, state, bulkexport.ErrInvalidTransition)
		}
		var has bool
		if err := conn.QueryRowContext(ctx, s.uq.hasUnits, jobID).Scan(&has); err != nil {
			return err
		}
		if has {
			return fmt.Errorf("sqlitestore: job %s has units: %w", jobID, bulkexport.ErrAlreadyExists)
		}
		// Multi-row INSERTs of up to 100 units (1,000 parameters).
		const chunk = 100
		for start := 0; start < len(rows); start += chunk {
			end := min(start+chunk, len(rows))
			var b strings.Builder
			b.WriteString(s.uq.insertPrefix)
			args := make([]any, 0, 10*(end-start))
			for i := start; i < end; i++ {
				if i > start {
					b.WriteString(", ")
				}
				b.WriteString("(?, ?, ?, ?, 1, ?, ?, ?, ?, ?)")
				r, u := rows[i], prepared[i]
				args = append(args, jobID, u.Key, u.Seq, r.state, r.leaseOwner, r.leaseExpiresAt, r.attempts, r.claimableAfter, r.data)
			}
			if _, err := conn.ExecContext(ctx, b.String(), args...); err != nil {
				return err
			}
		}
		return nil
	})
	switch {
	case errors.Is(err, bulkexport.ErrNotFound), errors.Is(err, bulkexport.ErrInvalidTransition), errors.Is(err, bulkexport.ErrAlreadyExists):
		return err
	case err != nil:
		return fmt.Errorf("sqlitestore: add units of job %s: %w", jobID, err)
	}
	bulkexport.PrepareUnits(jobID, units)
	return nil
}

// ClaimUnit implements bulkexport.UnitStore with one UPDATE ... RETURNING
// statement that takes the front of the claim index, under SQLite's write
// lock. As in Claim, the lease clock is the caller's (p.Now), and the
// lease ends at now+lease in UTC, to the microsecond.
func (s *Store) ClaimUnit(ctx context.Context, p bulkexport.ClaimParams) (*bulkexport.Unit, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	leaseEnd := normTime(p.Now.Add(p.Lease))
	var data string
	err := s.write(ctx, func() error {
		return s.db.QueryRowContext(ctx, s.uq.claim,
			p.Worker, micros(leaseEnd), micros(leaseEnd),
			p.Worker, jsonTime(leaseEnd),
			ceilMicros(p.Now),
		).Scan(&data)
	})
	if errors.Is(err, sql.ErrNoRows) {
		return nil, bulkexport.ErrNoJob
	}
	if err != nil {
		return nil, fmt.Errorf("sqlitestore: claim unit: %w", err)
	}
	return decodeUnit("claimed unit", data)
}

// UpdateUnit implements bulkexport.UnitStore. The happy path is one
// compare-and-set UPDATE that checks the version, the identity and the
// state the unit may come from; only when it changes no row does
// UpdateUnit read the unit, to say why.
func (s *Store) UpdateUnit(ctx context.Context, u *bulkexport.Unit) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if u == nil {
		return errors.New("sqlitestore: UpdateUnit: nil unit")
	}
	if q, ok := s.uq.update[u.State]; ok {
		r, err := encodeUnit(u, u.Version+1)
		if err != nil {
			return err
		}
		args := append([]any{r.state, r.leaseOwner, r.leaseExpiresAt, r.attempts, r.claimableAfter, r.data,
			u.JobID, u.Key, u.Version, u.Seq, u.Type, u.Partition}, s.uq.updateFrom[u.State]...)
		var n int64
		err = s.write(ctx, func() error {
			res, err := s.db.ExecContext(ctx, q, args...)
			if err != nil {
				return err
			}
			n, err = res.RowsAffected()
			return err
		})
		if err != nil {
			return fmt.Errorf("sqlitestore: update unit %s/%s: %w", u.JobID, u.Key, err)
		}
		if n == 1 {
			u.Version++
			return nil
		}
	}
	var data string
	err := s.db.QueryRowContext(ctx, s.uq.get, u.JobID, u.Key).Scan(&data)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("sqlitestore: unit %s/%s: %w", u.JobID, u.Key, bulkexport.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("sqlitestore: update unit %s/%s: %w", u.JobID, u.Key, err)
	}
	stored, err := decodeUnit("unit "+u.JobID+"/"+u.Key, data)
	if err != nil {
		return err
	}
	if err := bulkexport.CheckUnitUpdate(stored, u); err != nil {
		return fmt.Errorf("sqlitestore: %w", err)
	}
	return fmt.Errorf("sqlitestore: unit %s/%s: changed concurrently: %w", u.JobID, u.Key, bulkexport.ErrConflict)
}

// Units implements bulkexport.UnitStore.
func (s *Store) Units(ctx context.Context, jobID string) ([]*bulkexport.Unit, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	rows, err := s.db.QueryContext(ctx, s.uq.list, jobID)
	if err != nil {
		return nil, fmt.Errorf("sqlitestore: units of job %s: %w", jobID, err)
	}
	defer rows.Close()
	out := []*bulkexport.Unit{}
	for rows.Next() {
		var data string
		if err := rows.Scan(&data); err != nil {
			return nil, fmt.Errorf("sqlitestore: units of job %s: %w", jobID, err)
		}
		u, err := decodeUnit("unit of job "+jobID, data)
		if err != nil {
			return nil, err
		}
		out = append(out, u)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("sqlitestore: units of job %s: %w", jobID, err)
	}
	return out, nil
}
