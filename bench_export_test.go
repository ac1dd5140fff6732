package bulkexport_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// preencodedSource emits perType pre-encoded resources of about 1 KiB for
// each of its types, as a host with stored JSON would.
type preencodedSource struct {
	types   []string
	perType int
	bodies  map[string][][]byte // a few distinct bodies per type, reused
}

const benchBodies = 64

func newPreencodedSource(types []string, perType int) *preencodedSource {
	s := &preencodedSource{types: types, perType: perType, bodies: map[string][][]byte{}}
	pad := strings.Repeat("x", 760)
	for _, typ := range types {
		for i := range benchBodies {
			b := fmt.Sprintf(`{"resourceType":%q,"id":"%s-%08d","meta":{"lastUpdated":"2025-06-01T10:00:00.000Z"},"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}]},"subject":{"reference":"Patient/p-%06d"},"valueQuantity":{"value":%d,"unit":"/min"},"note":[{"text":%q}]}`,
				typ, strings.ToLower(typ), i, i, 60+i, pad)
			s.bodies[typ] = append(s.bodies[typ], []byte(b))
		}
	}
	return s
}

func (s *preencodedSource) ResourceTypes(context.Context, fhirbulk.Level) ([]string, error) {
	return s.types, nil
}

func (s *preencodedSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	bodies := s.bodies[typ]
	for i := range s.perType {
		if err := w.Write(bodies[i%benchBodies]); err != nil {
			return err
		}
		if i%1000 == 999 {
			if err := w.Checkpoint(fmt.Sprint(i + 1)); err != nil {
				return err
			}
		}
	}
	return nil
}

// bytesPerExport is the total NDJSON size the source produces.
func (s *preencodedSource) bytesPerExport() int64 {
	var n int64
	for _, typ := range s.types {
		for i := range s.perType {
			n += int64(len(s.bodies[typ][i%benchBodies]) + 1)
		}
	}
	return n
}

// runOneExport runs a system export of src through a fresh Worker into
// DirStorage at dir, and returns when the job is complete.
func runOneExport(tb testing.TB, src bulkexport.Source, dir string, opts bulkexport.WorkerOptions) *bulkexport.Job {
	tb.Helper()
	storage, err := bulkexport.NewDirStorage(dir)
	if err != nil {
		tb.Fatal(err)
	}
	return runExportTo(tb, src, storage, opts)
}

// runExportTo is runOneExport into a given Storage.
func runExportTo(tb testing.TB, src bulkexport.Source, storage bulkexport.Storage, opts bulkexport.WorkerOptions) *bulkexport.Job {
	tb.Helper()
	store := bulkexport.NewMemoryStore()
	opts.PollInterval = time.Millisecond
	if opts.Logger == nil {
		opts.Logger = quietLogger
	}
	w, err := bulkexport.NewWorker(store, src, storage, &opts)
	if err != nil {
		tb.Fatal(err)
	}
	job := &bulkexport.Job{ID: bulkexport.NewJobID(), Level: fhirbulk.LevelSystem, State: bulkexport.StateQueued,
		CreatedAt: time.Now(), Request: bulkexport.Request{OutputFormat: bulkexport.FormatNDJSON}}
	if err := store.Create(context.Background(), job, bulkexport.CreateParams{}); err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	for {
		j, err := store.Get(context.Background(), job.ID)
		if err != nil {
			tb.Fatal(err)
		}
		if j.State.Terminal() {
			if j.State != bulkexport.StateCompleted {
				tb.Fatalf("job %s: %+v", j.State, j.Failure)
			}
			return j
		}
		time.Sleep(time.Millisecond)
	}
}

// writeBaseline writes the same bytes as the export with one bufio.Writer
// per type, each file synced (when sync is set, as the export's files are)
// and closed.
func writeBaseline(tb testing.TB, s *preencodedSource, dir string, sync bool) {
	tb.Helper()
	for _, typ := range s.types {
		f, err := os.Create(filepath.Join(dir, typ+".ndjson"))
		if err != nil {
			tb.Fatal(err)
		}
		bw := bufio.NewWriterSize(f, 64<<10)
		for i := range s.perType {
			bw.Write(s.bodies[typ][i%benchBodies])
			bw.WriteByte('\n')
		}
		if err := bw.Flush(); err != nil {
			tb.Fatal(err)
		}
		if sync {
			if err := f.Sync(); err != nil {
				tb.Fatal(err)
			}
		}
		if err := f.Close(); err != nil {
			tb.Fatal(err)
		}
	}
}

var quietLogger = slog.New(slog.NewTextHandler(io.Discard, nil))

var benchTypes = []string{"Observation", "Condition", "Encounter", "MedicationRequest"}

// BenchmarkExportThroughput compares a whole export (Worker, validation,
// NDJSON writer, DirStorage with atomic, durable commits) with writing the
// same bytes through bufio.Writer to files in the same directory (synced
// too). The ratio metric is baseline time ÷ export time: 1.0 means the
// export costs nothing over the raw write. export-unsynced's ratio-cpu
// compares the engine's CPU path with an unsynced raw write.
func BenchmarkExportThroughput(b *testing.B) {
	src := newPreencodedSource(benchTypes, 25_000) // 100,000 resources, ~100 MiB
	size := src.bytesPerExport()
	dir := b.TempDir()
	var baseNs, nosyncNs int64
	timeIt := func(b *testing.B, name string, run func(d string)) int64 {
		b.SetBytes(size)
		var total time.Duration
		for i := 0; i < b.N; i++ {
			d := filepath.Join(dir, fmt.Sprintf("%s-%d-%d", name, b.N, i))
			if err := os.MkdirAll(d, 0o700); err != nil {
				b.Fatal(err)
			}
			start := time.Now()
			run(d)
			total += time.Since(start)
			os.RemoveAll(d)
		}
		return int64(total) / int64(b.N)
	}
	b.Run("baseline", func(b *testing.B) {
		baseNs = timeIt(b, "base", func(d string) { writeBaseline(b, src, d, true) })
	})
	b.Run("baseline-nosync", func(b *testing.B) {
		nosyncNs = timeIt(b, "nosync", func(d string) { writeBaseline(b, src, d, false) })
	})
	b.Run("export", func(b *testing.B) {
		ns := timeIt(b, "export", func(d string) { runOneExport(b, src, d, bulkexport.WorkerOptions{}) })
		if baseNs > 0 {
			b.ReportMetric(float64(baseNs)/float64(ns), "ratio")
		}
		if nosyncNs > 0 {
			b.ReportMetric(float64(nosyncNs)/float64(ns), "ratio-nosync")
		}
	})
	// The engine's CPU path: the same export into plain files that are
	// never synced (a test-only Storage), against the unsynced raw write.
	// Its ratio is what validation, the NDJSON writer and the job's
	// bookkeeping cost; the synced figures above are bound by fsync.
	b.Run("export-unsynced", func(b *testing.B) {
		ns := timeIt(b, "export-unsynced", func(d string) { runExportTo(b, src, unsyncedStorage{d}, bulkexport.WorkerOptions{}) })
		if nosyncNs > 0 {
			b.ReportMetric(float64(nosyncNs)/float64(ns), "ratio-cpu")
		}
	})
	// The same with WorkerOptions.TrustSource: the CPU path of a host
	// whose Source writes JSON it validated on the way in.
	b.Run("export-unsynced-trusted", func(b *testing.B) {
		ns := timeIt(b, "export-unsynced-trusted", func(d string) {
			runExportTo(b, src, unsyncedStorage{d}, bulkexport.WorkerOptions{TrustSource: true})
		})
		if nosyncNs > 0 {
			b.ReportMetric(float64(nosyncNs)/float64(ns), "ratio-cpu")
		}
	})
}

// BenchmarkExportMemory reports the peak heap in use while exporting a
// given number of resources, sampled every millisecond. Streaming means
// the figure does not grow with the count.
func BenchmarkExportMemory(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			src := newPreencodedSource(benchTypes, n/len(benchTypes))
			for i := 0; i < b.N; i++ {
				peak := measurePeakHeap(func() {
					runOneExport(b, src, b.TempDir(), bulkexport.WorkerOptions{})
				})
				b.ReportMetric(float64(peak)/(1<<20), "peak-MiB")
			}
		})
	}
}

func measurePeakHeap(fn func()) uint64 {
	runtime.GC()
	var peak atomic.Uint64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	fn()
	close(stop)
	<-done
	return peak.Load()
}

// unsyncedStorage is a Storage for BenchmarkExportThroughput's CPU-path
// figure only: plain files, written through a buffer and closed on Commit
// without fsync (never use it for data; DirStorage is the durable one).
type unsyncedStorage struct{ dir string }

type unsyncedWriter struct {
	f  *os.File
	bw *bufio.Writer
}

func (w *unsyncedWriter) Write(p []byte) (int, error) { return w.bw.Write(p) }
func (w *unsyncedWriter) Commit() error {
	if err := w.bw.Flush(); err != nil {
		w.f.Close()
		return err
	}
	return w.f.Close()
}
func (w *unsyncedWriter) Abort() error { w.f.Close(); return os.Remove(w.f.Name()) }

type unsyncedReader struct {
	*os.File
	size int64
	mod  time.Time
}

func (r unsyncedReader) Size() int64        { return r.size }
func (r unsyncedReader) ModTime() time.Time { return r.mod }

func (s unsyncedStorage) Create(ctx context.Context, jobID, name string) (bulkexport.FileWriter, error) {
	if err := os.MkdirAll(filepath.Join(s.dir, jobID), 0o700); err != nil {
		return nil, err
	}
	f, err := os.Create(filepath.Join(s.dir, jobID, name))
	if err != nil {
		return nil, err
	}
	return &unsyncedWriter{f: f, bw: bufio.NewWriterSize(f, 64<<10)}, nil
}

func (s unsyncedStorage) Open(ctx context.Context, jobID, name string) (bulkexport.FileReader, error) {
	f, err := os.Open(filepath.Join(s.dir, jobID, name))
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return unsyncedReader{f, st.Size(), st.ModTime()}, nil
}

func (s unsyncedStorage) List(ctx context.Context, jobID string) ([]string, error) {
	es, err := os.ReadDir(filepath.Join(s.dir, jobID))
	if err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names, nil
}

func (s unsyncedStorage) Delete(ctx context.Context, jobID string) error {
	return os.RemoveAll(filepath.Join(s.dir, jobID))
}
