package bulkexport_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// BenchmarkDownload compares the file endpoint (job lookup, client check,
// Storage.Open, http.ServeContent) with http.ServeFile of the same file,
// both over a real loopback connection. The ratio metric is baseline time
// ÷ handler time.
func BenchmarkDownload(b *testing.B) {
	const size = 32 << 20
	ctx := context.Background()
	storage, err := bulkexport.NewDirStorage(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	store := bulkexport.NewMemoryStore()
	job := &bulkexport.Job{ID: bulkexport.NewJobID(), Level: fhirbulk.LevelSystem, State: bulkexport.StateQueued, CreatedAt: time.Now()}
	if err := store.Create(ctx, job, bulkexport.CreateParams{}); err != nil {
		b.Fatal(err)
	}
	job, err = store.Claim(ctx, bulkexport.ClaimParams{Worker: "bench", Now: time.Now(), Lease: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	const name = "Observation.000001.ndjson"
	fw, err := storage.Create(ctx, job.ID, name)
	if err != nil {
		b.Fatal(err)
	}
	line := []byte(`{"resourceType":"Observation","id":"x","note":[{"text":"` + strings.Repeat("y", 960) + `"}]}` + "\n")
	for n := 0; n < size; n += len(line) {
		fw.Write(line)
	}
	if err := fw.Commit(); err != nil {
		b.Fatal(err)
	}
	job.State = bulkexport.StateCompleted
	job.CompletedAt = time.Now()
	job.ExpiresAt = time.Now().Add(time.Hour)
	job.Output = []bulkexport.File{{Type: "Observation", Name: name}}
	if err := store.Update(ctx, job); err != nil {
		b.Fatal(err)
	}

	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	defer srv.Close()
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{BaseURL: srv.URL + "/fhir", Storage: storage, Logger: quietLogger})
	if err != nil {
		b.Fatal(err)
	}
	mux.Handle("/fhir/", h)
	path := filepath.Join(storage.Root(), job.ID, name)
	mux.HandleFunc("/raw", func(w http.ResponseWriter, r *http.Request) { http.ServeFile(w, r, path) })

	client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	fetch := func(b *testing.B, url string) {
		resp, err := client.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			b.Fatalf("GET %s: %d, %v", url, resp.StatusCode, err)
		}
		b.SetBytes(n)
	}
	var baseNs float64
	b.Run("servefile", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			fetch(b, srv.URL+"/raw")
		}
		baseNs = float64(b.Elapsed()) / float64(b.N)
	})
	b.Run("handler", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			fetch(b, h.FileURL(job.ID, name))
		}
		if baseNs > 0 {
			b.ReportMetric(baseNs/(float64(b.Elapsed())/float64(b.N)), "ratio")
		}
	})
}
