package bulkexport_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// rangeSource serves Observations o1..o900 and splits them into ranges of
// ids: a Partitioner. A database-backed Source would split by its keys
// (examples/internal/pgsource does, with percentiles of the key).
type rangeSource struct{}

func (rangeSource) ResourceTypes(context.Context, fhirbulk.Level) ([]string, error) {
	return []string{"Observation"}, nil
}

// Partitions returns tokens "lo-hi": the ids in (lo, hi].
func (rangeSource) Partitions(_ context.Context, _ *bulkexport.Query, _ string, limit int) ([]string, error) {
	const n = 900
	parts := min(limit, 3)
	var out []string
	for i := range parts {
		out = append(out, fmt.Sprintf("%d-%d", n*i/parts, n*(i+1)/parts))
	}
	return out, nil
}

// Export writes the ids of q.Partition (all of them without one), after
// q.Cursor when the part resumes.
func (rangeSource) Export(ctx context.Context, q *bulkexport.Query, _ string, w bulkexport.ResourceWriter) error {
	lo, hi := 0, 900
	if q.Partition != "" {
		a, b, _ := strings.Cut(q.Partition, "-")
		lo, _ = strconv.Atoi(a)
		hi, _ = strconv.Atoi(b)
	}
	if q.Cursor != "" {
		lo, _ = strconv.Atoi(q.Cursor)
	}
	for id := lo + 1; id <= hi; id++ {
		if err := w.Write(fmt.Appendf(nil, `{"resourceType":"Observation","id":"o%d","status":"final"}`, id)); err != nil {
			return err
		}
		if err := w.Checkpoint(strconv.Itoa(id)); err != nil {
			return err
		}
	}
	return nil
}

// A Source that is a Partitioner, over a store that is a UnitStore, has
// each of its types split into parts that every worker sharing the store
// exports at once, each part under its own lease and checkpoints. Here two
// workers share a MemoryStore; replicas would share sqlitestore or pgstore
// the same way. The job lists the files part by part.
func ExamplePartitioner() {
	dir, err := os.MkdirTemp("", "bulkexport-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	files, err := bulkexport.NewDirStorage(dir)
	if err != nil {
		log.Fatal(err)
	}
	store := bulkexport.NewMemoryStore()
	ctx, stop := context.WithCancel(context.Background())
	var done []chan error
	for _, id := range []string{"worker-1", "worker-2"} {
		w, err := bulkexport.NewWorker(store, rangeSource{}, files, &bulkexport.WorkerOptions{
			ID: id, PollInterval: 10 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			log.Fatal(err)
		}
		ch := make(chan error, 1)
		go func() { ch <- w.Run(ctx) }()
		done = append(done, ch)
	}
	defer func() {
		stop()
		for _, ch := range done {
			<-ch
		}
	}()

	now := time.Now()
	job := &bulkexport.Job{ID: bulkexport.NewJobID(), Level: fhirbulk.LevelSystem, State: bulkexport.StateQueued, CreatedAt: now, UpdatedAt: now}
	if err := store.Create(ctx, job, bulkexport.CreateParams{}); err != nil {
		log.Fatal(err)
	}
	for {
		j, err := store.Get(ctx, job.ID)
		if err != nil {
			log.Fatal(err)
		}
		if j.State.Terminal() {
			fmt.Println(j.State)
			for _, f := range j.Output {
				fmt.Println(f.Name[:strings.LastIndex(f.Name, ".c")], f.Count)
			}
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	units, err := store.Units(ctx, job.ID)
	if err != nil {
		log.Fatal(err)
	}
	for _, u := range units {
		fmt.Println(u.Key, u.Partition, u.State)
	}
	// Output:
	// completed
	// Observation.p0001.000001 300
	// Observation.p0002.000001 300
	// Observation.p0003.000001 300
	// Observation.p0001 0-300 done
	// Observation.p0002 300-600 done
	// Observation.p0003 600-900 done
}
