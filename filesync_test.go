package bulkexport_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// The paced exports of these tests: the clock moves 1ms per resource and
// a checkpoint is due every 7ms, so that about every seventh resource is a
// checkpoint, never in step with the file size of 100.
const (
	pacedStep     = time.Millisecond
	pacedInterval = 7 * time.Millisecond
	pacedFileSize = 100
)

// pacedExport is an Observation export of 1,050 resources over a clock
// that a paced Source moves on.
type pacedExport struct {
	srv       *bulkexporttest.Server
	clock     *bulkexporttest.Clock
	src       *bulkexporttest.Source
	statusURL string
	// interval is the checkpoint interval (pacedInterval unless set).
	interval time.Duration
	// hook, if set, runs after the clock has moved, before resource n.
	hook atomic.Pointer[func(ctx context.Context, n int) error]
}

func newPacedExport(t *testing.T) *pacedExport {
	t.Helper()
	p := &pacedExport{clock: bulkexporttest.NewClock(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)), src: clinicalSource(t, 525), interval: pacedInterval}
	p.src.OnResource = func(ctx context.Context, typ string, n int) error {
		p.clock.Advance(pacedStep)
		if h := p.hook.Load(); h != nil && typ == "Observation" {
			return (*h)(ctx, n)
		}
		return nil
	}
	p.srv = bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: p.src, Clock: p.clock})
	p.statusURL = p.srv.Kickoff(t, "/$export?_type=Observation")
	return p
}

// onResource sets the hook.
func (p *pacedExport) onResource(fn func(ctx context.Context, n int) error) { p.hook.Store(&fn) }

// worker returns a stalled Worker (its lease is never renewed, so that
// moving the clock by a minute hands the job to the next worker) over
// storage, with the paced checkpoint interval and files of 100, that runs
// one job at a time.
func (p *pacedExport) worker(t *testing.T, storage bulkexport.Storage, log slog.Handler) *bulkexport.Worker {
	t.Helper()
	if log == nil {
		log = slog.NewTextHandler(io.Discard, nil)
	}
	w, err := bulkexport.NewStalledWorker(p.srv.Store, p.src, storage, &bulkexport.WorkerOptions{
		// One job at a time: a stalled worker must not claim its own job
		// again (TestOwnReclaimStopsOlderRun covers that).
		Concurrency: 1,
		Now:         p.clock.Now, Lease: time.Minute, Heartbeat: time.Hour, PollInterval: 5 * time.Millisecond,
		MaxFileResources: pacedFileSize, CheckpointInterval: p.interval, Logger: slog.New(log),
	})
	require.NoError(t, err)
	return w
}

// startStalled runs a worker that stops for good at Observation n (until
// the test ends), as a crashed or paused process; the clock then moves
// past its lease. It returns when the worker has stopped there.
func (p *pacedExport) startStalled(t *testing.T, storage bulkexport.Storage, n int, log slog.Handler) (wake chan struct{}) {
	t.Helper()
	reached, wake := make(chan struct{}), make(chan struct{})
	var once atomic.Bool
	p.onResource(func(ctx context.Context, i int) error {
		if i == n && once.CompareAndSwap(false, true) {
			close(reached)
			select {
			case <-wake:
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
		return nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.worker(t, storage, log).Run(ctx) }()
	t.Cleanup(func() {
		select {
		case <-wake:
		default:
			close(wake)
		}
		cancel()
		require.NoError(t, <-done)
	})
	select {
	case <-reached:
	case <-time.After(30 * time.Second):
		t.Fatal("timed out waiting for the first run to stall")
	}
	p.clock.Advance(2 * time.Minute) // its lease runs out
	return wake
}

// jobDir lists the job's directory in the DirStorage.
func (p *pacedExport) jobDir(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(p.srv.Storage.Root(), lastJob(t, p.srv).ID))
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// requireThresholdFiles checks that every output file of typ but the last
// holds exactly per resources (as recorded and as read back), and the last
// one at most per; it returns the files.
func requireThresholdFiles(t *testing.T, srv *bulkexporttest.Server, typ string, per int64) []bulkexport.File {
	t.Helper()
	job := lastJob(t, srv)
	require.Equal(t, bulkexport.StateCompleted, job.State)
	var files []bulkexport.File
	for _, f := range job.Output {
		if f.Type == typ {
			files = append(files, f)
		}
	}
	require.NotEmpty(t, files)
	for i, f := range files {
		r, err := srv.Storage.Open(context.Background(), job.ID, f.Name)
		require.NoError(t, err)
		var lines int64
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			lines++
		}
		require.NoError(t, sc.Err())
		require.NoError(t, r.Close())
		require.Equal(t, f.Count, lines, "file %s", f.Name)
		if i < len(files)-1 {
			require.Equal(t, per, f.Count, "file %d of %d (%s) is cut by the size limit only", i+1, len(files), f.Name)
		} else {
			require.True(t, f.Count > 0 && f.Count <= per, "last file %s holds %d", f.Name, f.Count)
		}
	}
	return files
}

// TestFilesCutByThresholdsOnly: an export whose checkpoints come far more
// often than its files fill (the acceptance test's 20-minute export with
// the default interval, shortened: a paced Source and a short checkpoint
// interval) gets files cut by MaxFileResources or MaxFileBytes only.
func TestFilesCutByThresholdsOnly(t *testing.T) {
	t.Parallel()
	t.Run("MaxFileResources", func(t *testing.T) {
		t.Parallel()
		p := newPacedExport(t)
		runWorker(t, p.worker(t, p.srv.Storage, nil))
		res := p.srv.Collect(t, p.statusURL)
		requireExactlyOnce(t, res, "Observation", 1050)
		files := requireThresholdFiles(t, p.srv, "Observation", pacedFileSize)
		require.Len(t, files, 11)
		require.EqualValues(t, 50, files[10].Count)
	})
	t.Run("MaxFileBytes", func(t *testing.T) {
		t.Parallel()
		clock := bulkexporttest.NewClock(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
		src := bulkexporttest.NewSource()
		const n = 1050
		line := 0
		for i := range n {
			r := fmt.Sprintf(`{"resourceType":"Patient","id":"p%05d"}`, i)
			line = len(r) + 1
			require.NoError(t, src.Add(r))
		}
		src.OnResource = func(context.Context, string, int) error {
			clock.Advance(pacedStep)
			return nil
		}
		srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{NoWorker: true, Source: src, Clock: clock})
		statusURL := srv.Kickoff(t, "/$export?_type=Patient")
		maxBytes := int64(40*line + line/2) // room for 40 lines, not 41
		w, err := bulkexport.NewWorker(srv.Store, src, srv.Storage, &bulkexport.WorkerOptions{
			Now: clock.Now, PollInterval: 5 * time.Millisecond,
			MaxFileBytes: maxBytes, CheckpointInterval: pacedInterval,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		})
		require.NoError(t, err)
		runWorker(t, w)
		res := srv.Collect(t, statusURL)
		requireExactlyOnce(t, res, "Patient", n)
		files := requireThresholdFiles(t, srv, "Patient", 40)
		require.Len(t, files, 27) // 26 × 40 + 10
		for _, f := range files {
			require.LessOrEqual(t, f.Size, maxBytes)
		}
	})
}

// TestOrganizedFilesIgnoreCheckpoints: organized output (organizeOutputBy)
// is not cut by checkpoints either: with a checkpoint after every block,
// its files are the same as with no checkpoint at all.
func TestOrganizedFilesIgnoreCheckpoints(t *testing.T) {
	t.Parallel()
	layout := func(interval time.Duration) []bulkexport.File {
		srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
			Source: clinicalSource(t, 60),
			Worker: bulkexport.WorkerOptions{MaxFileResources: 25, CheckpointInterval: interval},
		})
		res := srv.Export(t, "/Patient/$export?organizeOutputBy=Patient")
		require.Len(t, res.Output[""], 60*5) // a header and four resources per patient
		files := lastJob(t, srv).Output
		for i := range files {
			files[i].Name = strings.Replace(files[i].Name, ".c1.", ".c.", 1)
			files[i].ContinuesIn = strings.Replace(files[i].ContinuesIn, ".c1.", ".c.", 1)
		}
		return files
	}
	every := layout(time.Nanosecond)
	require.Greater(t, len(every), 5)
	require.Equal(t, layout(time.Hour), every)
}

// TestResumeContinuesOpenFile: a run crashes between two checkpoints with
// a file half full; the next run continues that file (a copy of what the
// last checkpoint synced, under its own fence) and drops what was written
// after the checkpoint, which the Source writes again. That run crashes
// too, before its first checkpoint: the third continues the copy, which
// the second recorded before anything else. Every file but the last is
// full, and every resource is there exactly once.
func TestResumeContinuesOpenFile(t *testing.T) {
	t.Parallel()
	p := newPacedExport(t)
	// The crashed processes had DirStorages of their own: their open files
	// are not open writers of the last run's storage.
	crashed := func() bulkexport.Storage {
		s, err := bulkexport.NewDirStorage(p.srv.Storage.Root())
		require.NoError(t, err)
		return s
	}
	p.startStalled(t, crashed(), 253, nil)
	stalled := lastJob(t, p.srv)
	cp := openFiles(t, stalled)
	require.Len(t, cp.Open, 1, "the checkpoint records the open output file")
	require.Greater(t, cp.Open[0].Count, int64(0))
	require.Less(t, cp.Open[0].Count, int64(53), "resources written after the checkpoint are not recorded")
	require.Len(t, stalled.Output, 2, "only the full files are committed")
	// The crash flushed more than the checkpoint synced: the copy must
	// stop at the recorded size.
	path := filepath.Join(p.srv.Storage.Root(), stalled.ID, cp.Open[0].Handle)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	require.NoError(t, err)
	_, err = f.WriteString(`{"resourceType":"Observation","id":"p0-hr"}` + "\n")
	require.NoError(t, err)
	require.NoError(t, f.Close())

	cursor, err := strconv.Atoi(cp.Cursor)
	require.NoError(t, err)
	p.startStalled(t, crashed(), cursor+2, nil)
	second := openFiles(t, lastJob(t, p.srv))
	require.Equal(t, cp.Cursor, second.Cursor, "the second run crashed before its first checkpoint")
	require.Len(t, second.Open, 1)
	require.NotEqual(t, cp.Open[0].Handle, second.Open[0].Handle, "the second run recorded its copy")
	require.Equal(t, cp.Open[0].Count, second.Open[0].Count)

	p.onResource(func(context.Context, int) error { return nil })
	runWorker(t, p.worker(t, p.srv.Storage, nil))
	res := p.srv.Collect(t, p.statusURL)
	requireExactlyOnce(t, res, "Observation", 1050)
	files := requireThresholdFiles(t, p.srv, "Observation", pacedFileSize)
	require.Len(t, files, 11)
	job := lastJob(t, p.srv)
	require.Equal(t, 3, job.Attempts)
	fence, _ := bulkexport.FileFence(files[2].Name)
	require.Equal(t, job.Fence, fence, "the continued file is the last run's")
	names := p.jobDir(t)
	require.Len(t, names, 11, "no temporary file left: %v", names)
}

// typeState is the part of the engine's checkpoint (Job.Checkpoint) that
// these tests look at: the Observation type's cursor and open files.
type typeState struct {
	Cursor string `json:"cursor"`
	Open   []struct {
		Handle string `json:"handle"`
		Count  int64  `json:"count"`
	} `json:"open"`
}

func openFiles(t *testing.T, job *bulkexport.Job) typeState {
	t.Helper()
	var cp struct {
		Types map[string]typeState `json:"types"`
	}
	require.NoError(t, json.Unmarshal(job.Checkpoint, &cp))
	return cp.Types["Observation"]
}

// TestResumeAfterOpenFileFilled: a run records a file as open at a
// checkpoint, then fills and commits it, and crashes before its next
// checkpoint records that. The synced temporary file is gone (the commit
// renamed it); the next run continues from the committed file instead,
// and removes it (no checkpoint lists it).
func TestResumeAfterOpenFileFilled(t *testing.T) {
	t.Parallel()
	p := newPacedExport(t)
	p.interval = 30 * time.Millisecond // checkpoints after 29, 59, 89 and 119 resources
	crashed, err := bulkexport.NewDirStorage(p.srv.Storage.Root())
	require.NoError(t, err)
	p.startStalled(t, crashed, 101, nil)
	stalled := lastJob(t, p.srv)
	cp := openFiles(t, stalled)
	require.Len(t, cp.Open, 1)
	require.Less(t, cp.Open[0].Count, int64(pacedFileSize), "the checkpoint recorded the first file open")
	require.Empty(t, stalled.Output, "and the commit of the first file is not recorded")
	committed, err := p.srv.Storage.List(context.Background(), stalled.ID)
	require.NoError(t, err)
	require.Len(t, committed, 1, "the crashed run committed the first file")
	for _, n := range p.jobDir(t) {
		require.False(t, strings.HasPrefix(n, "~Observation.000001."), "the recorded temporary file is gone: %s", n)
	}

	p.onResource(func(context.Context, int) error { return nil })
	runWorker(t, p.worker(t, p.srv.Storage, nil))
	res := p.srv.Collect(t, p.statusURL)
	requireExactlyOnce(t, res, "Observation", 1050)
	files := requireThresholdFiles(t, p.srv, "Observation", pacedFileSize)
	require.Len(t, files, 11)
	names := p.jobDir(t)
	require.Len(t, names, 11, "the crashed run's committed file is removed: %v", names)
}

// TestResumeLostPrefixFails: the synced file that the last checkpoint
// recorded is gone, or shorter than recorded, when the job resumes. The
// resources it held cannot be written again (the Source resumes after
// them), so the job fails, listing no file.
func TestResumeLostPrefixFails(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		break_ func(path string) error
	}{
		{"missing", os.Remove},
		{"short", func(path string) error { return os.Truncate(path, 10) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := newPacedExport(t)
			crashed, err := bulkexport.NewDirStorage(p.srv.Storage.Root())
			require.NoError(t, err)
			p.startStalled(t, crashed, 253, nil)
			var temp []string
			for _, n := range p.jobDir(t) {
				if strings.HasPrefix(n, "~Observation.000003.") {
					temp = append(temp, n)
				}
			}
			require.Len(t, temp, 1, "the crashed run's open file")
			require.NoError(t, tc.break_(filepath.Join(p.srv.Storage.Root(), lastJob(t, p.srv).ID, temp[0])))

			p.onResource(func(context.Context, int) error { return nil })
			runWorker(t, p.worker(t, p.srv.Storage, nil))
			code, body := p.srv.Wait(t, p.statusURL)
			require.Equal(t, http.StatusInternalServerError, code, "%s", body)
			require.Contains(t, string(body), "could not be recovered")
			job := lastJob(t, p.srv)
			require.Equal(t, bulkexport.StateFailed, job.State)
			require.Empty(t, job.Output)
			// The files go once the failure is recorded, just after the
			// poll can see it.
			require.Eventually(t, func() bool { // bounds a wait, not a timing assertion
				names, err := p.srv.Storage.List(context.Background(), job.ID)
				require.NoError(t, err)
				return len(names) == 0
			}, 10*time.Second, time.Millisecond, "the failed job's files are removed")
		})
	}
}

// TestStaleRunWritingAfterTakeover: a run paused past its lease (in the
// same process, through the same DirStorage) wakes up while the run that
// took the job over is under way, and goes on writing to, and syncing,
// the open file that the new run continued. The new run's copy is its
// own: the completed export is exactly once and cut by size only.
func TestStaleRunWritingAfterTakeover(t *testing.T) {
	t.Parallel()
	p := newPacedExport(t)
	staleLost := newLogWatch("lease lost")
	wake := p.startStalled(t, p.srv.Storage, 253, staleLost)
	var old []string
	for _, n := range p.jobDir(t) {
		if strings.HasPrefix(n, "~Observation.000003.") {
			old = append(old, n)
		}
	}
	require.Len(t, old, 1, "the stale run's open file")
	oldPath := filepath.Join(p.srv.Storage.Root(), lastJob(t, p.srv).ID, old[0])
	size := func() int64 {
		fi, err := os.Stat(oldPath)
		require.NoError(t, err, "a file of an open writer of this process is not swept")
		return fi.Size()
	}

	// The new run stops at 400, having continued (copied) the old file;
	// the stale run wakes, writes into the old file and syncs it at its
	// next checkpoint, which the store refuses.
	stopped, resume := make(chan struct{}), make(chan struct{})
	var once atomic.Bool
	p.onResource(func(ctx context.Context, n int) error {
		if n == 400 && once.CompareAndSwap(false, true) {
			close(stopped)
			select {
			case <-resume:
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
		return nil
	})
	lost := newLogWatch("lease lost")
	runWorker(t, p.worker(t, p.srv.Storage, lost))
	<-stopped
	copied := size()
	close(wake)
	select {
	case <-staleLost.seen:
	case <-time.After(30 * time.Second):
		t.Fatal("timed out waiting for the stale run to stop")
	}
	require.Greater(t, size(), copied, "the stale run wrote to its old file after the takeover")
	close(resume)

	res := p.srv.Collect(t, p.statusURL)
	requireExactlyOnce(t, res, "Observation", 1050)
	files := requireThresholdFiles(t, p.srv, "Observation", pacedFileSize)
	require.Len(t, files, 11)
	select {
	case <-lost.seen:
		t.Fatal("the new run lost its lease")
	default:
	}
	names := p.jobDir(t)
	require.Len(t, names, 11, "the released file of the stale run is swept at completion: %v", names)
}

// hiddenSync is a Storage that hides the optional interfaces of the one it
// wraps (SyncedOpener among them): the engine commits the open files at
// each checkpoint, as with a Storage that cannot sync.
type hiddenSync struct{ bulkexport.Storage }

// TestNoSyncedOpenerCutsAtCheckpoints: over a Storage that is no
// SyncedOpener, each checkpoint commits the open files, as before: the
// files are small, and a crashed and resumed export still holds every
// resource exactly once.
func TestNoSyncedOpenerCutsAtCheckpoints(t *testing.T) {
	t.Parallel()
	p := newPacedExport(t)
	storage := hiddenSync{p.srv.Storage}
	p.startStalled(t, storage, 253, nil)
	stalled := lastJob(t, p.srv)
	require.Greater(t, len(stalled.Output), 20, "files cut at checkpoints")
	require.NotContains(t, string(stalled.Checkpoint), `"open"`)

	p.onResource(func(context.Context, int) error { return nil })
	runWorker(t, p.worker(t, storage, nil))
	res := p.srv.Collect(t, p.statusURL)
	requireExactlyOnce(t, res, "Observation", 1050)
	job := lastJob(t, p.srv)
	require.Greater(t, len(job.Output), 100, "files cut at checkpoints")
	for _, f := range job.Output {
		require.LessOrEqual(t, f.Count, int64(pacedFileSize))
	}
	require.True(t, slices.ContainsFunc(job.Output, func(f bulkexport.File) bool { return f.Count <= 8 }), "files of one checkpoint's resources")
}
