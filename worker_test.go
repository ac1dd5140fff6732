package bulkexport_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

var epoch = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

// clinicalSource holds patients p0..p(n-1), each with two Observations
// (codes 8867-4 and 29463-7) and a Condition, plus one Practitioner.
// Resource k of a patient is updated k days after epoch + i hours.
func clinicalSource(t testing.TB, n int) *bulkexporttest.Source {
	t.Helper()
	src := bulkexporttest.NewSource()
	at := func(i, k int) string {
		return fhirbulk.FormatInstant(epoch.Add(time.Duration(i)*time.Hour + time.Duration(k)*24*time.Hour))
	}
	var even []string
	for i := range n {
		pid := fmt.Sprintf("p%d", i)
		if i%2 == 0 {
			even = append(even, pid)
		}
		gender := []string{"female", "male"}[i%2]
		require.NoError(t, src.Add(
			fmt.Sprintf(`{"resourceType":"Patient","id":%q,"meta":{"lastUpdated":%q},"gender":%q,"name":[{"family":"F%d"}]}`, pid, at(i, 0), gender, i),
			fmt.Sprintf(`{"resourceType":"Observation","id":"%s-hr","meta":{"lastUpdated":%q},"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/%s"}}`, pid, at(i, 1), pid),
			fmt.Sprintf(`{"resourceType":"Observation","id":"%s-wt","meta":{"lastUpdated":%q},"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"29463-7"}]},"subject":{"reference":"Patient/%s"}}`, pid, at(i, 2), pid),
			fmt.Sprintf(`{"resourceType":"Condition","id":"%s-c","meta":{"lastUpdated":%q},"clinicalStatus":{"coding":[{"code":%q}]},"subject":{"reference":"Patient/%s"}}`, pid, at(i, 3), []string{"active", "resolved"}[i%2], pid),
		))
	}
	require.NoError(t, src.Add(`{"resourceType":"Practitioner","id":"dr1"}`))
	src.AddGroup("even", even...)
	return src
}

func count(r *bulkexporttest.Result) map[string]int {
	m := map[string]int{}
	for typ, rs := range r.Output {
		m[typ] = len(rs)
	}
	return m
}

func TestExportLevels(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: clinicalSource(t, 6)})

	tests := []struct {
		name, path string
		want       map[string]int
	}{
		{"system", "/$export", map[string]int{"Patient": 6, "Observation": 12, "Condition": 6, "Practitioner": 1}},
		{"patient", "/Patient/$export", map[string]int{"Patient": 6, "Observation": 12, "Condition": 6}},
		{"group", "/Group/even/$export", map[string]int{"Patient": 3, "Observation": 6, "Condition": 3}},
		{"_type", "/$export?_type=Patient,Practitioner", map[string]int{"Patient": 6, "Practitioner": 1}},
		{"_type repeated", "/Patient/$export?_type=Patient&_type=Condition", map[string]int{"Patient": 6, "Condition": 6}},
		{"_since", "/$export?_type=Patient&_since=" + fhirbulk.FormatInstant(epoch.Add(3*time.Hour)), map[string]int{"Patient": 2}},
		{"_until", "/$export?_type=Patient&_until=" + fhirbulk.FormatInstant(epoch.Add(2*time.Hour)), map[string]int{"Patient": 2}},
		{"_typeFilter code", "/$export?_type=Observation&_typeFilter=" + urlEscape("Observation?code=http://loinc.org|8867-4"), map[string]int{"Observation": 6}},
		{"_typeFilter OR", "/$export?_type=Observation&_typeFilter=" + urlEscape("Observation?code=8867-4") + "&_typeFilter=" + urlEscape("Observation?code=29463-7"), map[string]int{"Observation": 12}},
		{"_typeFilter clinical-status", "/Group/even/$export?_type=Condition&_typeFilter=" + urlEscape("Condition?clinical-status=active"), map[string]int{"Condition": 3}},
		{"_typeFilter leaves other types", "/$export?_type=Condition,Patient&_typeFilter=" + urlEscape("Condition?clinical-status=resolved"), map[string]int{"Condition": 3, "Patient": 6}},
		{"no data", "/$export?_type=Patient&_since=2030-01-01T00:00:00Z", map[string]int{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			res := srv.Export(t, tc.path)
			require.Equal(t, tc.want, count(res))
			require.Equal(t, srv.BaseURL+tc.path, res.Manifest.Request)
			require.NotNil(t, res.Manifest.Error)
			for _, f := range res.Manifest.Output {
				require.True(t, strings.HasPrefix(f.URL, srv.BaseURL+"/"), f.URL)
			}
		})
	}
}

func urlEscape(s string) string {
	return strings.NewReplacer("%", "%25", "?", "%3F", "=", "%3D", "|", "%7C", "&", "%26", ",", "%2C").Replace(s)
}

func TestExportPOSTPatientsAndElements(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: clinicalSource(t, 6)})
	params := map[string]any{
		"resourceType": "Parameters",
		"parameter": []map[string]any{
			{"name": "patient", "valueReference": map[string]string{"reference": "Patient/p2"}},
			{"name": "patient", "valueReference": map[string]string{"reference": "Patient/p3"}},
			{"name": "_type", "valueString": "Patient,Observation"},
			{"name": "_elements", "valueString": "Patient.gender"},
		},
	}
	t.Run("patient level", func(t *testing.T) {
		t.Parallel()
		res := srv.Collect(t, srv.KickoffPOST(t, "/Patient/$export", params))
		require.Equal(t, map[string]int{"Patient": 2, "Observation": 4}, count(res))
		require.Equal(t, []string{"p2", "p3"}, res.IDs("Patient"))
		require.Equal(t, srv.BaseURL+"/Patient/$export", res.Manifest.Request, "POST requests are echoed without parameters")
		var p map[string]any
		require.NoError(t, json.Unmarshal(res.Output["Patient"][0], &p))
		require.Contains(t, p, "gender")
		require.NotContains(t, p, "name", "_elements removes unlisted elements")
		require.Contains(t, string(res.Output["Patient"][0]), "SUBSETTED")
		require.NotContains(t, string(res.Output["Observation"][0]), "SUBSETTED", "_elements entries for other types do not subset Observation")
	})
	t.Run("group level keeps members only", func(t *testing.T) {
		t.Parallel()
		res := srv.Collect(t, srv.KickoffPOST(t, "/Group/even/$export", params))
		require.Equal(t, []string{"p2"}, res.IDs("Patient"))
	})
}

func TestExportSplitsFiles(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 10),
		Worker: bulkexport.WorkerOptions{MaxFileResources: 3},
	})
	res := srv.Export(t, "/$export?_type=Observation")
	require.Len(t, res.Output["Observation"], 20)
	require.Len(t, res.Manifest.Output, 7) // 3+3+3+3+3+3+2
	var ids []string
	ids = append(ids, res.IDs("Observation")...)
	slices.Sort(ids)
	require.Len(t, slices.Compact(ids), 20, "no duplicates")

	srv2 := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 10),
		Worker: bulkexport.WorkerOptions{MaxFileBytes: 400},
	})
	res = srv2.Export(t, "/$export?_type=Patient")
	require.Len(t, res.Output["Patient"], 10)
	require.Greater(t, len(res.Manifest.Output), 2)
}

func TestExportDeletedAndErrors(t *testing.T) {
	t.Parallel()
	src := clinicalSource(t, 2)
	src.AddDeleted("Patient", "gone1", epoch.Add(48*time.Hour))
	src.AddDeleted("Patient", "old", epoch.Add(-48*time.Hour))
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src})

	// A lenient request with an unknown parameter: the export runs and the
	// ignored parameter is reported in error[].
	req, _ := http.NewRequest(http.MethodGet, srv.BaseURL+"/$export?_type=Patient&_since=2024-12-31T00:00:00Z&_bogus=1", nil)
	req.Header.Set("Prefer", "respond-async, handling=lenient")
	resp, err := srv.Client().Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	res := srv.Collect(t, resp.Header.Get("Content-Location"))

	require.Len(t, res.Manifest.Deleted, 1)
	require.Equal(t, "Bundle", res.Manifest.Deleted[0].Type)
	require.Len(t, res.Deleted, 1)
	require.Contains(t, string(res.Deleted[0]), `"method":"DELETE","url":"Patient/gone1"`)
	require.Len(t, res.Errors, 1)
	require.Contains(t, string(res.Errors[0]), "_bogus")
	require.Equal(t, "OperationOutcome", res.Manifest.Error[0].Type)
}

func TestWriterRejectsBrokenLines(t *testing.T) {
	t.Parallel()
	src := writerSource{lines: []string{
		`{"resourceType":"Patient","id":"a"}`,
		"{\n  \"resourceType\": \"Patient\",\n  \"id\": \"b\"\n}",
		`{"resourceType":"Observation","id":"wrong-type"}`,
		`{"resourceType":"Patient","id":"c"`,
		`not json`,
		`{"resourceType":"Patient","id":"d"}`,
	}}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src})
	res := srv.Export(t, "/$export")
	require.Equal(t, []string{"a", "b", "d"}, res.IDs("Patient"))
	require.Len(t, res.Errors, 3)
	for _, e := range res.Errors {
		require.Contains(t, string(e), "left out")
	}
}

// writerSource writes fixed lines as Patients.
type writerSource struct{ lines []string }

func (s writerSource) ResourceTypes(context.Context, fhirbulk.Level) ([]string, error) {
	return []string{"Patient"}, nil
}

func (s writerSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	for _, l := range s.lines {
		if err := w.Write([]byte(l)); err != nil {
			return err
		}
	}
	return nil
}

func runWorker(t *testing.T, w *bulkexport.Worker) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
}

func TestSourceErrorFailsJob(t *testing.T) {
	t.Parallel()
	src := clinicalSource(t, 3)
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		if typ == "Observation" && n > 2 {
			return errors.New("database on fire: secret detail")
		}
		return nil
	}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src})
	code, body := srv.Wait(t, srv.Kickoff(t, "/$export"))
	require.Equal(t, http.StatusInternalServerError, code)
	var oo fhirbulk.OperationOutcome
	require.NoError(t, json.Unmarshal(body, &oo))
	require.Equal(t, "OperationOutcome", oo.ResourceType)
	require.Contains(t, oo.Issue[0].Diagnostics, "Observation")
	require.NotContains(t, string(body), "secret", "internal error text stays in the logs")

	// A typed error keeps its status and message.
	src2 := clinicalSource(t, 1)
	src2.OnResource = func(context.Context, string, int) error {
		return &bulkexport.Error{Status: http.StatusForbidden, Code: fhirbulk.IssueForbidden, Message: "consent withdrawn"}
	}
	srv2 := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src2})
	code, body = srv2.Wait(t, srv2.Kickoff(t, "/$export"))
	require.Equal(t, http.StatusForbidden, code)
	require.Contains(t, string(body), "consent withdrawn")
	names, err := srv2.Storage.List(context.Background(), lastJob(t, srv2).ID)
	require.NoError(t, err)
	require.Empty(t, names, "a failed job's files are removed")
}

func lastJob(t *testing.T, srv *bulkexporttest.Server) *bulkexport.Job {
	jobs, err := srv.Store.List(context.Background(), bulkexport.Filter{})
	require.NoError(t, err)
	require.NotEmpty(t, jobs)
	return jobs[len(jobs)-1]
}

func TestCancelMidExportRemovesFiles(t *testing.T) {
	t.Parallel()
	src := clinicalSource(t, 50)
	// Hold the first type to reach 20 resources until the cancel stops it.
	pause := src.Pause("", 20)
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: src,
		// Small files and frequent checkpoints, so that committed files
		// exist when the cancel arrives.
		Worker: bulkexport.WorkerOptions{MaxFileResources: 5, CheckpointInterval: time.Nanosecond, TypeConcurrency: 4},
	})
	statusURL := srv.Kickoff(t, "/$export")
	<-pause.Reached()
	job := srv.Job(t, statusURL)
	names, err := srv.Storage.List(context.Background(), job.ID)
	require.NoError(t, err)
	require.NotEmpty(t, names, "files were committed before the cancel")

	resp, body := srv.Send(t, http.MethodDelete, statusURL, nil)
	require.Equal(t, http.StatusAccepted, resp.StatusCode, string(body))
	require.Contains(t, string(body), "informational")

	// The worker notices within its heartbeat and removes every file.
	require.Eventually(t, func() bool {
		names, err := srv.Storage.List(context.Background(), job.ID)
		return err == nil && len(names) == 0
	}, 20*time.Second, 10*time.Millisecond)
	for range 3 {
		resp, body = srv.Status(t, statusURL)
		require.Equal(t, http.StatusNotFound, resp.StatusCode)
		require.Contains(t, string(body), "OperationOutcome")
	}
	j, err := srv.Store.Get(context.Background(), job.ID)
	require.NoError(t, err)
	require.Equal(t, bulkexport.StateCancelled, j.State)
}

func TestExpiryPurgesJobAndFiles(t *testing.T) {
	t.Parallel()
	clock := bulkexporttest.NewClock(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 3),
		Clock:  clock,
		Worker: bulkexport.WorkerOptions{Retention: 2 * time.Hour, PurgeInterval: time.Hour},
	})
	res := srv.Export(t, "/$export")
	resp, _ := srv.Status(t, res.StatusURL)
	require.Equal(t, clock.Now().Add(2*time.Hour).Format(http.TimeFormat), resp.Header.Get("Expires"))
	job := lastJob(t, srv)

	clock.Advance(2*time.Hour + time.Second)
	resp, body := srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusNotFound, resp.StatusCode, "expired jobs answer 404 even before the purge")
	require.Contains(t, string(body), "expired")
	resp, _ = srv.Send(t, http.MethodGet, res.Manifest.Output[0].URL, nil)
	require.Equal(t, http.StatusNotFound, resp.StatusCode)

	n, err := srv.Worker.Purge(context.Background())
	require.NoError(t, err)
	require.Equal(t, 1, n)
	_, err = srv.Store.Get(context.Background(), job.ID)
	require.ErrorIs(t, err, bulkexport.ErrNotFound)
	names, err := srv.Storage.List(context.Background(), job.ID)
	require.NoError(t, err)
	require.Empty(t, names)
}

// TestResumeAfterLeaseLoss stops a worker mid-export without any cleanup
// (as a crash would), lets its lease expire, and checks that a second
// worker resumes from the checkpoint and the export holds every resource
// exactly once.
func TestResumeAfterLeaseLoss(t *testing.T) {
	t.Parallel()
	clock := bulkexporttest.NewClock(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	src := clinicalSource(t, 40)
	block := make(chan struct{})
	reached := make(chan struct{})
	var once atomic.Bool
	var frozen atomic.Bool
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		if frozen.Load() {
			return nil
		}
		if typ == "Observation" && n == 50 && once.CompareAndSwap(false, true) {
			close(reached)
			<-block // the "crashed" worker hangs here
			return errors.New("crashed worker woke up")
		}
		return nil
	}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Clock: clock})
	statusURL := srv.Kickoff(t, "/$export?_type=Observation")

	opts := bulkexport.WorkerOptions{
		Now: clock.Now, Lease: time.Minute, Heartbeat: time.Hour, PollInterval: 10 * time.Millisecond,
		MaxFileResources: 7, CheckpointInterval: time.Nanosecond,
	}
	a, err := bulkexport.NewStalledWorker(srv.Store, src, srv.Storage, &opts)
	require.NoError(t, err)
	ctxA, cancelA := context.WithCancel(context.Background())
	doneA := make(chan error, 1)
	go func() { doneA <- a.Run(ctxA) }()
	<-reached

	// Worker A is stuck; its lease runs out. Worker B takes over. A file
	// committed but never recorded (as a crash between the two leaves it)
	// must not survive the resume.
	orphan, err := srv.Storage.Create(context.Background(), lastJob(t, srv).ID, "Observation.999999.ndjson")
	require.NoError(t, err)
	_, err = orphan.Write([]byte(`{"resourceType":"Observation","id":"orphan"}` + "\n"))
	require.NoError(t, err)
	require.NoError(t, orphan.Commit())
	frozen.Store(true)
	clock.Advance(2 * time.Minute)
	b, err := bulkexport.NewStalledWorker(srv.Store, src, srv.Storage, &opts)
	require.NoError(t, err)
	runWorker(t, b)
	res := srv.Collect(t, statusURL)

	ids := res.IDs("Observation")
	require.Len(t, ids, 80)
	slices.Sort(ids)
	require.Len(t, slices.Compact(ids), 80, "every resource exactly once")
	job := lastJob(t, srv)
	require.Equal(t, 2, job.Attempts)

	// Worker A wakes up, finds its lease gone and stops without touching
	// the files of the job B completed.
	close(block)
	cancelA()
	require.NoError(t, <-doneA)
	names, err := srv.Storage.List(context.Background(), job.ID)
	require.NoError(t, err)
	require.Len(t, names, len(res.Manifest.Output), "no orphaned files")
}

// TestShutdownHandsJobBack stops the only worker mid-export; a new worker
// resumes the job from its checkpoint.
func TestShutdownHandsJobBack(t *testing.T) {
	t.Parallel()
	src := clinicalSource(t, 30)
	pause := src.Pause("Condition", 12) // held until the shutdown
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src})
	statusURL := srv.Kickoff(t, "/$export?_type=Condition")
	opts := bulkexport.WorkerOptions{PollInterval: 10 * time.Millisecond, MaxFileResources: 4, CheckpointInterval: time.Nanosecond}
	a, err := bulkexport.NewWorker(srv.Store, src, srv.Storage, &opts)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	<-pause.Reached()
	cancel()
	require.NoError(t, <-done)
	job := srv.Job(t, statusURL)
	require.Equal(t, bulkexport.StateQueued, job.State)
	require.NotEmpty(t, job.Output, "files recorded before the shutdown are kept")

	b, err := bulkexport.NewWorker(srv.Store, src, srv.Storage, &opts)
	require.NoError(t, err)
	runWorker(t, b)
	res := srv.Collect(t, statusURL)
	ids := res.IDs("Condition")
	slices.Sort(ids)
	require.Len(t, slices.Compact(ids), 30)
	require.Len(t, ids, 30)
}

// TestHandBacksAreNotAttempts: with MaxAttempts 1, a job handed back by
// two graceful shutdowns in a row still completes: only claims that ended
// without a hand-back count.
func TestHandBacksAreNotAttempts(t *testing.T) {
	t.Parallel()
	src := clinicalSource(t, 30)
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src})
	statusURL := srv.Kickoff(t, "/$export?_type=Condition")
	opts := bulkexport.WorkerOptions{PollInterval: 10 * time.Millisecond, MaxFileResources: 4, CheckpointInterval: time.Nanosecond, MaxAttempts: 1}
	for i, at := range []int{8, 20} {
		pause := src.Pause("Condition", at)
		w, err := bulkexport.NewWorker(srv.Store, src, srv.Storage, &opts)
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- w.Run(ctx) }()
		<-pause.Reached()
		cancel()
		require.NoError(t, <-done)
		job := srv.Job(t, statusURL)
		require.Equal(t, bulkexport.StateQueued, job.State, "shutdown %d", i+1)
		require.Zero(t, job.Attempts, "shutdown %d: a hand-back is not an attempt", i+1)
	}
	w, err := bulkexport.NewWorker(srv.Store, src, srv.Storage, &opts)
	require.NoError(t, err)
	runWorker(t, w)
	res := srv.Collect(t, statusURL)
	requireExactlyOnce(t, res, "Condition", 30)
	require.Equal(t, 1, srv.Job(t, statusURL).Attempts)
}

// TestRunLeavesNoGoroutines checks that Run owns its goroutines: none of
// the worker's code is running once Run has returned.
func TestRunLeavesNoGoroutines(t *testing.T) {
	src := clinicalSource(t, 20)
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src})
	for range 3 {
		srv.Kickoff(t, "/$export")
	}
	src.Delay = time.Millisecond
	w, err := bulkexport.NewWorker(srv.Store, src, srv.Storage, &bulkexport.WorkerOptions{PollInterval: 5 * time.Millisecond, Heartbeat: 5 * time.Millisecond, TypeConcurrency: 3})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	require.Eventually(t, func() bool {
		jobs, _ := srv.Store.List(context.Background(), bulkexport.Filter{States: []bulkexport.JobState{bulkexport.StateRunning}})
		return len(jobs) > 0
	}, 10*time.Second, time.Millisecond)
	cancel()
	require.NoError(t, <-done)
	// A goroutine that has signalled its WaitGroup may still be on its
	// way out for a moment; give the scheduler that moment, no more.
	leaked := func() string {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		for _, frame := range []string{"bulkexport.(*Worker)", "bulkexport.(*jobRun)", "bulkexport.(*typeRun)", "bulkexporttest.(*Source).Export"} {
			if strings.Contains(stacks, frame) {
				return frame
			}
		}
		return ""
	}
	for i := 0; i < 100 && leaked() != ""; i++ {
		runtime.Gosched()
		time.Sleep(time.Millisecond)
	}
	require.Empty(t, leaked(), "a goroutine outlived Run")
}

// TestTrustSource: with WorkerOptions.TrustSource, resources go to the
// files as the Source wrote them (no type or JSON check), but a line that
// would break the NDJSON file is still left out and reported.
func TestTrustSource(t *testing.T) {
	t.Parallel()
	src := writerSource{lines: []string{
		`{"resourceType":"Patient","id":"a"}`,
		`{"resourceType":"Observation","id":"trusted-though-wrong-type"}`,
		"{\"resourceType\":\"Patient\",\n\"id\":\"b\"}",
		`["not an object"]`,
		`{"resourceType":"Patient","id":"c"}`,
	}}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src,
		Worker: bulkexport.WorkerOptions{TrustSource: true}})
	statusURL := srv.Kickoff(t, "/$export")
	status, body := srv.Wait(t, statusURL)
	require.Equal(t, http.StatusOK, status, string(body))
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.Len(t, m.Error, 1)
	require.EqualValues(t, 2, *m.Error[0].Count, "the line break and the array are left out")
	require.Len(t, m.Output, 1)
	require.EqualValues(t, 3, *m.Output[0].Count, "the type is not checked")
	job := srv.Job(t, statusURL)
	fr, err := srv.Storage.Open(context.Background(), job.ID, job.Output[0].Name)
	require.NoError(t, err)
	defer fr.Close()
	b, err := io.ReadAll(fr)
	require.NoError(t, err)
	require.Equal(t, `{"resourceType":"Patient","id":"a"}`+"\n"+`{"resourceType":"Observation","id":"trusted-though-wrong-type"}`+"\n"+
		`{"resourceType":"Patient","id":"c"}`+"\n", string(b))
}
