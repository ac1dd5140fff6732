package pgsource

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// BenchmarkEndToEndVsCopy is a whole export from this Source, kick-off to
// manifest: the real Server (handler, Worker with its default type
// concurrency of 2, a MemoryStore) over HTTP, writing NDJSON files to a
// DirStorage. The baseline, in the same iteration, is the least a program
// can do to put the same rows into files on the same disk: for each type,
// COPY (SELECT body FROM resources WHERE type = …) TO STDOUT streamed into
// a file, synced and closed, two types at a time. ratio = baseline time ÷
// export time (1 means the library costs nothing over the database's own
// bulk read; the goal is 0.8).
//
// "whole" exports each type in one Export call (Partitions 1, as before
// partitioning). "parts4-unitsN" lets the Source split each type into up
// to 4 ranges of seq (Partitioner), exported as units, N at a time; the
// MemoryStore keeps units, so the Worker partitions. The job's claim
// holder looks at its units every Heartbeat (default 500 ms), so a
// partitioned job completes up to a Heartbeat after its last unit: the
// "-hb20ms" cases shorten it to 20 ms to show the export without that
// wait.
func BenchmarkEndToEndVsCopy(b *testing.B) {
	ctx := context.Background()
	src, pool, table := loadDataset(b, dataset.New(8000), DefaultPageSize)
	// lean is the Source of a host that trusts what it stored (Load
	// parsed every body): estimated counts, and WorkerOptions.TrustSource.
	lean, err := New(pool, Options{Table: table, EstimateCounts: true})
	if err != nil {
		b.Fatal(err)
	}
	types, err := src.ResourceTypes(ctx, fhirbulk.LevelSystem)
	if err != nil {
		b.Fatal(err)
	}
	var rows int64
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+src.tables.resources).Scan(&rows); err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name         string
		parts, units int
		heartbeat    time.Duration
		lean         bool
	}{
		{"whole", 1, 0, 0, false},
		{"whole-lean", 1, 0, 0, true},
		{"parts4-units2", 4, 2, 0, false},
		{"parts4-units2-hb20ms", 4, 2, 20 * time.Millisecond, false},
		{"parts4-units4-hb20ms", 4, 4, 20 * time.Millisecond, false},
	} {
		b.Run(c.name, func(b *testing.B) {
			s := src
			if c.lean {
				s = lean
			}
			benchEndToEnd(b, s, pool, types, rows, bulkexport.WorkerOptions{Partitions: c.parts, UnitConcurrency: c.units, Heartbeat: c.heartbeat, TrustSource: c.lean})
		})
	}
}

func benchEndToEnd(b *testing.B, src *Source, pool *pgxpool.Pool, types []string, rows int64, wo bulkexport.WorkerOptions) {
	ctx := context.Background()
	storage, err := bulkexport.NewDirStorage(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	ts := httptest.NewUnstartedServer(nil)
	base := "http://" + ts.Listener.Addr().String() + "/fhir"
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	wo.Logger, wo.PollInterval = quiet, 10*time.Millisecond
	exports, err := bulkexport.NewServer(bulkexport.Config{
		Store: bulkexport.NewMemoryStore(), Source: src, Storage: storage,
		Options: bulkexport.Options{BaseURL: base, Logger: quiet, MaxActiveJobsPerClient: -1, RetryAfter: bulkexport.FixedRetryAfter(time.Second)},
		Worker:  wo,
	})
	if err != nil {
		b.Fatal(err)
	}
	defer exports.Close()
	ts.Config.Handler = exports
	ts.Start()
	defer ts.Close()
	runCtx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- exports.Run(runCtx) }()
	defer func() { stop(); <-ran }()

	copyDir := b.TempDir()
	var exportTime, copyTime time.Duration
	// The best of each side too: on a shared machine the mean moves with
	// whatever else runs, the fastest run much less.
	var exportBest, copyBest time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		got := exportOnce(b, base)
		d := time.Since(start)
		exportTime += d
		if exportBest == 0 || d < exportBest {
			exportBest = d
		}
		if got != rows {
			b.Fatalf("the manifest counts %d resources, the table holds %d", got, rows)
		}

		start = time.Now()
		copyToFiles(b, pool, src.tables.resources, types, filepath.Join(copyDir, fmt.Sprint(i)))
		d = time.Since(start)
		copyTime += d
		if copyBest == 0 || d < copyBest {
			copyBest = d
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(exportTime.Microseconds())/1000/float64(b.N), "export-ms/op")
	b.ReportMetric(float64(copyTime.Microseconds())/1000/float64(b.N), "copy-ms/op")
	b.ReportMetric(float64(copyTime)/float64(exportTime), "ratio")
	b.ReportMetric(float64(copyBest)/float64(exportBest), "ratio-best")
	b.ReportMetric(float64(rows), "resources")
}

// exportOnce kicks a system export off, polls it (every 5 ms, ignoring
// Retry-After, so that the poll interval does not count) and returns the
// manifest's resource count.
func exportOnce(b *testing.B, base string) int64 {
	req, _ := http.NewRequest(http.MethodGet, base+"/$export", nil)
	req.Header.Set("Prefer", "respond-async")
	req.Header.Set("Accept", "application/fhir+json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	status := res.Header.Get("Content-Location")
	if res.StatusCode != http.StatusAccepted || status == "" {
		b.Fatalf("kick-off: %d", res.StatusCode)
	}
	for {
		res, err := http.Get(status)
		if err != nil {
			b.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		switch res.StatusCode {
		case http.StatusAccepted:
			time.Sleep(5 * time.Millisecond)
			continue
		case http.StatusOK:
		default:
			b.Fatalf("poll: %d %s", res.StatusCode, body)
		}
		var m fhirbulk.Manifest
		if err := json.Unmarshal(body, &m); err != nil {
			b.Fatal(err)
		}
		var n int64
		for _, f := range m.Output {
			n += *f.Count
		}
		return n
	}
}

// copyToFiles streams each type's bodies with COPY into a file of its own
// in dir, two types at a time, and syncs and closes every file.
func copyToFiles(b *testing.B, pool *pgxpool.Pool, table string, types []string, dir string) {
	ctx := context.Background()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	var g errgroup.Group
	g.SetLimit(2)
	for _, typ := range types {
		g.Go(func() error {
			conn, err := pool.Acquire(ctx)
			if err != nil {
				return err
			}
			defer conn.Release()
			f, err := os.Create(filepath.Join(dir, typ+".ndjson"))
			if err != nil {
				return err
			}
			w := bufio.NewWriterSize(f, 64<<10)
			sql := `COPY (SELECT body FROM ` + table + ` WHERE type = '` + typ + `') TO STDOUT (FORMAT binary)`
			if _, err := conn.Conn().PgConn().CopyTo(ctx, w, sql); err != nil {
				f.Close()
				return err
			}
			if err := w.Flush(); err != nil {
				f.Close()
				return err
			}
			if err := f.Sync(); err != nil {
				f.Close()
				return err
			}
			return f.Close()
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
}
