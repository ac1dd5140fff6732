package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

func TestParseDataFlag(t *testing.T) {
	t.Parallel()
	o, err := parseFlags([]string{"-data", "postgres:postgres://u:pw@127.0.0.1/db"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, "postgres://u:pw@127.0.0.1/db", o.pgData)
	require.Equal(t, "postgres:"+pgDataTable, dataDesc(o.pgData), "the URL stays out of the logs")
	o, err = parseFlags([]string{"-data", "memory"}, io.Discard)
	require.NoError(t, err)
	require.Empty(t, o.pgData)
	for _, args := range [][]string{
		{"-data", "postgres:"},
		{"-data", "sqlite:x"},
		{"-data", "postgres:postgres://x", "-pace", "1ms"},
	} {
		var stderr bytes.Buffer
		_, err := parseFlags(args, &stderr)
		require.ErrorIs(t, err, errUsage, "%v", args)
		require.NotEmpty(t, stderr.String(), "%v", args)
	}
}

// TestRunPostgresData runs the server with -data postgres:URL (in a
// schema of its own, through search_path) and checks that a Group export
// writes what the in-memory dataset would.
func TestRunPostgresData(t *testing.T) {
	t.Parallel()
	pgURL := os.Getenv("BULKEXPORT_TEST_POSTGRES_URL")
	if pgURL == "" {
		t.Skip("BULKEXPORT_TEST_POSTGRES_URL is not set")
	}
	ctx := context.Background()
	var b [6]byte
	_, _ = rand.Read(b[:])
	schema := "pgsource_srv_" + hex.EncodeToString(b[:])
	conn, err := pgx.Connect(ctx, pgURL)
	require.NoError(t, err)
	_, err = conn.Exec(ctx, "CREATE SCHEMA "+schema)
	require.NoError(t, err)
	t.Cleanup(func() {
		_, err := conn.Exec(context.Background(), "DROP SCHEMA "+schema+" CASCADE")
		require.NoError(t, err)
		conn.Close(context.Background())
	})
	u, err := url.Parse(pgURL)
	require.NoError(t, err)
	qv := u.Query()
	qv.Set("search_path", schema)
	u.RawQuery = qv.Encode()

	base, stop := startRun(t, "-patients", "20", "-data", "postgres:"+u.String(), "-store", "memory", "-storage", "dir:"+t.TempDir())
	do := func(u string) (*http.Response, []byte) {
		req, err := http.NewRequest(http.MethodGet, u, nil)
		require.NoError(t, err)
		req.Header.Set("Prefer", "respond-async")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp, body
	}
	resp, body := do(base + "/Group/even/$export?_type=Patient,Observation")
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
	status := resp.Header.Get("Content-Location")
	for range 400 { // a bounded wait
		resp, body = do(status)
		if resp.StatusCode != http.StatusAccepted {
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	tx, err := fhirbulk.ParseInstant(m.TransactionTime)
	require.NoError(t, err)
	counts := map[string]int64{}
	for _, f := range m.Output {
		resp, body := do(f.URL)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		sc := bufio.NewScanner(bytes.NewReader(body))
		for sc.Scan() {
			counts[f.Type]++
		}
	}
	d := dataset.New(20)
	for _, typ := range []string{"Patient", "Observation"} {
		want, err := d.Count(ctx, &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "even", TransactionTime: tx}, typ)
		require.NoError(t, err)
		require.Equal(t, want, counts[typ], typ)
	}
	require.EqualValues(t, 10, counts["Patient"])

	// A Group the tables do not hold gets 404 at kick-off (CheckGroup).
	resp, body = do(base + "/Group/nope/$export")
	require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s", body)
	stop()
}
