// Command bulkexport runs FHIR Bulk Data exports from the command line: it
// kicks off an export, waits for it (honouring Retry-After, 429 and
// transient errors), writes the manifest, and downloads every file in
// parallel, resuming after dropped connections and across runs. It also
// polls and cancels exports by their status URL.
//
// Run "bulkexport help" for the usage; docs/cli.md has the details.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/bulkfhir/bulkexport/client"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Exit codes.
const (
	exitOK          = 0 // success
	exitFailed      = 1 // the server refused or failed the export, or a file did not verify
	exitUsage       = 2 // bad command line
	exitNetwork     = 3 // network failure, or the server stayed unavailable through the retries
	exitInterrupted = 4 // interrupted (Ctrl-C, SIGTERM)
	exitLocal       = 5 // local file system error (writing --out)
	exitRunning     = 6 // status: the export is still in progress
	exitCancelled   = 7 // status: the export was cancelled
	exitGone        = 8 // status: the export has expired, or the server does not know it
)

const usage = `Usage:
  bulkexport export BASE_URL [flags]        kick off an export, wait, download it
  bulkexport export --resume STATUS_URL [flags]
                                            pick up an export left off
  bulkexport status [--wait] STATUS_URL     poll an export once (or wait for it)
  bulkexport cancel STATUS_URL              cancel an export (DELETE; idempotent)
  bulkexport help                           this text

Flags may come before or after the URL, written -flag or --flag.
"bulkexport COMMAND -h" lists the flags of a command.

export writes NAME.ndjson files and manifest.json to --out (default
./bulkexport-out). Partial files are kept as NAME.ndjson.part; --resume
skips the complete files (checked against the manifest's count, or the
size on the server) and continues the partial ones with Range requests.
Ctrl-C while the server is still exporting cancels the export there
(DELETE) unless --keep is given; Ctrl-C during the download keeps the
export and the partial files, for --resume.

status prints one line on stderr saying the export's state (in progress,
completed, failed, cancelled, expired or unknown) and, only when it is
complete, the manifest as JSON on stdout; its exit code tells the state.
--wait shows the progress on stderr until the export ends. cancel prints
"cancelled", or "already cancelled" for an export cancelled before.

The bearer token comes from --token or the BULKEXPORT_TOKEN environment
variable. It is sent to file URLs only when the manifest says
requiresAccessToken, and never across a redirect to another host.

Exit codes:
  0  success; status: the export is complete (the manifest is printed);
     cancel: the export is cancelled, or already was
  1  the export failed: the server refused the kick-off, the job failed,
     a download was refused, or a file did not match the manifest's
     count; export also exits 1 when the job was cancelled or expired;
     cancel exits 1 when the job has already completed or failed, has
     expired or is unknown
  2  usage error
  3  network failure, or the server stayed unavailable (429, 503 and other
     transient errors) through every retry
  4  interrupted (Ctrl-C or SIGTERM)
  5  local error: --out could not be written
  6  status: the export is still in progress (without --wait)
  7  status: the export was cancelled
  8  status: the export has expired (its files were removed), or the
     server does not know it
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run runs the command line args and returns the exit code. SIGINT and
// SIGTERM interrupt it.
func run(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runContext(ctx, args, stdout, stderr)
}

// runContext is run with the interrupt as a context.
func runContext(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "export":
		return cmdExport(ctx, args[1:], stdout, stderr)
	case "status":
		return cmdStatus(ctx, args[1:], stdout, stderr)
	case "cancel":
		return cmdCancel(ctx, args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	fmt.Fprintf(stderr, "bulkexport: unknown command %q\n\n%s", args[0], usage)
	return exitUsage
}

// common holds the flags every command has.
type common struct {
	token     string
	minPoll   time.Duration
	maxPoll   time.Duration
	retries   int
	retryWait time.Duration
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.token, "token", "", "bearer `token` (default: $BULKEXPORT_TOKEN)")
	fs.DurationVar(&c.minPoll, "min-poll", client.DefaultMinPollInterval, "shortest wait between status polls")
	fs.DurationVar(&c.maxPoll, "max-poll", client.DefaultMaxPollInterval, "longest wait between status polls (caps Retry-After)")
	fs.IntVar(&c.retries, "retries", client.DefaultMaxRetries, "retries of a request after a transient failure (0: none)")
	fs.DurationVar(&c.retryWait, "retry-wait", client.DefaultRetryMinBackoff, "first wait before a retry; it doubles, up to a minute")
}

func (c *common) client(base string, parallel int) (*client.Client, error) {
	token := c.token
	if token == "" {
		token = os.Getenv("BULKEXPORT_TOKEN")
	}
	retries := c.retries
	if retries == 0 {
		retries = -1
	}
	return client.New(base, &client.Options{
		Token:           token,
		UserAgent:       "bulkexport-cli",
		MinPollInterval: c.minPoll,
		MaxPollInterval: c.maxPoll,
		MaxRetries:      retries,
		RetryMinBackoff: c.retryWait,
		RetryMaxBackoff: max(c.retryWait, time.Minute),
		Parallel:        parallel,
	})
}

func (c *common) check() error {
	switch {
	case c.minPoll <= 0 || c.maxPoll <= 0 || c.retryWait <= 0:
		return errors.New("-min-poll, -max-poll and -retry-wait must be positive")
	case c.retries < 0:
		return errors.New("-retries must not be negative")
	}
	return nil
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// newFlagSet returns a FlagSet whose usage names the command.
func newFlagSet(name, synopsis, exitCodes string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: %s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
		fmt.Fprintf(stderr, "\nExit codes: %s.\n", exitCodes)
	}
	return fs
}

// parseArgs parses flags placed anywhere among the positional arguments
// (the flag package alone stops at the first positional one). Everything
// after "--" is positional.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var rest []string
	for i, a := range args {
		if a == "--" {
			args, rest = args[:i], args[i+1:]
			break
		}
	}
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return append(pos, rest...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// usageError reports a bad command line.
func usageError(fs *flag.FlagSet, stderr io.Writer, format string, args ...any) int {
	fmt.Fprintf(stderr, "bulkexport %s: %s\n", fs.Name(), fmt.Sprintf(format, args...))
	fs.Usage()
	return exitUsage
}

// parseFlags parses and reports flag errors; ok is false with the exit
// code when the command must stop.
func parseFlags(fs *flag.FlagSet, args []string) (pos []string, code int, ok bool) {
	pos, err := parseArgs(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		return nil, exitOK, false
	}
	if err != nil {
		return nil, exitUsage, false // the flag package has printed the error and usage
	}
	return pos, 0, true
}

// exitCode maps an error to the documented exit codes.
func exitCode(ctx context.Context, err error) int {
	var ce *client.Error
	var pe *fs.PathError
	var le *os.LinkError
	switch {
	case err == nil:
		return exitOK
	case ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)):
		return exitInterrupted
	case errors.As(err, &ce):
		if ce.Network() || ce.Transient() {
			return exitNetwork
		}
		return exitFailed
	case errors.As(err, &pe), errors.As(err, &le):
		return exitLocal
	}
	return exitFailed
}

func cmdExport(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("export", "bulkexport export BASE_URL [flags]\n       bulkexport export --resume STATUS_URL [flags]",
		"0 ok, 1 export failed, 2 usage, 3 network/server unavailable, 4 interrupted, 5 local I/O error", stderr)
	var cf common
	cf.register(fs)
	var types, filters, elements, patients, associated listFlag
	level := fs.String("level", "", "export `level`: system, patient or group (default: system, or group with -group)")
	group := fs.String("group", "", "Group `id` for a group-level export")
	fs.Var(&types, "type", "resource `types` to export (_type), comma-separated or repeated")
	since := fs.String("since", "", "only resources changed after this FHIR `instant` (_since), such as 2025-01-01T00:00:00Z")
	until := fs.String("until", "", "only resources changed before this FHIR `instant` (_until)")
	fs.Var(&filters, "type-filter", "a `Type?query` search (_typeFilter); repeat for more")
	fs.Var(&elements, "elements", "elements to keep (_elements): `list` of Type.element or element, comma-separated or repeated")
	fs.Var(&patients, "patient", "export only these patient `ids` (patient; implies -post), comma-separated or repeated")
	fs.Var(&associated, "include-associated-data", "includeAssociatedData `codes`, comma-separated or repeated")
	outputFormat := fs.String("output-format", "", "_outputFormat (default: the server's, application/fhir+ndjson)")
	post := fs.Bool("post", false, "kick off with POST and a Parameters body instead of GET")
	lenient := fs.Bool("lenient", false, "send Prefer: handling=lenient (the server may ignore unsupported parameters)")
	out := fs.String("out", "bulkexport-out", "`directory` for the files and manifest.json")
	parallel := fs.Int("parallel", client.DefaultParallel, "files downloaded at once")
	keep := fs.Bool("keep", false, "on Ctrl-C, leave the export running on the server instead of cancelling it")
	resume := fs.String("resume", "", "pick up the export at this `status URL` instead of starting one")
	pos, code, ok := parseFlags(fs, args)
	if !ok {
		return code
	}
	if err := cf.check(); err != nil {
		return usageError(fs, stderr, "%v", err)
	}
	if *parallel < 1 {
		return usageError(fs, stderr, "-parallel must be at least 1")
	}
	if *out == "" {
		return usageError(fs, stderr, "-out must name a directory")
	}
	var base string
	switch {
	case *resume == "" && len(pos) != 1:
		return usageError(fs, stderr, "expected one BASE_URL, got %d arguments", len(pos))
	case *resume != "" && len(pos) > 1:
		return usageError(fs, stderr, "expected at most one BASE_URL with -resume, got %d arguments", len(pos))
	case len(pos) == 1:
		base = pos[0]
	}

	req := &client.KickoffRequest{
		Types: types, TypeFilters: filters, Elements: elements, IncludeAssociatedData: associated,
		OutputFormat: *outputFormat, Lenient: *lenient,
	}
	if *resume != "" {
		kickoffOnly := map[string]bool{"level": true, "group": true, "type": true, "since": true, "until": true,
			"type-filter": true, "elements": true, "patient": true, "include-associated-data": true,
			"output-format": true, "post": true, "lenient": true}
		var bad []string
		fs.Visit(func(f *flag.Flag) {
			if kickoffOnly[f.Name] {
				bad = append(bad, "-"+f.Name)
			}
		})
		if len(bad) > 0 {
			return usageError(fs, stderr, "kick-off flags (%s) do not apply to -resume, which continues an existing export", strings.Join(bad, ", "))
		}
	} else {
		switch *level {
		case "":
			req.Level = fhirbulk.LevelSystem
			if *group != "" {
				req.Level = fhirbulk.LevelGroup
			}
		case "system", "patient", "group":
			req.Level = fhirbulk.Level(*level)
		default:
			return usageError(fs, stderr, "-level %q is not one of system, patient, group", *level)
		}
		switch {
		case req.Level == fhirbulk.LevelGroup && *group == "":
			return usageError(fs, stderr, "-level group needs -group ID")
		case req.Level != fhirbulk.LevelGroup && *group != "":
			return usageError(fs, stderr, "-group needs -level group")
		case len(patients) > 0 && req.Level == fhirbulk.LevelSystem:
			return usageError(fs, stderr, "-patient needs -level patient or group")
		}
		req.GroupID = *group
		for _, p := range patients {
			for _, id := range strings.Split(p, ",") {
				if id = strings.TrimSpace(id); id != "" {
					req.Patients = append(req.Patients, id)
				}
			}
		}
		if *post || len(req.Patients) > 0 {
			req.Method = "POST"
		}
		for _, t := range []struct {
			name, value string
			dst         *time.Time
		}{{"since", *since, &req.Since}, {"until", *until, &req.Until}} {
			if t.value == "" {
				continue
			}
			v, err := fhirbulk.ParseInstant(t.value)
			if err != nil {
				return usageError(fs, stderr, "-%s: %v", t.name, err)
			}
			*t.dst = v
		}
		if !req.Since.IsZero() && !req.Until.IsZero() && !req.Since.Before(req.Until) {
			return usageError(fs, stderr, "-until must be later than -since")
		}
	}

	c, err := cf.client(base, *parallel)
	if err != nil {
		return usageError(fs, stderr, "%v", err)
	}
	if _, err := c.KickoffURL(req); *resume == "" && err != nil {
		return usageError(fs, stderr, "%v", err)
	}
	ui := newUI(stdout)
	fail := func(err error) int {
		ui.end()
		fmt.Fprintf(stderr, "bulkexport: %v\n", err)
		return exitCode(ctx, err)
	}

	statusURL := *resume
	if statusURL == "" {
		u, _ := c.KickoffURL(req)
		method := req.Method
		if method == "" {
			method = "GET"
		}
		ui.printf("kick-off: %s %s\n", method, u)
		job, err := kickoff(ctx, c, req)
		if err != nil {
			if ctx.Err() != nil {
				fmt.Fprintln(stderr, "bulkexport: interrupted during the kick-off")
				return exitInterrupted
			}
			return fail(err)
		}
		statusURL = job.StatusURL
		ui.printf("kick-off: accepted, status URL %s\n", statusURL)
		if job.Outcome != nil {
			for _, is := range job.Outcome.Issue {
				if is.Severity == fhirbulk.SeverityWarning || is.Severity == fhirbulk.SeverityError {
					fmt.Fprintf(stderr, "bulkexport: warning: %s: %s\n", is.Code, is.Diagnostics)
				}
			}
		}
	} else {
		ui.printf("resume: status URL %s\n", statusURL)
	}

	st, err := c.Wait(ctx, statusURL, ui.waiting)
	if err != nil {
		ui.end()
		if ctx.Err() == nil {
			return fail(err)
		}
		if *keep {
			fmt.Fprintf(stderr, "bulkexport: interrupted; the export keeps running on the server. Pick it up with:\n  bulkexport export --resume '%s' --out '%s'\n", statusURL, *out)
			return exitInterrupted
		}
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := c.Cancel(cctx, statusURL); err != nil {
			fmt.Fprintf(stderr, "bulkexport: interrupted; cancelling the export on the server failed: %v\n", err)
		} else {
			fmt.Fprintln(stderr, "bulkexport: interrupted; the export was cancelled on the server")
		}
		return exitInterrupted
	}
	ui.end()
	m := st.Manifest
	n := len(m.Output) + len(m.Deleted) + len(m.Error)
	ui.printf("export complete: %d files; transaction time %s\n", n, m.TransactionTime)

	if err := writeManifest(*out, m); err != nil {
		return fail(err)
	}
	ui.printf("manifest: %s\n", filepath.Join(*out, "manifest.json"))

	ui.startDownload(n)
	files, err := c.Download(ctx, m, *out, ui.downloaded)
	ui.end()
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintf(stderr, "bulkexport: interrupted; the export is complete on the server. Resume the download with:\n  bulkexport export --resume '%s' --out '%s'\n", statusURL, *out)
			return exitInterrupted
		}
		code := fail(err)
		fmt.Fprintf(stderr, "bulkexport: the files downloaded so far are in %s; retry with:\n  bulkexport export --resume '%s' --out '%s'\n", *out, statusURL, *out)
		return code
	}
	printTable(stdout, files)
	return exitOK
}

// kickoffGrace is how long a kick-off in flight may still take after an
// interrupt.
const kickoffGrace = 5 * time.Second

// kickoff runs the kick-off so that an interrupt lets a request in flight
// finish (for kickoffGrace): the server may be creating the export, which
// must then be cancelled rather than left running unknown. The caller sees
// the interrupt in ctx afterwards.
func kickoff(ctx context.Context, c *client.Client, req *client.KickoffRequest) (*client.Job, error) {
	kctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		t := time.NewTimer(kickoffGrace)
		defer t.Stop()
		select {
		case <-t.C:
			cancel()
		case <-kctx.Done():
		}
	})
	defer stop()
	return c.Kickoff(kctx, req)
}

// writeManifest writes dir/manifest.json atomically.
func writeManifest(dir string, m *fhirbulk.Manifest) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, ".manifest.json.tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, "manifest.json"))
}

func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("status", "bulkexport status [--wait] STATUS_URL",
		"0 completed (the manifest is on stdout), 1 failed, 2 usage, 3 network/server unavailable, 4 interrupted, "+
			"6 still in progress, 7 cancelled, 8 expired or unknown", stderr)
	var cf common
	cf.register(fs)
	wait := fs.Bool("wait", false, "wait until the export completes, showing its progress on stderr")
	pos, code, ok := parseFlags(fs, args)
	if !ok {
		return code
	}
	if err := cf.check(); err != nil {
		return usageError(fs, stderr, "%v", err)
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "expected one STATUS_URL, got %d arguments", len(pos))
	}
	c, err := cf.client("", 1)
	if err != nil {
		return usageError(fs, stderr, "%v", err)
	}
	if !*wait {
		st, err := c.Status(ctx, pos[0])
		return reportStatus(ctx, stdout, stderr, st, err)
	}
	ui := newUI(stderr)
	st, err := c.Wait(ctx, pos[0], ui.waiting)
	ui.end()
	return reportStatus(ctx, stdout, stderr, st, err)
}

func cmdCancel(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("cancel", "bulkexport cancel STATUS_URL",
		"0 cancelled (or already cancelled), 1 refused (the job has already completed or failed, has expired or is unknown), "+
			"2 usage, 3 network/server unavailable, 4 interrupted", stderr)
	var cf common
	cf.register(fs)
	pos, code, ok := parseFlags(fs, args)
	if !ok {
		return code
	}
	if err := cf.check(); err != nil {
		return usageError(fs, stderr, "%v", err)
	}
	if len(pos) != 1 {
		return usageError(fs, stderr, "expected one STATUS_URL, got %d arguments", len(pos))
	}
	c, err := cf.client("", 1)
	if err != nil {
		return usageError(fs, stderr, "%v", err)
	}
	return reportCancel(ctx, stdout, stderr, c.Cancel(ctx, pos[0]))
}
