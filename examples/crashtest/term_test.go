//go:build unix

package crashtest

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// termTimeout bounds a graceful shutdown: the server lets requests finish
// (at most 10 s) and hands its jobs back (at most 5 s each).
const termTimeout = 30 * time.Second

// TestTermTwiceSQLite: one server on a SQLite file with -max-attempts 2 is
// shut down gracefully (SIGTERM) twice in the middle of the exports and
// restarted each time. A graceful shutdown hands the running jobs back to
// the queue, and a hand-back is not an attempt: every claim of every job
// is its first attempt, the jobs are not given up after two claims, and
// they complete exactly once.
func TestTermTwiceSQLite(t *testing.T) {
	t.Parallel()
	skipShort(t)
	dir := t.TempDir()
	h := newHarness(t, []string{"-store", "sqlite:" + filepath.Join(dir, "jobs.db"), "-max-attempts", "2"})
	p := h.start("server")
	exps := exports()
	for _, e := range exps {
		h.kickoff(p, e)
	}
	sys := exps[0].id
	ids := []string{exps[0].id, exps[1].id}
	terms := 0
	for terms < 2 {
		h.waitFor(claimTimeout, p.name+" running the system export", func() bool {
			_, ok := p.claimedSeq[sys]
			return ok || h.completed[sys]
		})
		if h.isCompleted(sys) {
			break
		}
		time.Sleep(h.delay(300*time.Millisecond, 1500*time.Millisecond))
		if h.isCompleted(sys) {
			break
		}
		running := hcTerm(t, h, p)
		if slices.Contains(running, sys) {
			terms++
		}
		p = h.start("server")
	}
	h.waitFor(completeTimeout, "both exports to complete", func() bool { return h.allCompletedLocked(ids) })
	require.Equal(t, 2, terms, "the system export must have been interrupted by SIGTERM twice")
	handedBack := hcLogCount(t, h, `msg="bulkexport: job handed back on shutdown"`, sys)
	require.Equal(t, 2, handedBack, "the system export must have been handed back at each shutdown")
	h.mu.Lock()
	for _, id := range ids {
		for _, a := range h.attempts[id] {
			require.Equal(t, 1, a, "job %s: claimed with attempts %v; a hand-back must not count as an attempt", id, h.attempts[id])
		}
	}
	h.mu.Unlock()
	for _, e := range exps {
		h.verify(p, e)
	}
	h.report(ids)
}

// hcTerm shuts p down with SIGTERM and waits until it has exited (with
// status 0). It returns the jobs p was running.
func hcTerm(t *testing.T, h *harness, p *proc) []string {
	t.Helper()
	h.mu.Lock()
	p.killed = true // an expected exit
	var running []string
	for job := range p.claimedSeq {
		if !p.finished[job] {
			running = append(running, job)
		}
	}
	fmt.Fprintf(h.log, "[test] %s SIGTERM %s (running %v)\n", time.Since(h.started).Round(time.Millisecond), p.name, running)
	h.mu.Unlock()
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-p.exited:
	case <-time.After(termTimeout):
		t.Fatalf("%s did not shut down within %v of SIGTERM", p.name, termTimeout)
	}
	h.mu.Lock()
	err := p.exitErr
	h.mu.Unlock()
	require.NoError(t, err, "%s: exit after SIGTERM", p.name)
	t.Logf("%s: %s shut down by SIGTERM mid-export (running %d jobs)", time.Since(h.started).Round(time.Millisecond), p.name, len(running))
	return running
}

// hcLogCount counts the lines of the servers' output that contain msg and
// are about job.
func hcLogCount(t *testing.T, h *harness, msg, job string) int {
	t.Helper()
	h.mu.Lock()
	b, err := os.ReadFile(h.log.Name())
	h.mu.Unlock()
	require.NoError(t, err)
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, msg) && strings.Contains(line, "job="+job) {
			n++
		}
	}
	return n
}
