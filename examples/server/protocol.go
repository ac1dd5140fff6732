package main

import (
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport"
)

// protocol holds the flags that change what a client sees: the handler's
// and the worker's options, named after them. Their defaults are the
// library's (the eHealth behaviour).
type protocol struct {
	// profile is -profile: "ehealth" or "ig".
	profile                  string
	deletePolicy             bulkexport.DeletePolicy
	manifest                 bulkexport.ManifestVersion
	statusURL                bulkexport.StatusURLStyle
	signingKey               []byte // nil: file URLs are not signed
	signedURLExpiry          time.Duration
	pollLimit                *bulkexport.PollLimit // nil: polls are not limited
	maxActiveJobs            int                   // negative: no cap
	maxFinishedJobs          int                   // negative: no cap
	reuseInFlight            bool
	allowMissingRespondAsync bool
	noSeparateExportStatus   bool
	retryAfter               time.Duration // 0: adaptive (bulkexport.DefaultRetryAfter)
	cancelledRetention       time.Duration
	finishedJobCache         time.Duration
	manifestPageSize         int
	maxBodyBytes             int64
	maxParamLength           int
	maxParamValues           int
	// Worker options.
	retention        time.Duration
	maxFileResources int64
	maxFileBytes     int64
	maxFilesPerJob   int
}

// signingKeyID names the -signing-key key in the URLs it signs.
const signingKeyID = "k1"

// protocolFlags defines the protocol flags on fs. parse, called after
// fs.Parse, validates them.
type protocolFlags struct {
	profile, deletePolicy, manifest, statusURL, signingKey, pollLimit, retryAfter *string

	signedURLExpiry, cancelledRetention, retention, finishedJobCache *time.Duration

	maxActiveJobs, maxFinishedJobs, manifestPageSize, maxParamLength, maxParamValues, maxFilesPerJob *int

	maxBodyBytes, maxFileResources, maxFileBytes *int64

	reuseInFlight, allowMissingRespondAsync, noSeparateExportStatus *bool
}

func defineProtocolFlags(fs *flag.FlagSet) *protocolFlags {
	return &protocolFlags{
		profile:                  fs.String("profile", "ehealth", "`ehealth|ig`: ehealth keeps the library's defaults (the eHealth behaviour); ig makes the HL7 Bulk Data IG's choices: -delete-policy ig. Flags given explicitly override the profile"),
		deletePolicy:             fs.String("delete-policy", "ehealth", "DELETE on the status URL of a finished export: `ehealth|ig`; ehealth answers 404 and keeps the files until they expire, ig answers 202 and removes the job and its files. Queued and running exports are cancelled under either"),
		manifest:                 fs.String("manifest", "stu3", "manifest shape: `stu3|stu4`; stu3 is the STU2/STU3 shape most clients read, stu4 the STU4 ballot's (outcome[], manifestType, fileSize; kick-off by POST only)"),
		statusURL:                fs.String("status-url", "query", "form of the status URL in the kick-off's Content-Location: `query|path`; query is [base]/$export-poll-status?_jobId=ID, path is [base]/$export-poll-status/ID (both are always served)"),
		signingKey:               fs.String("signing-key", "", "`HEX|@FILE`: a secret of at least 32 bytes, in hex or in a file (@PATH, or a path; the file holds the key in hex or as raw bytes), that signs the manifest's file URLs (HMAC-SHA256, key id \""+signingKeyID+"\"): each works without a token until -signed-url-expiry, and requiresAccessToken is false; only with -downloads proxy; default: none, file URLs need the token"),
		signedURLExpiry:          fs.Duration("signed-url-expiry", bulkexport.DefaultSignedURLExpiry, "how long a signed or presigned file URL works (-signing-key, -downloads signed|redirect)"),
		pollLimit:                fs.String("poll-limit", "off", "`off|on|BURST/RATE`: rate limit of polls on a running export, per client and export; BURST/RATE allows BURST polls back to back, then RATE times faster than the advised Retry-After in the long run (a poll over it gets 429 with Retry-After); on is 10/2"),
		maxActiveJobs:            fs.Int("max-active-jobs", 10, "most queued and running exports of one client; a kick-off beyond gets 429; -1: no cap"),
		maxFinishedJobs:          fs.Int("max-finished-jobs", bulkexport.DefaultMaxFinishedJobsPerClient, "most finished exports kept for one client; a kick-off beyond expires the client's oldest ones at once (their polls get 404); -1: no cap"),
		reuseInFlight:            fs.Bool("reuse-in-flight", false, "answer a kick-off that repeats one of the client's queued or running exports with that export's status URL instead of starting another"),
		allowMissingRespondAsync: fs.Bool("allow-missing-respond-async", false, "accept a kick-off without \"Prefer: respond-async\" (default: 400)"),
		noSeparateExportStatus:   fs.Bool("disable-separate-export-status", false, "ignore \"Prefer: separate-export-status\" (default: honoured)"),
		retryAfter:               fs.String("retry-after", "adaptive", "Retry-After of a poll on a running export: `adaptive|DURATION`; adaptive is a tenth of the export's age, from 1s to 2m; a duration is always that (eHealth: 120s)"),
		cancelledRetention:       fs.Duration("cancelled-retention", 24*time.Hour, "how long a cancelled export is kept: its polls answer 404 \"cancelled\" until then, 404 \"expired\" after"),
		finishedJobCache:         fs.Duration("finished-job-cache", 0, "keep a completed export in memory this long after a poll read it, so that its next polls skip the job store; a removal by another server sharing the store goes unseen for up to this long; 0: off"),
		manifestPageSize:         fs.Int("manifest-page-size", 1000, "output[] entries per manifest page when the kick-off asked for allowPartialManifests=true; further pages through link[] \"next\""),
		maxBodyBytes:             fs.Int64("max-body-bytes", 1<<20, "largest POST kick-off or status body, in bytes; larger gets 413"),
		maxParamLength:           fs.Int("max-param-length", 8<<10, "longest kick-off parameter value, in bytes; longer gets 400"),
		maxParamValues:           fs.Int("max-param-values", 1000, "most values of one repeated kick-off parameter (_type, _typeFilter, patient, ...); more gets 400"),
		retention:                fs.Duration("retention", 24*time.Hour, "how long a finished export and its files are kept (the manifest's Expires header)"),
		maxFileResources:         fs.Int64("max-file-resources", 100_000, "most resources in one output file; more start another file"),
		maxFileBytes:             fs.Int64("max-file-bytes", 256<<20, "largest output file, in bytes; more start another file"),
		maxFilesPerJob:           fs.Int("max-files-per-job", 10_000, "most files one export may write; an export that needs more fails (413 too-costly)"),
	}
}

// parse validates the flags. set holds the names of the flags given on
// the command line, so that they override -profile whatever their order.
func (f *protocolFlags) parse(set map[string]bool) (protocol, error) {
	p := protocol{
		profile:                  *f.profile,
		signedURLExpiry:          *f.signedURLExpiry,
		maxActiveJobs:            *f.maxActiveJobs,
		maxFinishedJobs:          *f.maxFinishedJobs,
		reuseInFlight:            *f.reuseInFlight,
		allowMissingRespondAsync: *f.allowMissingRespondAsync,
		noSeparateExportStatus:   *f.noSeparateExportStatus,
		cancelledRetention:       *f.cancelledRetention,
		finishedJobCache:         *f.finishedJobCache,
		manifestPageSize:         *f.manifestPageSize,
		maxBodyBytes:             *f.maxBodyBytes,
		maxParamLength:           *f.maxParamLength,
		maxParamValues:           *f.maxParamValues,
		retention:                *f.retention,
		maxFileResources:         *f.maxFileResources,
		maxFileBytes:             *f.maxFileBytes,
		maxFilesPerJob:           *f.maxFilesPerJob,
	}
	switch p.profile {
	case "ehealth":
	case "ig":
		if !set["delete-policy"] {
			*f.deletePolicy = "ig"
		}
	default:
		return p, fmt.Errorf("-profile: %q is not one of ehealth, ig", p.profile)
	}
	switch *f.deletePolicy {
	case "ehealth":
		p.deletePolicy = bulkexport.DeleteFinishedNotFound
	case "ig":
		p.deletePolicy = bulkexport.DeleteFinishedRemoves
	default:
		return p, fmt.Errorf("-delete-policy: %q is not one of ehealth, ig", *f.deletePolicy)
	}
	switch *f.manifest {
	case "stu3":
		p.manifest = bulkexport.ManifestSTU3
	case "stu4":
		p.manifest = bulkexport.ManifestSTU4
	default:
		return p, fmt.Errorf("-manifest: %q is not one of stu3, stu4", *f.manifest)
	}
	switch *f.statusURL {
	case "query":
		p.statusURL = bulkexport.StatusQuery
	case "path":
		p.statusURL = bulkexport.StatusPath
	default:
		return p, fmt.Errorf("-status-url: %q is not one of query, path", *f.statusURL)
	}
	var err error
	if *f.signingKey != "" {
		if p.signingKey, err = parseSigningKey(*f.signingKey); err != nil {
			return p, fmt.Errorf("-signing-key: %w", err)
		}
	}
	if p.pollLimit, err = parsePollLimit(*f.pollLimit); err != nil {
		return p, fmt.Errorf("-poll-limit: %w", err)
	}
	if p.retryAfter, err = parseRetryAfter(*f.retryAfter); err != nil {
		return p, fmt.Errorf("-retry-after: %w", err)
	}
	positive := []struct {
		name string
		ok   bool
	}{
		{"-signed-url-expiry", p.signedURLExpiry > 0},
		{"-cancelled-retention", p.cancelledRetention > 0},
		{"-manifest-page-size", p.manifestPageSize > 0},
		{"-max-body-bytes", p.maxBodyBytes > 0},
		{"-max-param-length", p.maxParamLength > 0},
		{"-max-param-values", p.maxParamValues > 0},
		{"-retention", p.retention > 0},
		{"-max-file-resources", p.maxFileResources > 0},
		{"-max-file-bytes", p.maxFileBytes > 0},
		{"-max-files-per-job", p.maxFilesPerJob > 0},
	}
	if p.finishedJobCache < 0 {
		return p, errors.New("-finished-job-cache: must not be negative")
	}
	for _, c := range positive {
		if !c.ok {
			return p, fmt.Errorf("%s: must be positive", c.name)
		}
	}
	if p.maxActiveJobs == 0 || p.maxActiveJobs < -1 {
		return p, errors.New("-max-active-jobs: must be positive, or -1 for no cap")
	}
	if p.maxFinishedJobs == 0 || p.maxFinishedJobs < -1 {
		return p, errors.New("-max-finished-jobs: must be positive, or -1 for no cap")
	}
	return p, nil
}

// parseSigningKey reads -signing-key: hex, or a file named by @PATH (or by
// a value that is not hex) holding the key in hex or as raw bytes. The key
// has at least 32 bytes.
func parseSigningKey(s string) ([]byte, error) {
	var key []byte
	path, file := strings.CutPrefix(s, "@")
	if !file {
		if b, err := hex.DecodeString(s); err == nil {
			key = b
		} else if _, serr := os.Stat(s); serr == nil {
			file = true
		} else {
			return nil, errors.New("neither hex nor a file (name a file as @PATH)")
		}
	}
	if file {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		if h, err := hex.DecodeString(strings.TrimSpace(string(b))); err == nil && len(h) > 0 {
			key = h
		} else {
			key = b
		}
	}
	if len(key) < 32 {
		return nil, fmt.Errorf("the key has %d bytes; it needs at least 32 (for example: openssl rand -hex 32)", len(key))
	}
	return key, nil
}

// parsePollLimit reads -poll-limit: off, on, or BURST/RATE.
func parsePollLimit(s string) (*bulkexport.PollLimit, error) {
	switch s {
	case "off":
		return nil, nil
	case "on":
		return &bulkexport.PollLimit{Burst: 10, Rate: 2}, nil
	}
	b, r, ok := strings.Cut(s, "/")
	burst, berr := strconv.Atoi(b)
	rate, rerr := strconv.ParseFloat(r, 64)
	if !ok || berr != nil || rerr != nil || burst < 1 || !(rate > 0) || rate > 1e6 {
		return nil, fmt.Errorf("%q is not off, on or BURST/RATE (a positive whole BURST, a positive RATE)", s)
	}
	return &bulkexport.PollLimit{Burst: burst, Rate: rate}, nil
}

// parseRetryAfter reads -retry-after: adaptive (0) or a positive duration.
func parseRetryAfter(s string) (time.Duration, error) {
	if s == "adaptive" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%q is not adaptive or a positive duration", s)
	}
	return d, nil
}

// handlerOptions are the handler's options the protocol flags set.
func (p *protocol) handlerOptions() *bulkexport.Options {
	o := &bulkexport.Options{
		DeletePolicy:                p.deletePolicy,
		ManifestVersion:             p.manifest,
		StatusURLStyle:              p.statusURL,
		SignedURLExpiry:             p.signedURLExpiry,
		PollLimit:                   p.pollLimit,
		MaxActiveJobsPerClient:      p.maxActiveJobs,
		MaxFinishedJobsPerClient:    p.maxFinishedJobs,
		ReuseInFlight:               p.reuseInFlight,
		AllowMissingRespondAsync:    p.allowMissingRespondAsync,
		DisableSeparateExportStatus: p.noSeparateExportStatus,
		CancelledRetention:          p.cancelledRetention,
		FinishedJobCache:            p.finishedJobCache,
		ManifestPageSize:            p.manifestPageSize,
		MaxBodyBytes:                p.maxBodyBytes,
		MaxParamLength:              p.maxParamLength,
		MaxParamValues:              p.maxParamValues,
	}
	if p.signingKey != nil {
		o.SigningKeys = []bulkexport.SigningKey{{ID: signingKeyID, Secret: p.signingKey}}
	}
	return o
}

// retryAfterPolicy is the handler's Retry-After policy.
func (p *protocol) retryAfterPolicy() func(*bulkexport.Job, time.Time) time.Duration {
	if p.retryAfter == 0 {
		return bulkexport.DefaultRetryAfter
	}
	return bulkexport.FixedRetryAfter(p.retryAfter)
}

// workerOptions sets the worker's options the protocol flags set on w.
func (p *protocol) workerOptions(w *bulkexport.WorkerOptions) {
	w.Retention = p.retention
	w.MaxFileResources = p.maxFileResources
	w.MaxFileBytes = p.maxFileBytes
	w.MaxFilesPerJob = p.maxFilesPerJob
}
