//go:build unix

package crashtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

const (
	envPostgres = "BULKEXPORT_TEST_POSTGRES_URL"
	envSeed     = "BULKEXPORT_CRASHTEST_SEED"
)

// The servers' settings. With a 2 ms pause after every patient, the system
// export of 1,500 patients takes about 12 s of work and the Group export
// about 6 s (they run at once; split into parts, two at a time per server,
// a few seconds each); a 1 s lease lets a restarted server (or the
// other one) take a job over within about 2 s of a kill; a checkpoint every
// 100 ms means many files per type, so that kills land between writing a
// file, committing it and recording it.
const (
	patients    = 1500
	pace        = "2ms"
	lease       = "1s"
	checkpoint  = "100ms"
	maxAttempts = "20" // kills add attempts; the default 5 would fail the job
	// Every test runs its exports partitioned: each compartment type in
	// four ranges of patients, exported as units by any server.
	partitions = "4"
	// maxFileResources is well below the types' sizes and far more than a
	// checkpoint's worth of resources: files are cut by this limit only,
	// never by the checkpoints or the kills, and every file of a type but
	// the last holds exactly this many.
	maxFileResources = 250
)

// Bounds of the waits. None is a timing assertion: each bounds a wait that
// normally ends in a second or two, so that a broken build fails instead of
// hanging.
const (
	startTimeout    = 30 * time.Second // a server prints its base URL
	claimTimeout    = 30 * time.Second // a server claims an orphaned job (lease + poll interval)
	completeTimeout = 2 * time.Minute  // the exports finish after the last kill
)

// export is a kick-off and what the dataset says it must produce.
type export struct {
	name  string
	path  string // kick-off path and query under the base URL
	query bulkexport.Query
	types []string
	id    string // set by kickoff
}

// exports returns the two exports every test runs at once: every type at
// system level, and a Group export of five types with a _typeFilter.
func exports() []*export {
	compartment := []string{"Patient", "Encounter", "Condition", "Observation", "MedicationRequest"}
	return []*export{
		{
			name:  "system",
			path:  "/$export",
			query: bulkexport.Query{Level: fhirbulk.LevelSystem},
			types: append(slices.Clone(compartment), "Practitioner", "Organization"),
		},
		{
			name: "group",
			path: "/Group/even/$export?_type=" + strings.Join(compartment, ",") +
				"&_typeFilter=" + url.QueryEscape("Observation?category=vital-signs"),
			query: bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "even",
				TypeFilters: []bulkexport.TypeFilter{{Type: "Observation", Query: "category=vital-signs"}}},
			types: compartment,
		},
	}
}

// ---------------------------------------------------------------------------
// The tests.

// TestCrashSQLite: one server on a SQLite file, killed four times.
func TestCrashSQLite(t *testing.T) {
	t.Parallel()
	skipShort(t)
	dir := t.TempDir()
	runSingle(t, []string{"-store", "sqlite:" + filepath.Join(dir, "jobs.db")}, 4)
}

// TestCrashPostgres: one server on PostgreSQL, killed four times.
func TestCrashPostgres(t *testing.T) {
	t.Parallel()
	skipShort(t)
	runSingle(t, []string{"-store", "postgres:" + needPostgres(t), "-pg-schema", freshSchema(t)}, 4)
}

// TestCrashPostgresTwoServers: two servers share the database and the
// storage directory. Three times, the one running the system export is
// killed; the other must take it over once the lease has run out (the
// killed one is restarted only then), and the exports must still come out
// exactly once.
func TestCrashPostgresTwoServers(t *testing.T) {
	t.Parallel()
	skipShort(t)
	h := newHarness(t, []string{"-store", "postgres:" + needPostgres(t), "-pg-schema", freshSchema(t)})
	servers := map[string]*proc{"A": h.start("A"), "B": h.start("B")}
	exps := exports()
	for _, e := range exps {
		h.kickoff(servers["A"], e)
	}
	sys := exps[0].id
	ids := []string{exps[0].id, exps[1].id}

	takeovers := 0
	for round := 0; round < 3; round++ {
		var owner *proc
		h.waitFor(claimTimeout, "a server running the system export", func() bool {
			owner = h.runnerLocked(sys)
			return owner != nil || h.completed[sys]
		})
		if owner == nil {
			t.Logf("round %d: the system export finished before the kill", round+1)
			break
		}
		time.Sleep(h.delay(300*time.Millisecond, 1200*time.Millisecond))
		killedAt, seq := h.kill(owner)
		if h.isCompleted(sys) {
			t.Logf("round %d: the system export finished before the kill landed", round+1)
			break
		}
		other := servers["A"]
		if owner.server == "A" {
			other = servers["B"]
		}
		h.waitFor(claimTimeout, other.name+" taking the system export over", func() bool {
			return other.claimedSeq[sys] > seq || h.completed[sys]
		})
		if h.isCompleted(sys) {
			t.Logf("round %d: the system export finished before the takeover", round+1)
			break
		}
		takeovers++
		t.Logf("round %d: killed %s; %s took the system export over %v later", round+1, owner.name, other.name,
			h.claimedAt(other, sys).Sub(killedAt).Round(time.Millisecond))
		servers[owner.server] = h.start(owner.server)
	}
	h.waitFor(completeTimeout, "both exports to complete", func() bool { return h.allCompletedLocked(ids) })
	require.GreaterOrEqual(t, takeovers, 2, "the system export must have been taken over at least twice")
	live := servers["A"]
	if live.killed {
		// The last round's kill landed after the export finished.
		live = servers["B"]
	}
	for _, e := range exps {
		h.verify(live, e)
	}
	h.report(ids)
}

func skipShort(t *testing.T) {
	if testing.Short() {
		t.Skip("crash tests build and run server processes; skipped with -short")
	}
}

// runSingle runs one server with storeArgs, kicks off the exports, kills
// the server kills times at random points while it runs them (restarting
// it each time on the same store and storage), and checks the result.
func runSingle(t *testing.T, storeArgs []string, kills int) {
	h := newHarness(t, storeArgs)
	p := h.start("server")
	exps := exports()
	for _, e := range exps {
		h.kickoff(p, e)
	}
	ids := []string{exps[0].id, exps[1].id}
	done := 0
	for done < kills {
		h.waitFor(claimTimeout, p.name+" running an export", func() bool {
			return len(p.claimedSeq) > 0 || h.allCompletedLocked(ids)
		})
		if h.isAllCompleted(ids) {
			break
		}
		time.Sleep(h.delay(150*time.Millisecond, 1200*time.Millisecond))
		if h.isAllCompleted(ids) {
			break
		}
		h.kill(p)
		done++
		p = h.start("server")
	}
	h.waitFor(completeTimeout, "both exports to complete", func() bool { return h.allCompletedLocked(ids) })
	require.GreaterOrEqual(t, h.killedRunning[exps[0].id], 2, "the system export must have been killed mid-run at least twice")
	for _, e := range exps {
		h.verify(p, e)
	}
	h.report(ids)
}

// ---------------------------------------------------------------------------
// PostgreSQL.

func needPostgres(t *testing.T) string {
	u := os.Getenv(envPostgres)
	if u == "" {
		t.Skipf("%s is not set; source .ci/postgres.sh to provision a server", envPostgres)
	}
	return u
}

// freshSchema names a new schema (the servers' Migrate creates it) and
// drops it when the test ends.
func freshSchema(t *testing.T) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "crashtest_" + hex.EncodeToString(b[:])
	u := needPostgres(t)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, u)
		if err != nil {
			t.Errorf("drop schema %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{name}.Sanitize()+" CASCADE"); err != nil {
			t.Errorf("drop schema %s: %v", name, err)
		}
	})
	return name
}

// ---------------------------------------------------------------------------
// The server binary.

var (
	buildOnce sync.Once
	buildDir  string
	serverBin string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// serverBinary builds examples/server once per test binary (without
// -race: it is the system under test, not the test).
func serverBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "bulkexport-crashtest-")
		if buildErr != nil {
			return
		}
		goTool, err := exec.LookPath("go")
		if err != nil {
			goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		bin := filepath.Join(buildDir, "server")
		cmd := exec.Command(goTool, "build", "-o", bin, "github.com/bulkfhir/bulkexport/examples/server")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build examples/server: %v\n%s", err, out)
			return
		}
		serverBin = bin
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return serverBin
}

// ---------------------------------------------------------------------------
// The harness: server processes and what their logs say.

// harness runs the server processes of one test, all with the same store
// and storage directory, and follows their logs.
type harness struct {
	t       *testing.T
	bin     string
	args    []string
	storage string
	rng     *mrand.Rand
	client  *http.Client
	ds      *dataset.Dataset
	started time.Time

	mu      sync.Mutex
	changed chan struct{} // closed and replaced at every event
	log     *os.File      // every process's output, prefixed with its name
	procs   []*proc
	gens    map[string]int
	seq     int // numbers the log events

	completed     map[string]bool
	failed        map[string]string // job -> log line
	attempts      map[string][]int  // job -> the attempt of each claim
	killedRunning map[string]int    // job -> kills that interrupted a run of it
	leaseLost     int
	kills         int
	// Units of partitioned jobs: job -> server -> units it finished, and
	// job -> claims of its units that were not their first.
	unitsDone    map[string]map[string]int
	unitReclaims map[string]int
}

// proc is one server process.
type proc struct {
	server string // "A", "B" or "server"
	name   string // server and generation: "A#2"
	cmd    *exec.Cmd
	exited chan struct{}

	// Guarded by harness.mu.
	base       string
	claimedSeq map[string]int // job -> event number of its last "job running"
	claimedAt  map[string]time.Time
	finished   map[string]bool // job -> completed, failed or lost here
	exitErr    error
	killed     bool
	// liveUnits counts the units of a job this process runs.
	liveUnits map[string]int
}

func newHarness(t *testing.T, storeArgs []string) *harness {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(envSeed); s != "" {
		var err error
		seed, err = strconv.ParseUint(s, 10, 64)
		require.NoError(t, err, envSeed)
	}
	t.Logf("seed %d (%s=%d replays the kill delays)", seed, envSeed, seed)
	dir := t.TempDir()
	logf, err := os.Create(filepath.Join(dir, "servers.log"))
	require.NoError(t, err)
	h := &harness{
		t:       t,
		bin:     serverBinary(t),
		storage: filepath.Join(dir, "files"),
		rng:     mrand.New(mrand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		client:  &http.Client{Timeout: 30 * time.Second},
		ds:      dataset.New(patients),
		started: time.Now(),

		changed:       make(chan struct{}),
		log:           logf,
		gens:          map[string]int{},
		completed:     map[string]bool{},
		failed:        map[string]string{},
		attempts:      map[string][]int{},
		killedRunning: map[string]int{},
		unitsDone:     map[string]map[string]int{},
		unitReclaims:  map[string]int{},
	}
	h.args = append([]string{
		"-addr", "127.0.0.1:0",
		"-patients", strconv.Itoa(patients),
		"-storage", "dir:" + h.storage,
		"-lease", lease,
		"-checkpoint", checkpoint,
		"-max-file-resources", strconv.Itoa(maxFileResources),
		"-max-attempts", maxAttempts,
		"-pace", pace,
		"-partitions", partitions,
		"-log-level", "info",
	}, storeArgs...)
	t.Cleanup(func() {
		h.mu.Lock()
		procs := slices.Clone(h.procs)
		h.mu.Unlock()
		for _, p := range procs {
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.exited
		}
		h.client.CloseIdleConnections()
		if t.Failed() {
			h.dumpLog(120)
		}
		logf.Close()
	})
	return h
}

// dumpLog logs the last n lines of the servers' output.
func (h *harness) dumpLog(n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	b, err := os.ReadFile(h.log.Name())
	if err != nil {
		h.t.Logf("servers.log: %v", err)
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	h.t.Logf("last %d lines of the servers' output:\n%s", len(lines), strings.Join(lines, "\n"))
}

// delay is a random duration in [lo, hi).
func (h *harness) delay(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(h.rng.Int64N(int64(hi-lo)))
}

// start starts a new generation of server and waits until it serves.
func (h *harness) start(server string) *proc {
	h.t.Helper()
	h.mu.Lock()
	h.gens[server]++
	p := &proc{
		server:     server,
		name:       fmt.Sprintf("%s#%d", server, h.gens[server]),
		exited:     make(chan struct{}),
		claimedSeq: map[string]int{},
		claimedAt:  map[string]time.Time{},
		finished:   map[string]bool{},
		liveUnits:  map[string]int{},
	}
	h.mu.Unlock()
	cmd := exec.Command(h.bin, h.args...)
	cmd.Stdout = &lineWriter{h: h, p: p, stdout: true}
	cmd.Stderr = &lineWriter{h: h, p: p}
	cmd.SysProcAttr = procAttr()
	p.cmd = cmd
	require.NoError(h.t, cmd.Start())
	h.mu.Lock()
	h.procs = append(h.procs, p)
	h.mu.Unlock()
	go func() {
		err := cmd.Wait()
		h.mu.Lock()
		p.exitErr = err
		close(p.exited)
		h.notifyLocked()
		h.mu.Unlock()
	}()
	h.waitFor(startTimeout, p.name+" to serve", func() bool {
		select {
		case <-p.exited:
			return true
		default:
		}
		return p.base != ""
	})
	select {
	case <-p.exited:
		h.t.Fatalf("%s exited at start: %v", p.name, p.exitErr)
	default:
	}
	return p
}

// kill sends SIGKILL to p and waits for it to die. It returns when, and
// the number of the last log event before the kill.
func (h *harness) kill(p *proc) (time.Time, int) {
	h.t.Helper()
	h.mu.Lock()
	p.killed = true
	at, seq := time.Now(), h.seq
	var interrupted []string
	for job := range p.claimedSeq {
		if !p.finished[job] || p.liveUnits[job] > 0 {
			h.killedRunning[job]++
			interrupted = append(interrupted, job)
		}
	}
	for job, n := range p.liveUnits {
		if _, ok := p.claimedSeq[job]; !ok && n > 0 {
			h.killedRunning[job]++
			interrupted = append(interrupted, job)
		}
	}
	h.kills++
	fmt.Fprintf(h.log, "[test] %s kill -9 %s (running %v)\n", time.Since(h.started).Round(time.Millisecond), p.name, interrupted)
	h.mu.Unlock()
	require.NoError(h.t, p.cmd.Process.Signal(syscall.SIGKILL))
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		h.t.Fatalf("%s did not die within 10 s of SIGKILL", p.name)
	}
	h.t.Logf("%s: killed %s mid-export (interrupting %d jobs)", time.Since(h.started).Round(time.Millisecond), p.name, len(interrupted))
	return at, seq
}

func (h *harness) notifyLocked() {
	close(h.changed)
	h.changed = make(chan struct{})
}

// waitFor waits, at most timeout, until cond (called with h.mu held) is
// true. A failed job or a server that exited by itself ends the wait with
// a test failure.
func (h *harness) waitFor(timeout time.Duration, what string, cond func() bool) {
	h.t.Helper()
	h.wait(timeout, what, true, cond)
}

// wait is waitFor, where a failed job ends the wait with a test failure
// only if failedJobsFail.
func (h *harness) wait(timeout time.Duration, what string, failedJobsFail bool, cond func() bool) {
	h.t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		h.mu.Lock()
		ok := cond()
		ch := h.changed
		var problem string
		if failedJobsFail {
			for job, line := range h.failed {
				problem = "job " + job + " failed: " + line
			}
		}
		for _, p := range h.procs {
			select {
			case <-p.exited:
				if !p.killed {
					problem = fmt.Sprintf("%s exited by itself: %v", p.name, p.exitErr)
				}
			default:
			}
		}
		h.mu.Unlock()
		if problem != "" {
			h.t.Fatal(problem)
		}
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			h.t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
	}
}

// runnerLocked returns the live server whose worker last claimed job and
// has not finished it, or nil.
func (h *harness) runnerLocked(job string) *proc {
	var best *proc
	for _, p := range h.procs {
		if p.killed || p.finished[job] {
			continue
		}
		if s, ok := p.claimedSeq[job]; ok && (best == nil || s > best.claimedSeq[job]) {
			best = p
		}
	}
	return best
}

func (h *harness) claimedAt(p *proc, job string) time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return p.claimedAt[job]
}

func (h *harness) allCompletedLocked(ids []string) bool {
	for _, id := range ids {
		if !h.completed[id] {
			return false
		}
	}
	return true
}

func (h *harness) isAllCompleted(ids []string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.allCompletedLocked(ids)
}

func (h *harness) isCompleted(id string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.completed[id]
}

// report logs what happened to each job.
func (h *harness) report(ids []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, id := range ids {
		h.t.Logf("job %s: claimed with attempts %v, interrupted by %d kills", id, h.attempts[id], h.killedRunning[id])
	}
	h.t.Logf("%d kills, %d lease losses, %d server starts, %v in all", h.kills, h.leaseLost, len(h.procs),
		time.Since(h.started).Round(time.Millisecond))
}

var (
	reJob     = regexp.MustCompile(`\bjob=([0-9a-f]+)`)
	reAttempt = regexp.MustCompile(`\battempt=(\d+)`)
)

// line handles one line of a server's output.
func (h *harness) line(p *proc, stdout bool, line string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	fmt.Fprintf(h.log, "[%s] %s\n", p.name, line)
	if stdout {
		if base, ok := strings.CutPrefix(line, "bulkexport example server: base URL "); ok {
			p.base = base
			h.notifyLocked()
		}
		return
	}
	m := reJob.FindStringSubmatch(line)
	if m == nil {
		return
	}
	job := m[1]
	h.seq++
	switch {
	case strings.Contains(line, " unit="):
		h.unitLineLocked(p, job, line)
	case strings.Contains(line, `msg="bulkexport: job running"`):
		p.claimedSeq[job] = h.seq
		p.claimedAt[job] = time.Now()
		delete(p.finished, job)
		if a := reAttempt.FindStringSubmatch(line); a != nil {
			n, _ := strconv.Atoi(a[1])
			h.attempts[job] = append(h.attempts[job], n)
		}
	case strings.Contains(line, `msg="bulkexport: job completed"`):
		p.finished[job] = true
		h.completed[job] = true
	case strings.Contains(line, `msg="bulkexport: job failed"`):
		p.finished[job] = true
		h.failed[job] = line
	case strings.Contains(line, "lease lost"):
		p.finished[job] = true
		h.leaseLost++
	}
	h.notifyLocked()
}

// unitLineLocked handles a line about a unit of a partitioned job.
func (h *harness) unitLineLocked(p *proc, job, line string) {
	switch {
	case strings.Contains(line, `msg="bulkexport: unit running"`):
		p.liveUnits[job]++
		if a := reAttempt.FindStringSubmatch(line); a != nil && a[1] != "1" {
			h.unitReclaims[job]++
		}
	case strings.Contains(line, `msg="bulkexport: unit done"`):
		p.liveUnits[job]--
		if h.unitsDone[job] == nil {
			h.unitsDone[job] = map[string]int{}
		}
		h.unitsDone[job][p.server]++
	case strings.Contains(line, `msg="bulkexport: unit failed"`):
		// The job's coordinator fails the job (its own line).
		p.liveUnits[job]--
	case strings.Contains(line, "lease lost"), strings.Contains(line, "unreachable"), strings.Contains(line, "handed back"):
		p.liveUnits[job]--
	}
	h.notifyLocked()
}

// lineWriter splits a process's output into lines for harness.line. Each
// is written to by one goroutine (os/exec's copier).
type lineWriter struct {
	h      *harness
	p      *proc
	stdout bool
	buf    []byte
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.buf = append(w.buf, b...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.h.line(w.p, w.stdout, string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
	return len(b), nil
}

// ---------------------------------------------------------------------------
// HTTP.

// get GETs url with the headers of a bulk data client.
func (h *harness) get(u string) (*http.Response, []byte) {
	h.t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	require.NoError(h.t, err)
	req.Header.Set("Accept", "application/fhir+json")
	req.Header.Set("Prefer", "respond-async")
	resp, err := h.client.Do(req)
	require.NoError(h.t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(h.t, err)
	return resp, body
}

// kickoff starts export e on p and records its job id.
func (h *harness) kickoff(p *proc, e *export) {
	h.t.Helper()
	resp, body := h.get(p.base + e.path)
	require.Equal(h.t, http.StatusAccepted, resp.StatusCode, "%s: %s", e.name, body)
	loc := resp.Header.Get("Content-Location")
	_, id, ok := strings.Cut(loc, "_jobId=")
	require.True(h.t, ok, loc)
	e.id = id
	h.t.Logf("%s export: job %s", e.name, id)
}

// ---------------------------------------------------------------------------
// Checking the result.

// verify checks a completed export through server p and in the storage
// directory: every expected resource exactly once and in export order,
// manifest counts equal to the files' line counts, and nothing in the
// job's directory that the manifest does not list (no orphaned files, no
// temporary files).
func (h *harness) verify(p *proc, e *export) {
	t := h.t
	t.Helper()
	resp, body := h.get(p.base + "/$export-poll-status?_jobId=" + e.id)
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s: %s", e.name, body)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.Empty(t, m.Error, "%s: error files", e.name)
	require.Empty(t, m.Deleted, "%s: deleted files", e.name)
	tx, err := fhirbulk.ParseInstant(m.TransactionTime)
	require.NoError(t, err)

	got := map[string][]string{}   // type -> ids in file order
	counts := map[string][]int64{} // file stem -> line counts in file order
	listed := map[string]bool{}
	prefix := p.base + "/bulkfiles/" + e.id + "/"
	var lines int64
	for _, f := range m.Output {
		require.True(t, strings.HasPrefix(f.URL, prefix), f.URL)
		name := path.Base(f.URL)
		require.False(t, listed[name], "%s listed twice", name)
		listed[name] = true
		require.NotNil(t, f.Count, f.URL)
		ids := h.download(f.URL, f.Type)
		require.EqualValues(t, *f.Count, len(ids), "%s: manifest count and line count differ", f.URL)
		got[f.Type] = append(got[f.Type], ids...)
		counts[fileStem(name)] = append(counts[fileStem(name)], int64(len(ids)))
		lines += int64(len(ids))
	}
	// The manifest lists the files of a stream (a type, or a unit of a
	// partitioned type) in name order, which is their order in the
	// stream: all but the last are full.
	for stem, cs := range counts {
		for i, c := range cs[:len(cs)-1] {
			require.EqualValues(t, maxFileResources, c, "%s %s: file %d of %d %v is not cut by the size limit", e.name, stem, i+1, len(cs), cs)
		}
		require.LessOrEqual(t, cs[len(cs)-1], int64(maxFileResources), "%s %s: last file", e.name, stem)
	}

	q := e.query
	q.TransactionTime = tx
	for typ := range got {
		require.Contains(t, e.types, typ, "%s: unexpected type", e.name)
	}
	var total int
	for _, typ := range e.types {
		want, err := h.ds.Expected(&q, typ)
		require.NoError(t, err)
		require.NotEmpty(t, want, "%s %s: the dataset should have some", e.name, typ)
		exactlyOnce(t, e.name+" "+typ, got[typ], want)
		total += len(want)
	}
	require.EqualValues(t, total, lines)

	// The job's directory holds exactly the listed files.
	entries, err := os.ReadDir(filepath.Join(h.storage, e.id))
	require.NoError(t, err)
	var extra []string
	for _, ent := range entries {
		if !listed[ent.Name()] {
			extra = append(extra, ent.Name())
		}
	}
	require.Empty(t, extra, "%s: files in the storage that the manifest does not list (orphans or temporary files)", e.name)
	require.Len(t, entries, len(listed), "%s: listed files missing from the storage", e.name)
	// And the storage root only the jobs' directories.
	roots, err := os.ReadDir(h.storage)
	require.NoError(t, err)
	for _, ent := range roots {
		require.False(t, strings.HasPrefix(ent.Name(), "~"), "left in the storage root: %s", ent.Name())
	}
	t.Logf("%s export: %d resources of %d types in %d files, each exactly once", e.name, total, len(e.types), len(m.Output))
}

// fileStem is the stream a file name (see bulkexport.FileName) belongs
// to: the name without its number, fence and extension.
func fileStem(name string) string {
	s := strings.TrimSuffix(name, ".ndjson")
	if i := strings.LastIndexByte(s, '.'); i >= 0 { // the fence
		s = s[:i]
	}
	if i := strings.LastIndexByte(s, '.'); i >= 0 { // the number
		s = s[:i]
	}
	return s
}

// download returns the ids of the resources in one NDJSON file, checking
// that each line is a resource of type typ.
func (h *harness) download(u, typ string) []string {
	t := h.t
	t.Helper()
	resp, err := h.client.Get(u)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, u)
	var ids []string
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r struct {
			ResourceType string `json:"resourceType"`
			ID           string `json:"id"`
		}
		require.NoError(t, json.Unmarshal(sc.Bytes(), &r), u)
		require.Equal(t, typ, r.ResourceType, u)
		ids = append(ids, r.ID)
	}
	require.NoError(t, sc.Err(), u)
	return ids
}

// exactlyOnce checks that got holds every id of want once, nothing else,
// in want's order.
func exactlyOnce(t *testing.T, what string, got, want []string) {
	t.Helper()
	seen := make(map[string]int, len(got))
	for _, id := range got {
		seen[id]++
	}
	wanted := make(map[string]bool, len(want))
	var missing, dups, unexpected []string
	for _, id := range want {
		wanted[id] = true
		if seen[id] == 0 {
			missing = append(missing, id)
		}
	}
	for id, n := range seen {
		if n > 1 {
			dups = append(dups, fmt.Sprintf("%s×%d", id, n))
		}
		if !wanted[id] {
			unexpected = append(unexpected, id)
		}
	}
	first := func(s []string) []string {
		slices.Sort(s)
		return s[:min(len(s), 10)]
	}
	require.Empty(t, dups, "%s: %d resources more than once, e.g. %v", what, len(dups), first(dups))
	require.Empty(t, missing, "%s: %d resources missing, e.g. %v", what, len(missing), first(missing))
	require.Empty(t, unexpected, "%s: %d resources not expected, e.g. %v", what, len(unexpected), first(unexpected))
	require.True(t, slices.Equal(got, want), "%s: every resource once, but not in export order", what)
}

// TestCrashPostgresPartitioned: three servers share the database and the
// storage directory, and each export's types are split into parts that
// all three export at once (two at a time each). Twice, a server that is
// exporting parts of the system export is killed and restarted; the other
// servers take its parts over when their leases run out. The exports must
// come out exactly once, with parts finished by more than one server.
func TestCrashPostgresPartitioned(t *testing.T) {
	t.Parallel()
	skipShort(t)
	h := newHarness(t, []string{"-store", "postgres:" + needPostgres(t), "-pg-schema", freshSchema(t), "-unit-concurrency", "2"})
	servers := map[string]*proc{"A": h.start("A"), "B": h.start("B"), "C": h.start("C")}
	exps := exports()
	for _, e := range exps {
		h.kickoff(servers["A"], e)
	}
	sys := exps[0].id
	ids := []string{exps[0].id, exps[1].id}
	kills := 0
	for round := 0; round < 2; round++ {
		var victim *proc
		h.waitFor(claimTimeout, "a server exporting parts of the system export", func() bool {
			for _, name := range []string{"B", "C", "A"}[round%2:] {
				if p := servers[name]; p.liveUnits[sys] > 0 {
					victim = p
					return true
				}
			}
			return h.completed[sys]
		})
		if victim == nil {
			t.Logf("round %d: the system export finished before the kill", round+1)
			break
		}
		time.Sleep(h.delay(100*time.Millisecond, 600*time.Millisecond))
		if h.isCompleted(sys) {
			break
		}
		h.kill(victim)
		kills++
		servers[victim.server] = h.start(victim.server)
	}
	h.waitFor(completeTimeout, "both exports to complete", func() bool { return h.allCompletedLocked(ids) })
	require.GreaterOrEqual(t, kills, 1, "a server must have been killed mid-export")
	for _, e := range exps {
		h.verify(servers["A"], e)
	}
	h.mu.Lock()
	by := h.unitsDone[sys]
	h.mu.Unlock()
	t.Logf("parts of the system export finished per server: %v", by)
	require.GreaterOrEqual(t, len(by), 2, "parts of one export were finished by several servers")
	h.report(ids)
}
