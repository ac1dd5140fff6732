package bulkexport

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"os"
	"time"
)

// Defaults of Options. A zero field takes its default; see each field.
const (
	DefaultMaxBodyBytes             = 1 << 20
	DefaultMaxActiveJobsPerClient   = 10
	DefaultMaxFinishedJobsPerClient = 100
	DefaultMaxParamLength           = 8 << 10
	DefaultMaxParamValues           = 1000
	DefaultManifestPageSize         = 1000
	DefaultCancelledRetention       = 24 * time.Hour
	DefaultPollBurst                = 10
	DefaultPollRate                 = 2.0
)

// Defaults of WorkerOptions. A zero field takes its default; see each field.
const (
	DefaultConcurrency        = 2
	DefaultTypeConcurrency    = 2
	DefaultLease              = 30 * time.Second
	DefaultHeartbeat          = 500 * time.Millisecond
	DefaultPollInterval       = time.Second
	DefaultMaxFileResources   = 100_000
	DefaultMaxFileBytes       = 256 << 20
	DefaultMaxFilesPerJob     = 10_000
	DefaultCheckpointInterval = 5 * time.Second
	DefaultRetention          = 24 * time.Hour
	DefaultPurgeInterval      = time.Minute
	DefaultMaxAttempts        = 5
	DefaultPartitions         = 8
	DefaultUnitConcurrency    = 2
)

// optionError is a misconfiguration of one field of Options or
// WorkerOptions.
func optionError(field string, format string, args ...any) error {
	return fmt.Errorf("bulkexport: %s: %s", field, fmt.Sprintf(format, args...))
}

// fill gives every zero field of o its default. It is the only place the
// handler's defaults are applied.
func (o *Options) fill() {
	if o.ErrorMapper == nil {
		o.ErrorMapper = DefaultErrorMapper
	}
	if o.RetryAfter == nil {
		o.RetryAfter = DefaultRetryAfter
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	zeroDefault(&o.MaxBodyBytes, DefaultMaxBodyBytes)
	zeroDefault(&o.MaxActiveJobsPerClient, DefaultMaxActiveJobsPerClient)
	zeroDefault(&o.MaxFinishedJobsPerClient, DefaultMaxFinishedJobsPerClient)
	zeroDefault(&o.MaxParamLength, DefaultMaxParamLength)
	zeroDefault(&o.MaxParamValues, DefaultMaxParamValues)
	zeroDefault(&o.ManifestPageSize, DefaultManifestPageSize)
	zeroDefault(&o.CancelledRetention, DefaultCancelledRetention)
	zeroDefault(&o.SignedURLExpiry, DefaultSignedURLExpiry)
	if o.PollLimit != nil {
		l := *o.PollLimit
		zeroDefault(&l.Burst, DefaultPollBurst)
		zeroDefault(&l.Rate, DefaultPollRate)
		o.PollLimit = &l
	}
}

// validate rejects what fill cannot make sense of: unknown enum values,
// negative sizes and durations, and combinations that contradict each
// other. Each error names the field.
func (o *Options) validate() error {
	for _, check := range []func() error{o.validateEnums, o.validateSizes, o.validateDownloads} {
		if err := check(); err != nil {
			return err
		}
	}
	return nil
}

// validateEnums checks BaseURL and the fields that take one of a few
// values.
func (o *Options) validateEnums() error {
	u, err := url.Parse(o.BaseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
		return optionError("Options.BaseURL", "must be an absolute http(s) URL without query or fragment, got %q", o.BaseURL)
	}
	if o.DeletePolicy != DeleteFinishedNotFound && o.DeletePolicy != DeleteFinishedRemoves {
		return optionError("Options.DeletePolicy", "unknown policy %d", int(o.DeletePolicy))
	}
	if o.StatusURLStyle != StatusQuery && o.StatusURLStyle != StatusPath {
		return optionError("Options.StatusURLStyle", "unknown style %d", int(o.StatusURLStyle))
	}
	if o.ManifestVersion != ManifestSTU3 && o.ManifestVersion != ManifestSTU4 {
		return optionError("Options.ManifestVersion", "unknown version %d", int(o.ManifestVersion))
	}
	if o.Downloads != DownloadProxy && o.Downloads != DownloadSigned && o.Downloads != DownloadRedirect {
		return optionError("Options.Downloads", "unknown mode %d", int(o.Downloads))
	}
	return nil
}

// validateSizes checks the caps, sizes and durations.
func (o *Options) validateSizes() error {
	for _, c := range []struct {
		field string
		v     int64
	}{
		{"Options.MaxBodyBytes", o.MaxBodyBytes},
		{"Options.MaxParamLength", int64(o.MaxParamLength)},
		{"Options.MaxParamValues", int64(o.MaxParamValues)},
		{"Options.ManifestPageSize", int64(o.ManifestPageSize)},
		{"Options.CancelledRetention", int64(o.CancelledRetention)},
		{"Options.SignedURLExpiry", int64(o.SignedURLExpiry)},
		{"Options.FinishedJobCache", int64(o.FinishedJobCache)},
	} {
		if c.v < 0 {
			return optionError(c.field, "must not be negative, got %d", c.v)
		}
	}
	if o.PollLimit != nil {
		if o.PollLimit.Burst < 0 {
			return optionError("Options.PollLimit.Burst", "must not be negative, got %d", o.PollLimit.Burst)
		}
		if r := o.PollLimit.Rate; r < 0 || math.IsNaN(r) || math.IsInf(r, 0) {
			return optionError("Options.PollLimit.Rate", "must be a positive number, got %v", r)
		}
	}
	return nil
}

// validateDownloads checks that the download mode, the signing keys, the
// Storage and RequiresAccessToken fit together.
func (o *Options) validateDownloads() error {
	if err := checkSigningKeys(o.SigningKeys); err != nil {
		return err
	}
	capability := len(o.SigningKeys) > 0 || o.Downloads == DownloadSigned
	if capability && o.RequiresAccessToken != nil && *o.RequiresAccessToken {
		return optionError("Options.RequiresAccessToken", "cannot be true when the manifest lists capability URLs (SigningKeys or DownloadSigned)")
	}
	if len(o.SigningKeys) > 0 && o.Downloads != DownloadProxy {
		return optionError("Options.SigningKeys", "sign the handler's own file URLs, so they need Downloads DownloadProxy, not %v", o.Downloads)
	}
	if o.Downloads != DownloadProxy {
		if o.Storage == nil {
			return optionError("Options.Downloads", "%v needs a Storage", o.Downloads)
		}
		if _, ok := o.Storage.(URLSigner); !ok {
			return optionError("Options.Downloads", "%v needs a Storage that implements URLSigner; %T does not", o.Downloads, o.Storage)
		}
	}
	return nil
}

// fill gives every zero field of o its default. It is the only place the
// worker's defaults are applied.
func (o *WorkerOptions) fill() {
	if o.ID == "" {
		host, _ := os.Hostname()
		var b [4]byte
		_, _ = rand.Read(b[:])
		o.ID = host + "-" + hex.EncodeToString(b[:])
	}
	zeroDefault(&o.Concurrency, DefaultConcurrency)
	zeroDefault(&o.TypeConcurrency, DefaultTypeConcurrency)
	zeroDefault(&o.Lease, DefaultLease)
	zeroDefault(&o.Heartbeat, DefaultHeartbeat)
	zeroDefault(&o.PollInterval, DefaultPollInterval)
	zeroDefault(&o.MaxFileResources, DefaultMaxFileResources)
	zeroDefault(&o.MaxFileBytes, DefaultMaxFileBytes)
	zeroDefault(&o.MaxFilesPerJob, DefaultMaxFilesPerJob)
	zeroDefault(&o.CheckpointInterval, DefaultCheckpointInterval)
	zeroDefault(&o.Retention, DefaultRetention)
	zeroDefault(&o.PurgeInterval, DefaultPurgeInterval)
	zeroDefault(&o.MaxAttempts, DefaultMaxAttempts)
	zeroDefault(&o.Partitions, DefaultPartitions)
	zeroDefault(&o.UnitConcurrency, DefaultUnitConcurrency)
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
}

// validate rejects negative values and contradicting combinations; each
// error names the field.
func (o *WorkerOptions) validate() error {
	for _, c := range []struct {
		field string
		v     int64
	}{
		{"WorkerOptions.Concurrency", int64(o.Concurrency)},
		{"WorkerOptions.TypeConcurrency", int64(o.TypeConcurrency)},
		{"WorkerOptions.Lease", int64(o.Lease)},
		{"WorkerOptions.Heartbeat", int64(o.Heartbeat)},
		{"WorkerOptions.PollInterval", int64(o.PollInterval)},
		{"WorkerOptions.MaxFileResources", o.MaxFileResources},
		{"WorkerOptions.MaxFileBytes", o.MaxFileBytes},
		{"WorkerOptions.MaxFilesPerJob", int64(o.MaxFilesPerJob)},
		{"WorkerOptions.CheckpointInterval", int64(o.CheckpointInterval)},
		{"WorkerOptions.Retention", int64(o.Retention)},
		{"WorkerOptions.PurgeInterval", int64(o.PurgeInterval)},
		{"WorkerOptions.MaxAttempts", int64(o.MaxAttempts)},
		{"WorkerOptions.Partitions", int64(o.Partitions)},
		{"WorkerOptions.UnitConcurrency", int64(o.UnitConcurrency)},
	} {
		if c.v < 0 {
			return optionError(c.field, "must not be negative, got %d", c.v)
		}
	}
	if o.Heartbeat >= o.Lease {
		return &heartbeatError{optionError("WorkerOptions.Heartbeat", "(%v) must be shorter than Lease (%v): a job's lease is renewed on heartbeats", o.Heartbeat, o.Lease)}
	}
	if len(o.ID) > 200 {
		return optionError("WorkerOptions.ID", "longer than 200 bytes")
	}
	return nil
}

func zeroDefault[T int | int64 | float64 | time.Duration](p *T, def T) {
	if *p == 0 {
		*p = def
	}
}

// heartbeatError is the Heartbeat >= Lease error.
type heartbeatError struct{ error }

func (e *heartbeatError) Unwrap() error { return e.error }

var errNilStore = errors.New("bulkexport: nil JobStore")
