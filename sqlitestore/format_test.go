package sqlitestore

import (
	"context"
	"database/sql"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/storetest"
)

// insertRaw writes a row as an earlier (or later) release would have:
// the columns from j, and data as given, verbatim.
func insertRaw(t *testing.T, db *sql.DB, j *bulkexport.Job, data []byte) {
	t.Helper()
	_, err := db.Exec(`INSERT INTO bulkexport_jobs (id, owner, state, created_at, updated_at, expires_at, lease_owner, lease_expires_at, attempts, version, data)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		j.ID, j.Owner, string(j.State), micros(j.CreatedAt), micros(j.UpdatedAt), nullMicros(j.ExpiresAt),
		j.LeaseOwner, micros(j.LeaseExpiresAt), j.Attempts, j.Version, string(data))
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

// TestStoredFormat1: a job stored in format 1 (the golden document, as a
// release of that format wrote it) reads back as the golden job, through
// Get and List, and can be updated.
func TestStoredFormat1(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, db := newStore(t, nil)
	golden := storetest.GoldenJob()
	insertRaw(t, db, golden, storetest.GoldenJobJSON())

	got, err := s.Get(ctx, golden.ID)
	require.NoError(t, err)
	require.Equal(t, golden, got)
	list, err := s.List(ctx, bulkexport.Filter{})
	require.NoError(t, err)
	require.Equal(t, []*bulkexport.Job{golden}, list)

	// A document without "format" (stored before the key) is format 1.
	b := withFormat(t, "job-no-format", "")
	noFormat := storetest.GoldenJob()
	noFormat.ID = "job-no-format"
	insertRaw(t, db, noFormat, b)
	got, err = s.Get(ctx, noFormat.ID)
	require.NoError(t, err)
	require.Equal(t, noFormat, got)

	got.Progress.Percent = 50
	require.NoError(t, s.Update(ctx, got))
	var data string
	require.NoError(t, db.QueryRow(`SELECT data FROM bulkexport_jobs WHERE id = ?`, noFormat.ID).Scan(&data))
	require.True(t, strings.HasPrefix(data, `{"format":1,`), "Update writes the current format: %s", data)
}

// TestStoredNewerFormat: a job that a newer release stored, in a format
// this one does not know, is refused by Get and List with an error naming
// the format, and Claim passes over it (and leaves it as it was) to claim
// the jobs it can read.
func TestStoredNewerFormat(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, db := newStore(t, nil)
	newer := storetest.GoldenJob()
	newer.ID = "job-format-2"
	newer.State = bulkexport.StateQueued
	doc := withFormat(t, newer.ID, "2")
	insertRaw(t, db, newer, doc)

	_, err := s.Get(ctx, newer.ID)
	require.ErrorIs(t, err, bulkexport.ErrUnknownJobFormat)
	require.Contains(t, err.Error(), "format 2")
	require.Contains(t, err.Error(), newer.ID)
	_, err = s.List(ctx, bulkexport.Filter{})
	require.ErrorIs(t, err, bulkexport.ErrUnknownJobFormat)
	require.Contains(t, err.Error(), "format 2")

	now := newer.CreatedAt.Add(time.Hour)
	_, err = s.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Lease: time.Minute, Now: now})
	require.ErrorIs(t, err, bulkexport.ErrNoJob)
	// A running job of the newer format whose lease ran out is passed over too.
	_, err = db.Exec(`UPDATE bulkexport_jobs SET state = 'running' WHERE id = ?`, newer.ID)
	require.NoError(t, err)
	_, err = s.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Lease: time.Minute, Now: now})
	require.ErrorIs(t, err, bulkexport.ErrNoJob)
	var data string
	var attempts int
	require.NoError(t, db.QueryRow(`SELECT data, attempts FROM bulkexport_jobs WHERE id = ?`, newer.ID).Scan(&data, &attempts))
	require.Equal(t, string(doc), data, "Claim changed a job of a newer format")
	require.Equal(t, newer.Attempts, attempts)

	// A job this release reads, created after it, is claimed.
	mine := storetest.GoldenJob()
	mine.CreatedAt = newer.CreatedAt.Add(time.Second)
	require.NoError(t, s.Create(ctx, mine, bulkexport.CreateParams{}))
	c, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Lease: time.Minute, Now: now})
	require.NoError(t, err)
	require.Equal(t, mine.ID, c.ID)
}

// TestClaimPatchKeys: Claim patches data by JSON key with json_set; every
// key it names must be one of bulkexport.Job's, or the patch would add a
// key nothing reads while the job keeps its old value.
func TestClaimPatchKeys(t *testing.T) {
	t.Parallel()
	tags := jobJSONKeys()
	q := buildQueries(DefaultTable).claim
	keys := regexp.MustCompile(`'\$\.([A-Za-z0-9_]+)'`).FindAllStringSubmatch(q, -1)
	require.NotEmpty(t, keys)
	seen := map[string]bool{}
	for _, k := range keys {
		seen[k[1]] = true
		if k[1] == "format" {
			continue // the stored form's own key (bulkexport.MarshalStoredJob)
		}
		require.True(t, tags[k[1]], "Claim patches $.%s, which is no JSON key of bulkexport.Job", k[1])
	}
	for _, k := range []string{"state", "leaseOwner", "leaseExpiresAt", "attempts", "version", "fence", "updatedAt", "format"} {
		require.True(t, seen[k], "Claim does not name $.%s", k)
	}
}

// jobJSONKeys returns the JSON keys of bulkexport.Job's fields.
func jobJSONKeys() map[string]bool {
	keys := map[string]bool{}
	typ := reflect.TypeOf(bulkexport.Job{})
	for i := range typ.NumField() {
		f := typ.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		keys[name] = true
	}
	return keys
}
