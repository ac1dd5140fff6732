package sqlitestore

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
)

// BenchmarkPollFinishedRatio polls a completed job with 30 output files
// over a real loopback transport: the library's Handler over this store
// (the example server's default), against a bare handler that writes the
// very same manifest bytes and headers from memory. It reports ratio =
// bare ns/op ÷ handler ns/op; the two alternate in chunks so that noise
// hits both alike. The gap is the store read (one SELECT by primary key
// and the JSON decode of the job) and the manifest's rendering.
func BenchmarkPollFinishedRatio(b *testing.B) {
	b.Run("store", func(b *testing.B) { benchPollFinished(b, 0) })
	// With Options.FinishedJobCache, polls after the first skip the store.
	b.Run("cached", func(b *testing.B) { benchPollFinished(b, time.Minute) })
}

func benchPollFinished(b *testing.B, cache time.Duration) {
	s := benchStore(b)
	ctx := context.Background()
	now := time.Now()
	job := benchJob(bulkexport.NewJobID(), now.Add(-time.Minute))
	job.Owner, job.Output = "", nil
	for i := range 30 {
		job.Output = append(job.Output, bulkexport.File{Type: "Observation",
			Name: bulkexport.FileName("Observation", i+1, 1), Count: 100_000, Size: 100 << 20})
	}
	require.NoError(b, s.Create(ctx, job, bulkexport.CreateParams{}))
	j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Now: now, Lease: time.Hour})
	require.NoError(b, err)
	j.State, j.TransactionTime, j.StartedAt, j.CompletedAt = bulkexport.StateCompleted, now, now, now
	j.ExpiresAt = now.Add(time.Hour)
	j.LeaseOwner, j.LeaseExpiresAt = "", time.Time{}
	require.NoError(b, s.Update(ctx, j))

	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	b.Cleanup(srv.Close)
	h, err := bulkexport.NewHandler(s, &bulkexport.Options{BaseURL: srv.URL + "/fhir", FinishedJobCache: cache,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	require.NoError(b, err)
	b.Cleanup(func() { _ = h.Close() })
	mux.Handle("/fhir/", h)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	b.Cleanup(client.CloseIdleConnections)

	get := func(url string) (http.Header, []byte) {
		res, err := client.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			b.Fatalf("GET %s: %d %s", url, res.StatusCode, body)
		}
		return res.Header, body
	}
	statusURL := h.StatusURL(j.ID)
	hdr, manifest := get(statusURL)
	mux.HandleFunc("/bare/", func(w http.ResponseWriter, r *http.Request) {
		out := w.Header()
		for _, k := range []string{"Content-Type", "Content-Length", "Expires"} {
			out[k] = hdr[k]
		}
		_, _ = w.Write(manifest)
	})
	bareURL := srv.URL + "/bare/$export-poll-status?_jobId=" + j.ID
	if bh, bm := get(bareURL); string(bm) != string(manifest) || len(bh) != len(hdr) {
		b.Fatalf("the bare handler answers differently: %v vs %v", bh, hdr)
	}

	const chunk = 32
	var bare, hand time.Duration
	poll := func(url string, n int) time.Duration {
		start := time.Now()
		for range n {
			get(url)
		}
		return time.Since(start)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for done, round := 0, 0; done < b.N; round++ {
		n := min(chunk, b.N-done)
		if round%2 == 0 {
			bare += poll(bareURL, n)
			hand += poll(statusURL, n)
		} else {
			hand += poll(statusURL, n)
			bare += poll(bareURL, n)
		}
		done += n
	}
	b.ReportMetric(float64(bare.Nanoseconds())/float64(b.N), "bare-ns/op")
	b.ReportMetric(float64(hand.Nanoseconds())/float64(b.N), "handler-ns/op")
	b.ReportMetric(float64(bare)/float64(hand), "ratio")
	b.ReportMetric(float64(len(manifest)), "manifest-bytes")
}
