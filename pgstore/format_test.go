package pgstore

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/storetest"
)

// insertRaw writes a row as an earlier (or later) release would have:
// the columns from j, and data as given.
func insertRaw(t *testing.T, s *Store, j *bulkexport.Job, data []byte) {
	t.Helper()
	_, err := s.pool.Exec(context.Background(), `INSERT INTO `+s.table+` (id, owner, state, created_at, expires_at, lease_owner, lease_expires_at, attempts, version, data)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb)`,
		j.ID, j.Owner, string(j.State), j.CreatedAt, nullTime(j.ExpiresAt), j.LeaseOwner, nullTime(j.LeaseExpiresAt),
		j.Attempts, j.Version, string(data))
	require.NoError(t, err)
}

// withFormat returns the golden document with another id, and with the
// format key replaced by format (removed when format is empty).
func withFormat(t *testing.T, id, format string) []byte {
	t.Helper()
	doc := string(storetest.GoldenJobJSON())
	const head = `{"format":1,`
	require.True(t, strings.HasPrefix(doc, head), "golden document %s", doc)
	if format == "" {
		doc = "{" + doc[len(head):]
	} else {
		doc = `{"format":` + format + "," + doc[len(head):]
	}
	return []byte(strings.Replace(doc, `"id":"`+storetest.GoldenJob().ID+`"`, `"id":"`+id+`"`, 1))
}

// assertGolden checks got against want, raw JSON by meaning (jsonb
// reorders keys).
func assertGolden(t *testing.T, want, got *bulkexport.Job) {
	t.Helper()
	require.JSONEq(t, string(want.Extension), string(got.Extension))
	require.JSONEq(t, string(want.Checkpoint), string(got.Checkpoint))
	w, g := *want, *got
	w.Extension, g.Extension, w.Checkpoint, g.Checkpoint = nil, nil, nil, nil
	require.Equal(t, &w, &g)
}

// TestStoredFormat1: a job stored in format 1 (the golden document, as a
// release of that format wrote it) reads back as the golden job, through
// Get and List; so does one stored before the format key.
func TestStoredFormat1(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newTestStore(t, needDB(t))
	golden := storetest.GoldenJob()
	insertRaw(t, s, golden, storetest.GoldenJobJSON())
	got, err := s.Get(ctx, golden.ID)
	require.NoError(t, err)
	assertGolden(t, golden, got)
	list, err := s.List(ctx, bulkexport.Filter{})
	require.NoError(t, err)
	require.Len(t, list, 1)
	assertGolden(t, golden, list[0])

	noFormat := storetest.GoldenJob()
	noFormat.ID = "job-no-format"
	insertRaw(t, s, noFormat, withFormat(t, noFormat.ID, ""))
	got, err = s.Get(ctx, noFormat.ID)
	require.NoError(t, err)
	assertGolden(t, noFormat, got)
	got.Progress.Percent = 50
	require.NoError(t, s.Update(ctx, got))
	var format int
	require.NoError(t, s.pool.QueryRow(ctx, `SELECT (data->>'format')::int FROM `+s.table+` WHERE id = $1`, noFormat.ID).Scan(&format))
	require.Equal(t, bulkexport.JobFormatVersion, format, "Update writes the current format")
}

// TestStoredNewerFormat: a job that a newer release stored, in a format
// this one does not know, is refused by Get and List with an error naming
// the format, and Claim passes over it (and leaves it as it was) to claim
// the jobs it can read.
func TestStoredNewerFormat(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newTestStore(t, needDB(t))
	newer := storetest.GoldenJob()
	newer.ID = "job-format-2"
	insertRaw(t, s, newer, withFormat(t, newer.ID, "2"))

	_, err := s.Get(ctx, newer.ID)
	require.ErrorIs(t, err, bulkexport.ErrUnknownJobFormat)
	require.Contains(t, err.Error(), "format 2")
	require.Contains(t, err.Error(), newer.ID)
	_, err = s.List(ctx, bulkexport.Filter{})
	require.ErrorIs(t, err, bulkexport.ErrUnknownJobFormat)
	require.Contains(t, err.Error(), "format 2")

	now := newer.CreatedAt.Add(time.Hour)
	claim := bulkexport.ClaimParams{Worker: "w", Lease: time.Minute, Now: now}
	_, err = s.Claim(ctx, claim)
	require.ErrorIs(t, err, bulkexport.ErrNoJob)
	// A running job of the newer format whose lease ran out is passed over too.
	_, err = s.pool.Exec(ctx, `UPDATE `+s.table+` SET state = 'running' WHERE id = $1`, newer.ID)
	require.NoError(t, err)
	_, err = s.Claim(ctx, claim)
	require.ErrorIs(t, err, bulkexport.ErrNoJob)
	var unchanged bool
	require.NoError(t, s.pool.QueryRow(ctx, `SELECT data = $2::jsonb FROM `+s.table+` WHERE id = $1`,
		newer.ID, string(withFormat(t, newer.ID, "2"))).Scan(&unchanged))
	require.True(t, unchanged, "Claim changed a job of a newer format")

	mine := storetest.GoldenJob()
	mine.CreatedAt = newer.CreatedAt.Add(time.Second)
	require.NoError(t, s.Create(ctx, mine, bulkexport.CreateParams{}))
	c, err := s.Claim(ctx, claim)
	require.NoError(t, err)
	require.Equal(t, mine.ID, c.ID)
}
