//go:build unix

package crashtest

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/pgstore"
)

// TestPausePostgresPartitioned: two servers share a PostgreSQL database
// and the storage directory, and the exports are split into parts. Twice,
// a server exporting parts of the system export is stopped with SIGSTOP
// and left stopped until the other server has claimed one of its parts
// again (its lease ran out); then it is continued, a stale worker that
// still believes it holds those parts. It must give them up without its
// late writes reaching the export, which must come out exactly once.
func TestPausePostgresPartitioned(t *testing.T) {
	t.Parallel()
	skipShort(t)
	h := newHarness(t, []string{"-store", "postgres:" + needPostgres(t), "-pg-schema", freshSchema(t)})
	pz := hcNewPauser(t, h)
	servers := map[string]*proc{"A": h.start("A"), "B": h.start("B")}
	exps := exports()
	for _, e := range exps {
		h.kickoff(servers["A"], e)
	}
	sys := exps[0].id
	ids := []string{exps[0].id, exps[1].id}
	takeovers := 0
	for round := 0; round < 2; round++ {
		var owner *proc
		h.waitFor(claimTimeout, "a server exporting parts of the system export", func() bool {
			for _, name := range []string{"A", "B"} {
				if p := servers[name]; p.liveUnits[sys] > 0 {
					owner = p
					return true
				}
			}
			return h.completed[sys]
		})
		if owner == nil {
			break
		}
		h.mu.Lock()
		reclaims := h.unitReclaims[sys]
		h.mu.Unlock()
		pz.stop(owner)
		h.waitFor(claimTimeout, "a part of the stopped server claimed again", func() bool {
			return h.unitReclaims[sys] > reclaims || h.completed[sys]
		})
		tookOver := !h.isCompleted(sys)
		pz.cont(owner)
		if !hcWait(h, claimTimeout, func() bool { return owner.liveUnits[sys] <= 0 || h.completed[sys] }) {
			hcQuit(t, h, owner)
			t.Fatalf("%s did not give up the parts it held within %v of SIGCONT", owner.name, claimTimeout)
		}
		if !tookOver {
			break
		}
		takeovers++
		t.Logf("round %d: stopped %s; its parts were claimed again, and it gave them up after SIGCONT", round+1, owner.name)
	}
	h.waitFor(completeTimeout, "both exports to complete", func() bool { return h.allCompletedLocked(ids) })
	require.GreaterOrEqual(t, takeovers, 1, "parts of the system export must have been taken over")
	for _, e := range exps {
		h.verify(servers["A"], e)
	}
	h.report(ids)
}

// TestPausePostgresTwoServers: two servers share a PostgreSQL database and
// the storage directory. Three times (early, in the middle and late in the
// system export), the server running the system export is stopped with
// SIGSTOP right after it recorded a checkpoint, and left stopped until the
// other server has taken the job over (its lease has run out); then it is
// continued with SIGCONT, a stale worker that still believes it holds the
// job. It must find out that it lost the job without touching the files
// the job record lists, and the export must still come out exactly once.
func TestPausePostgresTwoServers(t *testing.T) {
	t.Parallel()
	skipShort(t)
	pgURL := needPostgres(t)
	schema := freshSchema(t)
	// Unpartitioned: the points are read from the job's own checkpoint
	// (TestPausePostgresPartitioned pauses servers holding parts).
	h := newHarness(t, []string{"-store", "postgres:" + pgURL, "-pg-schema", schema, "-partitions", "1"})
	pz := hcNewPauser(t, h)
	db := hcOpenJobs(t, pgURL, schema)
	servers := map[string]*proc{"A": h.start("A"), "B": h.start("B")}
	exps := exports()
	for _, e := range exps {
		h.kickoff(servers["A"], e)
	}
	sys := exps[0]
	ids := []string{exps[0].id, exps[1].id}
	total := hcExpectedTotal(t, h, sys)

	// The points of the system export (the share of its resources in
	// recorded files) after which the next checkpoint is the one the
	// owner is stopped at.
	points := []struct {
		name  string
		share float64
	}{{"early", 0.10}, {"middle", 0.40}, {"late", 0.70}}
	takeovers := 0
	for _, pt := range points {
		// Wait for a checkpoint of the system export past the point,
		// and stop its owner right after it.
		var owner *proc
		var before *bulkexport.Job
		last := int64(-1)
		deadline := time.Now().Add(claimTimeout)
		for owner == nil {
			require.False(t, time.Now().After(deadline), "%s: no checkpoint of the system export past %.0f%% within %v", pt.name, pt.share*100, claimTimeout)
			h.waitFor(time.Second, "", func() bool { return true }) // fails the test on a failed job or a dead server
			j := db.get(t, sys.id)
			if j.State == bulkexport.StateCompleted {
				break
			}
			written := hcWritten(t, j)
			if j.State == bulkexport.StateRunning && last >= 0 && written > last && float64(written) >= pt.share*float64(total) {
				h.mu.Lock()
				owner = h.runnerLocked(sys.id)
				h.mu.Unlock()
				if owner != nil {
					pz.stop(owner)
					before = j
					break
				}
			}
			last = written
			time.Sleep(2 * time.Millisecond)
		}
		if owner == nil {
			t.Logf("%s: the system export finished before the point", pt.name)
			break
		}
		h.mu.Lock()
		seq := h.seq
		var running []string // the jobs the stopped server holds
		for job := range owner.claimedSeq {
			if !owner.finished[job] {
				running = append(running, job)
			}
		}
		h.mu.Unlock()
		// What the job record lists once the owner is stopped: the
		// committed files, which nobody may change from now on.
		stopped := db.get(t, sys.id)
		require.Equal(t, before.Fence, stopped.Fence, "%s: the job changed hands between the checkpoint and SIGSTOP", pt.name)
		snap := hcSnapshot(t, h, stopped)
		t.Logf("%s: stopped %s right after a checkpoint of the system export at %d/%d resources (fence %d, %d files listed)",
			pt.name, owner.name, hcWritten(t, before), total, stopped.Fence, len(snap))

		other := servers["A"]
		if owner.server == "A" {
			other = servers["B"]
		}
		h.waitFor(claimTimeout, other.name+" taking the system export over", func() bool {
			return other.claimedSeq[sys.id] > seq || h.completed[sys.id]
		})
		tookOver := !h.isCompleted(sys.id)
		pz.cont(owner)
		// The stale worker notices, at its first store update or
		// heartbeat, that it lost each job it held.
		if !hcWait(h, claimTimeout, func() bool {
			for _, job := range running {
				if !owner.finished[job] {
					return false
				}
			}
			return true
		}) {
			hcQuit(t, h, owner)
			t.Fatalf("%s: %s did not give up the jobs it held (%v) within %v of SIGCONT", pt.name, owner.name, running, claimTimeout)
		}
		hcCheckSnapshot(t, h, db.get(t, sys.id), snap, pt.name)
		if !tookOver {
			t.Logf("%s: the system export finished before the takeover", pt.name)
			break
		}
		takeovers++
		after := db.get(t, sys.id)
		t.Logf("%s: %s took the system export over (fence %d -> %d); %s then gave it up", pt.name, other.name, stopped.Fence, after.Fence, owner.name)
	}
	h.waitFor(completeTimeout, "both exports to complete", func() bool { return h.allCompletedLocked(ids) })
	require.Equal(t, len(points), takeovers, "the system export must have been taken over at every point")
	for _, e := range exps {
		h.verify(servers["A"], e)
	}
	h.report(ids)
}

// ---------------------------------------------------------------------------
// Helpers of the pause tests (prefixed hc).

// hcPauser stops and continues server processes, and continues every one
// still stopped when the test ends (before the harness kills them).
type hcPauser struct {
	h       *harness
	mu      sync.Mutex
	stopped map[*proc]bool
}

func hcNewPauser(t *testing.T, h *harness) *hcPauser {
	pz := &hcPauser{h: h, stopped: map[*proc]bool{}}
	// Registered after newHarness's cleanup, so it runs first.
	t.Cleanup(func() {
		pz.mu.Lock()
		defer pz.mu.Unlock()
		for p := range pz.stopped {
			_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGCONT)
		}
		clear(pz.stopped)
	})
	return pz
}

func (pz *hcPauser) signal(p *proc, sig syscall.Signal, what string) {
	h := pz.h
	h.t.Helper()
	h.mu.Lock()
	fmt.Fprintf(h.log, "[test] %s %s %s\n", time.Since(h.started).Round(time.Millisecond), what, p.name)
	h.mu.Unlock()
	require.NoError(h.t, syscall.Kill(p.cmd.Process.Pid, sig), "%s %s", what, p.name)
}

func (pz *hcPauser) stop(p *proc) {
	pz.mu.Lock()
	pz.stopped[p] = true
	pz.mu.Unlock()
	pz.signal(p, syscall.SIGSTOP, "SIGSTOP")
}

func (pz *hcPauser) cont(p *proc) {
	pz.signal(p, syscall.SIGCONT, "SIGCONT")
	pz.mu.Lock()
	delete(pz.stopped, p)
	pz.mu.Unlock()
}

// hcWait is harness.waitFor that reports a timeout instead of failing
// the test.
func hcWait(h *harness, timeout time.Duration, cond func() bool) bool {
	h.t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		h.waitFor(time.Second, "", func() bool { return true }) // a failed job or a dead server fails the test
		h.mu.Lock()
		ok := cond()
		ch := h.changed
		h.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-ch:
		case <-time.After(100 * time.Millisecond):
		case <-timer.C:
			return false
		}
	}
}

// hcQuit makes a stuck server print its goroutines (SIGQUIT) and logs
// them.
func hcQuit(t *testing.T, h *harness, p *proc) {
	h.mu.Lock()
	p.killed = true
	fmt.Fprintf(h.log, "[test] %s SIGQUIT %s\n", time.Since(h.started).Round(time.Millisecond), p.name)
	h.mu.Unlock()
	_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGCONT)
	_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGQUIT)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
	}
	h.mu.Lock()
	b, _ := os.ReadFile(h.log.Name())
	h.mu.Unlock()
	var dump []string
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "["+p.name+"] "); ok {
			dump = append(dump, rest)
		}
	}
	t.Logf("output of %s:\n%s", p.name, strings.Join(dump, "\n"))
}

// hcJobs reads the servers' jobs table directly.
type hcJobs struct {
	conn  *pgx.Conn
	query string
}

func hcOpenJobs(t *testing.T, pgURL, schema string) *hcJobs {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pgURL)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	table := pgx.Identifier{schema, pgstore.DefaultTable}.Sanitize()
	return &hcJobs{conn: conn, query: "SELECT data FROM " + table + " WHERE id = $1"}
}

func (db *hcJobs) get(t *testing.T, id string) *bulkexport.Job {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var data []byte
	require.NoError(t, db.conn.QueryRow(ctx, db.query, id).Scan(&data))
	var j bulkexport.Job
	require.NoError(t, json.Unmarshal(data, &j))
	return &j
}

// hcWritten is the number of resources in the recorded files of a job, by
// its checkpoint.
func hcWritten(t *testing.T, j *bulkexport.Job) int64 {
	t.Helper()
	if len(j.Checkpoint) == 0 {
		return 0
	}
	var cp struct {
		Types map[string]struct {
			Written int64 `json:"written"`
		} `json:"types"`
	}
	require.NoError(t, json.Unmarshal(j.Checkpoint, &cp))
	var n int64
	for _, tc := range cp.Types {
		n += tc.Written
	}
	return n
}

// hcExpectedTotal is the number of resources export e must produce.
func hcExpectedTotal(t *testing.T, h *harness, e *export) int64 {
	q := e.query
	q.TransactionTime = time.Now()
	var n int64
	for _, typ := range e.types {
		ids, err := h.ds.Expected(&q, typ)
		require.NoError(t, err)
		n += int64(len(ids))
	}
	return n
}

// hcFile is a committed file as it was when snapshotted.
type hcFile struct {
	size int64
	sum  [sha256.Size]byte
	mod  time.Time
}

// hcSnapshot records every file job j lists, as it is in the storage.
func hcSnapshot(t *testing.T, h *harness, j *bulkexport.Job) map[string]hcFile {
	t.Helper()
	snap := map[string]hcFile{}
	for _, list := range [][]bulkexport.File{j.Output, j.Deleted, j.Errors} {
		for _, f := range list {
			snap[f.Name] = hcReadFile(t, filepath.Join(h.storage, j.ID, f.Name))
			require.Equal(t, f.Size, snap[f.Name].size, "%s: size and recorded size differ", f.Name)
		}
	}
	return snap
}

func hcReadFile(t *testing.T, name string) hcFile {
	t.Helper()
	f, err := os.Open(name)
	require.NoError(t, err, "a listed file")
	defer f.Close()
	st, err := f.Stat()
	require.NoError(t, err)
	d := sha256.New()
	n, err := io.Copy(d, f)
	require.NoError(t, err)
	var out hcFile
	out.size, out.mod = n, st.ModTime()
	copy(out.sum[:], d.Sum(nil))
	return out
}

// hcCheckSnapshot checks that the files in snap are still there, each
// with the same contents, and that the job still lists them.
func hcCheckSnapshot(t *testing.T, h *harness, j *bulkexport.Job, snap map[string]hcFile, what string) {
	t.Helper()
	listed := map[string]bool{}
	for _, list := range [][]bulkexport.File{j.Output, j.Deleted, j.Errors} {
		for _, f := range list {
			listed[f.Name] = true
		}
	}
	names := make([]string, 0, len(snap))
	for n := range snap {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		require.True(t, listed[n], "%s: committed file %s is no longer listed in the job", what, n)
		got := hcReadFile(t, filepath.Join(h.storage, j.ID, n))
		require.Equal(t, snap[n], got, "%s: committed file %s changed after the stale server was continued", what, n)
	}
}
