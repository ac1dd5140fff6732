//go:build linux

package crashtest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
)

// Store outage tests (issue 13): the job store goes away for a few seconds
// while the exports run, then comes back. Each job must end either
// completed, with every listed file downloadable, its line count equal to
// the manifest's count, every resource exactly once and the dataset's full
// counts, or failed cleanly: no file listed and its files gone. Polls during
// the outage must be answered (503 when the store cannot be read), not
// hang.
//
// The servers run slower than in the crash tests, so that the outage lands
// mid-export: 1,500 patients with a 2 ms pause each (the system export
// takes about 10 s), a 3 s lease, a checkpoint every second.
const (
	outagePatients    = 1500
	outagePace        = "2ms"
	outageLease       = "3s"
	outageCheckpoint  = "1s"
	outageMaxAttempts = "50"
	// outageFinishTimeout bounds the wait for both jobs to end after the
	// store is back.
	outageFinishTimeout = 90 * time.Second
	// outagePollTimeout is how long a poll may take before it counts as
	// hanging.
	outagePollTimeout = 10 * time.Second
)

// TestOutagePostgresStopped: the system export's PostgreSQL server is
// stopped (fast shutdown) for 6 s mid-export, longer than the lease, then
// started again.
func TestOutagePostgresStopped(t *testing.T) {
	t.Parallel()
	skipShort(t)
	pg := outageStartPostgres(t)
	runOutage(t, []string{"-store", "postgres:" + pg.url}, "PostgreSQL stopped for 6 s", func(h *harness) {
		pg.stop("fast")
		time.Sleep(6 * time.Second)
		pg.start()
	}, true)
}

// TestOutagePostgresRestarted: PostgreSQL crashes (immediate shutdown) and
// is back about 1.5 s later, well within the lease.
func TestOutagePostgresRestarted(t *testing.T) {
	t.Parallel()
	skipShort(t)
	pg := outageStartPostgres(t)
	runOutage(t, []string{"-store", "postgres:" + pg.url}, "PostgreSQL restarted", func(h *harness) {
		pg.stop("immediate")
		time.Sleep(1500 * time.Millisecond)
		pg.start()
	}, false)
}

// TestOutageSQLiteDiskFull: the SQLite database lives on a small tmpfs
// that a filler file fills up (ENOSPC) for 4 s mid-export; the export
// files are elsewhere.
func TestOutageSQLiteDiskFull(t *testing.T) {
	t.Parallel()
	skipShort(t)
	vol := outageMountTmpfs(t, "16m")
	runOutage(t, []string{"-store", "sqlite:" + filepath.Join(vol, "jobs.db")}, "SQLite volume full for 4 s", func(h *harness) {
		outageFill(t, vol, 4*time.Second)
	}, false)
}

// TestOutageSQLiteAndFilesDiskFull: the SQLite database and the export
// files share a tmpfs that fills up for 4 s mid-export, so that file
// writes fail as well as store writes.
func TestOutageSQLiteAndFilesDiskFull(t *testing.T) {
	t.Parallel()
	skipShort(t)
	vol := outageMountTmpfs(t, "128m")
	files := filepath.Join(vol, "files")
	runOutage(t, []string{"-store", "sqlite:" + filepath.Join(vol, "jobs.db"), "-storage", "dir:" + files},
		"SQLite and files volume full for 4 s", func(h *harness) {
			outageFill(t, vol, 4*time.Second)
		}, false)
}

// runOutage runs one server on storeArgs, kicks off the two exports, lets
// the system export run for a while, calls outage (which takes the store
// away and brings it back) while polling the system export, then waits for
// both jobs to end and checks each one. With want503, the polls during the
// outage must have met at least one 503.
func runOutage(t *testing.T, storeArgs []string, what string, outage func(*harness), want503 bool) {
	h := outageHarness(t, storeArgs)
	p := h.start("server")
	exps := exports()
	for _, e := range exps {
		h.kickoff(p, e)
	}
	sys := exps[0].id
	ids := []string{exps[0].id, exps[1].id}
	h.outageWait(claimTimeout, "the system export to start", func() bool {
		_, ok := p.claimedSeq[sys]
		return ok || h.completed[sys]
	})
	time.Sleep(h.delay(2*time.Second, 3500*time.Millisecond))
	require.False(t, h.isCompleted(sys), "the system export finished before the outage; make it slower")

	poller := h.outagePoll(p, sys)
	h.outageMark("outage begins: " + what)
	began := time.Now()
	outage(h)
	h.outageMark("outage over")
	t.Logf("%s: %s, over after %v", time.Since(h.started).Round(time.Millisecond), what, time.Since(began).Round(time.Millisecond))
	poller.finish()

	h.outageWait(outageFinishTimeout, "both jobs to complete or fail", func() bool {
		for _, id := range ids {
			if !h.completed[id] && h.failed[id] == "" {
				return false
			}
		}
		return true
	})
	for _, e := range exps {
		h.outageCheck(p, e)
	}
	poller.check(h, want503)
	h.outageLogSummary()
	h.report(ids)
}

var reOutageMsg = regexp.MustCompile(`level=(WARN|ERROR) msg="([^"]*)"`)

// outageLogSummary logs how many warnings and errors of each kind the
// servers logged, which shows what the outage did to them.
func (h *harness) outageLogSummary() {
	h.mu.Lock()
	b, err := os.ReadFile(h.log.Name())
	h.mu.Unlock()
	if err != nil {
		h.t.Logf("servers.log: %v", err)
		return
	}
	counts := map[string]int{}
	for _, line := range strings.Split(string(b), "\n") {
		if m := reOutageMsg.FindStringSubmatch(line); m != nil {
			counts[m[1]+" "+m[2]]++
		}
	}
	var lines []string
	for k, n := range counts {
		lines = append(lines, fmt.Sprintf("%4d× %s", n, k))
	}
	sort.Strings(lines)
	h.t.Logf("the servers' warnings and errors:\n%s", strings.Join(lines, "\n"))
}

// outageHarness is newHarness with the outage tests' settings: the server
// flags given later win over the harness's.
func outageHarness(t *testing.T, storeArgs []string) *harness {
	args := append(slices.Clone(storeArgs),
		"-patients", strconv.Itoa(outagePatients),
		"-pace", outagePace,
		"-lease", outageLease,
		"-checkpoint", outageCheckpoint,
		"-max-attempts", outageMaxAttempts,
		"-partitions", partitions)
	h := newHarness(t, args)
	h.ds = dataset.New(outagePatients)
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "-storage" {
			h.storage = strings.TrimPrefix(args[i+1], "dir:")
		}
	}
	return h
}

// outageMark writes a line to the servers' log.
func (h *harness) outageMark(msg string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	fmt.Fprintf(h.log, "[test] %s %s\n", time.Since(h.started).Round(time.Millisecond), msg)
}

// outageWait is waitFor without the failure on a failed job (a job may fail
// cleanly here).
func (h *harness) outageWait(timeout time.Duration, what string, cond func() bool) {
	h.t.Helper()
	h.wait(timeout, what, false, cond)
}

// outageCheck checks how export e ended: completed, with everything
// (verify), or failed cleanly, with an OperationOutcome for an answer, no
// file listed and no file left in the storage.
func (h *harness) outageCheck(p *proc, e *export) {
	t := h.t
	t.Helper()
	h.mu.Lock()
	completed, failed := h.completed[e.id], h.failed[e.id]
	h.mu.Unlock()
	if completed {
		require.Empty(t, failed, "%s: both completed and failed", e.name)
		h.verify(p, e)
		t.Logf("%s export: completed", e.name)
		return
	}
	require.NotEmpty(t, failed, "%s: neither completed nor failed", e.name)
	resp, body := h.get(p.base + "/$export-poll-status?_jobId=" + e.id)
	require.GreaterOrEqual(t, resp.StatusCode, 400, "%s: a failed job must answer an error: %s", e.name, body)
	var oo struct {
		ResourceType string            `json:"resourceType"`
		Output       []json.RawMessage `json:"output"`
	}
	require.NoError(t, json.Unmarshal(body, &oo), "%s: %s", e.name, body)
	require.Equal(t, "OperationOutcome", oo.ResourceType, "%s: %s", e.name, body)
	require.Empty(t, oo.Output, "%s: a failed job lists files", e.name)
	// A partitioned job's failure removes its files at once, and again a
	// lease later: runs of its parts in flight may commit a file until
	// they learn that the job ended. A bounded wait, not a timing
	// assertion.
	var names []string
	for deadline := time.Now().Add(30 * time.Second); ; {
		entries, err := os.ReadDir(filepath.Join(h.storage, e.id))
		if errors.Is(err, os.ErrNotExist) {
			names = nil
			break
		}
		require.NoError(t, err)
		names = names[:0]
		for _, ent := range entries {
			names = append(names, ent.Name())
		}
		if len(names) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	require.Empty(t, names, "%s: files of a failed job left in the storage", e.name)
	t.Logf("%s export: failed cleanly (%d: %s); no files left. Log: %s", e.name, resp.StatusCode, body, failed)
}

// ---------------------------------------------------------------------------
// Polling during the outage.

// outagePoller polls one job's status every 250 ms until finish.
type outagePoller struct {
	stop, done chan struct{}

	id        string
	mu        sync.Mutex
	codes     map[int]int
	hung      []string // polls that got no answer in time
	slowest   time.Duration
	answered  int
	startedAt time.Time
}

func (h *harness) outagePoll(p *proc, id string) *outagePoller {
	po := &outagePoller{id: id, stop: make(chan struct{}), done: make(chan struct{}), codes: map[int]int{}, startedAt: time.Now()}
	client := &http.Client{Timeout: outagePollTimeout}
	u := p.base + "/$export-poll-status?_jobId=" + id
	go func() {
		defer close(po.done)
		defer client.CloseIdleConnections()
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-po.stop:
				return
			case <-tick.C:
			}
			req, err := http.NewRequest(http.MethodGet, u, nil)
			if err != nil {
				panic(err)
			}
			req.Header.Set("Accept", "application/fhir+json")
			start := time.Now()
			resp, err := client.Do(req)
			took := time.Since(start)
			po.mu.Lock()
			po.slowest = max(po.slowest, took)
			if err != nil {
				po.hung = append(po.hung, fmt.Sprintf("after %v: %v", took.Round(time.Millisecond), err))
			} else {
				po.answered++
				po.codes[resp.StatusCode]++
				resp.Body.Close()
			}
			po.mu.Unlock()
		}
	}()
	return po
}

// finish stops the polling; it waits at most one poll's timeout.
func (po *outagePoller) finish() {
	close(po.stop)
	<-po.done
}

// check asserts that every poll was answered: 202 (or 200) while the
// store could be read, 503 while not, and an error status other than 503
// only when the job failed (the answer then is its failure). With
// want503, at least one 503 was seen.
func (po *outagePoller) check(h *harness, want503 bool) {
	t := h.t
	t.Helper()
	po.mu.Lock()
	defer po.mu.Unlock()
	var codes []string
	keys := make([]int, 0, len(po.codes))
	for c := range po.codes {
		keys = append(keys, c)
	}
	sort.Ints(keys)
	for _, c := range keys {
		codes = append(codes, fmt.Sprintf("%d×%d", c, po.codes[c]))
	}
	t.Logf("polls during the outage: %d answered (%s), slowest %v", po.answered, strings.Join(codes, " "), po.slowest.Round(time.Millisecond))
	require.Empty(t, po.hung, "polls during the outage got no answer within %v", outagePollTimeout)
	require.NotZero(t, po.answered)
	h.mu.Lock()
	failed := h.failed[po.id] != ""
	h.mu.Unlock()
	for c := range po.codes {
		switch c {
		case http.StatusOK, http.StatusAccepted, http.StatusServiceUnavailable, http.StatusTooManyRequests:
		default:
			require.True(t, failed && c >= 400, "a poll during the outage answered %d", c)
		}
	}
	if want503 {
		require.NotZero(t, po.codes[http.StatusServiceUnavailable], "no poll met the outage with a 503")
	}
}

// ---------------------------------------------------------------------------
// A throwaway PostgreSQL server.

// outagePG is a PostgreSQL server of one test, in its own directory and on
// its own port, which the test may stop and start.
type outagePG struct {
	t    *testing.T
	bin  string // the directory of initdb, pg_ctl and postgres
	dir  string
	port int
	url  string
	asPG bool // run the server as the postgres user (we are root)
}

// outageStartPostgres starts a new PostgreSQL server and stops and removes
// it when the test ends. It skips the test when no PostgreSQL server
// binaries are installed.
func outageStartPostgres(t *testing.T) *outagePG {
	t.Helper()
	bin := outagePGBin()
	if bin == "" {
		t.Skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) in /usr/lib/postgresql/*/bin or on PATH")
	}
	dir, err := os.MkdirTemp("", "bulkexport-outage-pg-")
	require.NoError(t, err)
	pg := &outagePG{t: t, bin: bin, dir: dir}
	t.Cleanup(func() {
		if _, err := os.Stat(filepath.Join(dir, "data", "postmaster.pid")); err == nil {
			if err := pg.ctl("-D", filepath.Join(dir, "data"), "-m", "immediate", "-w", "-t", "60", "stop"); err != nil {
				t.Errorf("stop PostgreSQL: %v", err)
			}
		}
		if t.Failed() {
			if b, err := os.ReadFile(filepath.Join(dir, "server.log")); err == nil {
				lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
				t.Logf("PostgreSQL's log (last lines):\n%s", strings.Join(lines[max(0, len(lines)-40):], "\n"))
			}
		}
		os.RemoveAll(dir)
	})
	if os.Geteuid() == 0 {
		// PostgreSQL refuses to run as root.
		u, err := user.Lookup("postgres")
		require.NoError(t, err, "running as root needs a postgres user to run PostgreSQL as (.ci/postgres.sh creates it)")
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		require.NoError(t, os.Chown(dir, uid, gid))
		pg.asPG = true
	}
	require.NoError(t, os.Chmod(dir, 0o700))
	require.NoError(t, pg.run(filepath.Join(bin, "initdb"), "-D", filepath.Join(dir, "data"), "-U", "postgres", "-A", "trust",
		"-E", "UTF8", "--no-locale", "--no-sync"), "initdb")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	pg.port = ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	pg.url = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", pg.port)
	pg.start()
	t.Logf("PostgreSQL on 127.0.0.1:%d in %s", pg.port, dir)
	return pg
}

// outagePGBin finds PostgreSQL's server binaries, the newest version first.
func outagePGBin() string {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[i])))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[j])))
		return vi > vj
	})
	if f, err := exec.LookPath("initdb"); err == nil {
		if r, err := filepath.EvalSymlinks(f); err == nil {
			dirs = append(dirs, filepath.Dir(r))
		}
	}
	for _, d := range dirs {
		ok := true
		for _, b := range []string{"initdb", "pg_ctl", "postgres"} {
			if fi, err := os.Stat(filepath.Join(d, b)); err != nil || fi.Mode()&0o111 == 0 {
				ok = false
			}
		}
		if ok {
			return d
		}
	}
	return ""
}

// run runs a PostgreSQL program (as the postgres user when we are root),
// from the server's directory, for at most two minutes.
func (pg *outagePG) run(prog string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var cmd *exec.Cmd
	if pg.asPG {
		cmd = exec.CommandContext(ctx, "runuser", append([]string{"-u", "postgres", "--", prog}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, prog, args...)
	}
	cmd.Dir = pg.dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v\n%s", filepath.Base(prog), strings.Join(args, " "), err, out)
	}
	return nil
}

func (pg *outagePG) ctl(args ...string) error {
	return pg.run(filepath.Join(pg.bin, "pg_ctl"), args...)
}

// start starts the server and waits until it accepts connections. Commits
// are synchronous: an immediate shutdown is a crash that loses nothing
// committed (fsync is off; the machine does not crash).
func (pg *outagePG) start() {
	pg.t.Helper()
	opts := fmt.Sprintf("-c listen_addresses=127.0.0.1 -p %d -c unix_socket_directories=%s -c fsync=off -c full_page_writes=off -c max_connections=100",
		pg.port, pg.dir)
	require.NoError(pg.t, pg.ctl("-D", filepath.Join(pg.dir, "data"), "-l", filepath.Join(pg.dir, "server.log"), "-w", "-t", "60",
		"-o", opts, "start"), "start PostgreSQL")
}

// stop stops the server with the given shutdown mode (fast, immediate).
func (pg *outagePG) stop(mode string) {
	pg.t.Helper()
	require.NoError(pg.t, pg.ctl("-D", filepath.Join(pg.dir, "data"), "-m", mode, "-w", "-t", "60", "stop"), "stop PostgreSQL")
}

// ---------------------------------------------------------------------------
// A volume that fills up.

// outageMountTmpfs mounts a tmpfs of the given size on a new directory and
// unmounts it when the test ends (after the servers are killed). It skips
// the test when the mount fails (not root, no CAP_SYS_ADMIN).
func outageMountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput()
	if err != nil {
		t.Skipf("cannot mount a tmpfs (needs root): %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
			_ = exec.Command("umount", "-l", dir).Run()
		}
	})
	return dir
}

// outageFill fills the volume at dir with a file until writes fail with
// ENOSPC, holds it full for hold, then removes the file.
func outageFill(t *testing.T, dir string, hold time.Duration) {
	t.Helper()
	name := filepath.Join(dir, "filler")
	f, err := os.Create(name)
	require.NoError(t, err)
	defer os.Remove(name)
	var n int64
	for _, chunk := range []int{1 << 20, 64 << 10, 4 << 10, 512} {
		buf := make([]byte, chunk)
		for {
			k, err := f.Write(buf)
			n += int64(k)
			if err != nil {
				require.ErrorIs(t, err, syscall.ENOSPC)
				break
			}
		}
	}
	t.Logf("the volume is full (a filler of %d bytes); holding it full for %v", n, hold)
	time.Sleep(hold)
	require.NoError(t, f.Close())
	require.NoError(t, os.Remove(name))
}
