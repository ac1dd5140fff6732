package scaleout

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/bulkfhir/bulkexport/pgstore"
)

const (
	envPostgres = "BULKEXPORT_TEST_POSTGRES_URL"
	// envWorker starts the test binary as one worker process: its value
	// is the schema of the shared jobs table; envStorage is the shared
	// storage directory.
	envWorker  = "BULKEXPORT_SCALEOUT_WORKER"
	envStorage = "BULKEXPORT_SCALEOUT_STORAGE"
)

// The job: one type of parts × pages × pageSize resources, each page
// taking pageLatency to read. One worker needs parts × pages × pageLatency
// (about 5 s) of waiting; the CPU work is small beside it, so that the
// ratio measures how the engine shares one job, not the machine's cores.
const (
	parts       = 32
	pages       = 16
	pageSize    = 250
	pageLatency = 20 * time.Millisecond
)

// pagedSource serves Observations in pages of pageSize, sleeping
// pageLatency before each page, split into parts of pages pages.
type pagedSource struct{}

func (pagedSource) ResourceTypes(context.Context, fhirbulk.Level) ([]string, error) {
	return []string{"Observation"}, nil
}

func (pagedSource) Partitions(_ context.Context, _ *bulkexport.Query, _ string, limit int) ([]string, error) {
	n := min(parts, limit)
	out := make([]string, n)
	for i := range n {
		out[i] = strconv.Itoa(i*parts/n) + "-" + strconv.Itoa((i+1)*parts/n)
	}
	return out, nil
}

// Export writes the parts [lo, hi) (all without a partition), page by
// page, with the next page's number as the cursor.
func (pagedSource) Export(ctx context.Context, q *bulkexport.Query, _ string, w bulkexport.ResourceWriter) error {
	lo, hi := 0, parts
	if q.Partition != "" {
		a, b, _ := strings.Cut(q.Partition, "-")
		lo, _ = strconv.Atoi(a)
		hi, _ = strconv.Atoi(b)
	}
	first := lo * pages
	if q.Cursor != "" {
		n, err := strconv.Atoi(q.Cursor)
		if err != nil {
			return err
		}
		first = n
	}
	buf := make([]byte, 0, 256)
	for page := first; page < hi*pages; page++ {
		t := time.NewTimer(pageLatency)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		for i := range pageSize {
			buf = fmt.Appendf(buf[:0], `{"resourceType":"Observation","id":"o%d-%d","status":"final","code":{"text":"heart rate"},"valueQuantity":{"value":%d,"unit":"/min"}}`, page, i, 60+i%40)
			if err := w.Write(buf); err != nil {
				return err
			}
		}
		if err := w.Checkpoint(strconv.Itoa(page + 1)); err != nil {
			return err
		}
	}
	return nil
}

// workerOptions are the bench workers': one unit at a time each, and
// quick polls, so that idle workers see a new plan (and the coordinator
// its units' ends) within a few milliseconds.
func workerOptions() *bulkexport.WorkerOptions {
	return &bulkexport.WorkerOptions{
		Concurrency: 1, UnitConcurrency: 1, Partitions: parts,
		PollInterval: 10 * time.Millisecond, Heartbeat: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
}

func openStore(ctx context.Context, url, schema string) (*pgstore.Store, *pgxpool.Pool, error) {
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return nil, nil, err
	}
	s, err := pgstore.New(pool, &pgstore.Options{Schema: schema})
	if err == nil {
		err = s.Migrate(ctx)
	}
	if err != nil {
		pool.Close()
		return nil, nil, err
	}
	return s, pool, nil
}

// TestMain runs the binary as a worker process when envWorker is set:
// one Worker on the shared store and storage until SIGTERM.
func TestMain(m *testing.M) {
	schema := os.Getenv(envWorker)
	if schema == "" {
		os.Exit(m.Run())
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	store, pool, err := openStore(ctx, os.Getenv(envPostgres), schema)
	if err != nil {
		fmt.Fprintln(os.Stderr, "scaleout worker:", err)
		os.Exit(1)
	}
	defer pool.Close()
	storage, err := bulkexport.NewDirStorage(os.Getenv(envStorage))
	if err == nil {
		var w *bulkexport.Worker
		if w, err = bulkexport.NewWorker(store, pagedSource{}, storage, workerOptions()); err == nil {
			fmt.Println("ready")
			err = w.Run(ctx)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "scaleout worker:", err)
		os.Exit(1)
	}
}

// BenchmarkScaleOut runs one partitioned job with 1, 2, 4 and 8 worker
// processes and reports each one's throughput against one worker's as
// speedup-N (the goal is at least 0.8 × N) and efficiency-N (speedup ÷ N).
func BenchmarkScaleOut(b *testing.B) {
	url := os.Getenv(envPostgres)
	if url == "" {
		b.Skipf("%s is not set; source .ci/postgres.sh to provision a server", envPostgres)
	}
	counts := []int{1, 2, 4, 8}
	took := map[int]time.Duration{}
	for range b.N {
		for _, n := range counts {
			d := runJob(b, url, n)
			if took[n] == 0 || d < took[n] {
				took[n] = d
			}
		}
	}
	total := float64(parts * pages * pageSize)
	b.ReportMetric(total/took[1].Seconds(), "resources/s-1")
	for _, n := range counts[1:] {
		speedup := took[1].Seconds() / took[n].Seconds()
		b.ReportMetric(speedup, fmt.Sprintf("speedup-%d", n))
		b.ReportMetric(speedup/float64(n), fmt.Sprintf("efficiency-%d", n))
	}
}

// runJob starts n worker processes on a fresh schema, queues one job once
// they are all ready, and returns how long the job took from its creation
// to its completion.
func runJob(b *testing.B, url string, n int) time.Duration {
	b.Helper()
	ctx := context.Background()
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	schema := "scaleout_" + hex.EncodeToString(rnd[:])
	store, pool, err := openStore(ctx, url, schema)
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		_, _ = pool.Exec(ctx, "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
		pool.Close()
	}()
	dir := b.TempDir()
	var procs []*exec.Cmd
	defer func() {
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGTERM)
			_ = p.Wait()
		}
	}()
	for range n {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), envWorker+"="+schema, envStorage+"="+dir)
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			b.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		procs = append(procs, cmd)
		line := make([]byte, 6)
		if _, err := out.Read(line); err != nil || string(line) != "ready\n" {
			b.Fatalf("worker process did not start: %q, %v", line, err)
		}
	}
	now := time.Now().UTC()
	job := &bulkexport.Job{ID: bulkexport.NewJobID(), Owner: "bench", Level: fhirbulk.LevelSystem,
		State: bulkexport.StateQueued, CreatedAt: now, UpdatedAt: now,
		Request: bulkexport.Request{URL: "http://127.0.0.1/fhir/$export", Method: "GET", OutputFormat: "application/fhir+ndjson"}}
	start := time.Now()
	if err := store.Create(ctx, job, bulkexport.CreateParams{}); err != nil {
		b.Fatal(err)
	}
	for deadline := start.Add(5 * time.Minute); ; {
		j, err := store.Get(ctx, job.ID)
		if err != nil {
			b.Fatal(err)
		}
		if j.State == bulkexport.StateCompleted {
			d := time.Since(start)
			var got int64
			for _, f := range j.Output {
				got += f.Count
			}
			if got != parts*pages*pageSize {
				b.Fatalf("%d workers: %d resources exported, want %d", n, got, parts*pages*pageSize)
			}
			return d
		}
		if j.State.Terminal() {
			b.Fatalf("%d workers: job %s: %+v", n, j.State, j.Failure)
		}
		if time.Now().After(deadline) {
			b.Fatal(errors.New("the job did not complete within 5 minutes"))
		}
		time.Sleep(5 * time.Millisecond)
	}
}
