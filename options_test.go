package bulkexport_test

import (
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// TestOptionsValidation: every invalid option, alone or in a contradicting
// combination, is refused by NewHandler or NewWorker with an error naming
// the field; zero values take their defaults.
func TestOptionsValidation(t *testing.T) {
	t.Parallel()
	store := bulkexport.NewMemoryStore()
	storage, err := bulkexport.NewDirStorage(t.TempDir())
	require.NoError(t, err)
	key := bulkexport.SigningKey{ID: "k1", Secret: make([]byte, 32)}
	yes := true
	base := func(o bulkexport.Options) *bulkexport.Options {
		if o.BaseURL == "" {
			o.BaseURL = "https://ehr.example/fhir"
		}
		return &o
	}
	handlerCases := []struct {
		name  string
		opts  *bulkexport.Options
		field string
	}{
		{"no base URL", &bulkexport.Options{}, "Options.BaseURL"},
		{"relative base URL", base(bulkexport.Options{BaseURL: "/fhir"}), "Options.BaseURL"},
		{"base URL with query", base(bulkexport.Options{BaseURL: "https://h/fhir?x=1"}), "Options.BaseURL"},
		{"base URL with fragment", base(bulkexport.Options{BaseURL: "https://h/fhir#x"}), "Options.BaseURL"},
		{"ftp base URL", base(bulkexport.Options{BaseURL: "ftp://h/fhir"}), "Options.BaseURL"},
		{"unknown delete policy", base(bulkexport.Options{DeletePolicy: 7}), "Options.DeletePolicy"},
		{"negative delete policy", base(bulkexport.Options{DeletePolicy: -1}), "Options.DeletePolicy"},
		{"unknown status URL style", base(bulkexport.Options{StatusURLStyle: 2}), "Options.StatusURLStyle"},
		{"unknown manifest version", base(bulkexport.Options{ManifestVersion: 9}), "Options.ManifestVersion"},
		{"unknown download mode", base(bulkexport.Options{Downloads: 5}), "Options.Downloads"},
		{"negative body cap", base(bulkexport.Options{MaxBodyBytes: -1}), "Options.MaxBodyBytes"},
		{"negative parameter length", base(bulkexport.Options{MaxParamLength: -1}), "Options.MaxParamLength"},
		{"negative parameter values", base(bulkexport.Options{MaxParamValues: -3}), "Options.MaxParamValues"},
		{"negative page size", base(bulkexport.Options{ManifestPageSize: -1}), "Options.ManifestPageSize"},
		{"negative cancelled retention", base(bulkexport.Options{CancelledRetention: -time.Second}), "Options.CancelledRetention"},
		{"negative URL expiry", base(bulkexport.Options{SignedURLExpiry: -time.Second}), "Options.SignedURLExpiry"},
		{"negative finished-job cache", base(bulkexport.Options{FinishedJobCache: -time.Second}), "Options.FinishedJobCache"},
		{"negative poll burst", base(bulkexport.Options{PollLimit: &bulkexport.PollLimit{Burst: -1}}), "Options.PollLimit.Burst"},
		{"negative poll rate", base(bulkexport.Options{PollLimit: &bulkexport.PollLimit{Rate: -1}}), "Options.PollLimit.Rate"},
		{"NaN poll rate", base(bulkexport.Options{PollLimit: &bulkexport.PollLimit{Rate: math.NaN()}}), "Options.PollLimit.Rate"},
		{"short signing key", base(bulkexport.Options{SigningKeys: []bulkexport.SigningKey{{ID: "k", Secret: []byte("short")}}}), "Options.SigningKeys"},
		{"duplicate signing keys", base(bulkexport.Options{SigningKeys: []bulkexport.SigningKey{key, key}}), "Options.SigningKeys"},
		{"signing keys with a token", base(bulkexport.Options{SigningKeys: []bulkexport.SigningKey{key}, RequiresAccessToken: &yes}), "Options.RequiresAccessToken"},
		{"signed downloads with a token", base(bulkexport.Options{Downloads: bulkexport.DownloadSigned, Storage: storage, RequiresAccessToken: &yes}), "Options.RequiresAccessToken"},
		{"signing keys with redirects", base(bulkexport.Options{Downloads: bulkexport.DownloadRedirect, Storage: storage, SigningKeys: []bulkexport.SigningKey{key}}), "Options.SigningKeys"},
		{"signed downloads without storage", base(bulkexport.Options{Downloads: bulkexport.DownloadSigned}), "Options.Downloads"},
		{"redirects from a storage that cannot sign", base(bulkexport.Options{Downloads: bulkexport.DownloadRedirect, Storage: storage}), "Options.Downloads"},
	}
	for _, c := range handlerCases {
		t.Run("Options/"+c.name, func(t *testing.T) {
			_, err := bulkexport.NewHandler(store, c.opts)
			require.Error(t, err)
			require.Contains(t, err.Error(), c.field+":")
		})
	}
	_, err = bulkexport.NewHandler(store, base(bulkexport.Options{MaxActiveJobsPerClient: -1, MaxFinishedJobsPerClient: -1}))
	require.NoError(t, err, "negative job caps mean no cap")
	_, err = bulkexport.NewHandler(nil, base(bulkexport.Options{}))
	require.Error(t, err)

	src := bulkexporttest.NewSource()
	workerCases := []struct {
		name  string
		opts  bulkexport.WorkerOptions
		field string
	}{
		{"negative concurrency", bulkexport.WorkerOptions{Concurrency: -1}, "WorkerOptions.Concurrency"},
		{"negative type concurrency", bulkexport.WorkerOptions{TypeConcurrency: -2}, "WorkerOptions.TypeConcurrency"},
		{"negative lease", bulkexport.WorkerOptions{Lease: -time.Second}, "WorkerOptions.Lease"},
		{"negative heartbeat", bulkexport.WorkerOptions{Heartbeat: -time.Second}, "WorkerOptions.Heartbeat"},
		{"heartbeat as long as the lease", bulkexport.WorkerOptions{Lease: time.Second, Heartbeat: time.Second}, "WorkerOptions.Heartbeat"},
		{"default heartbeat past a short lease", bulkexport.WorkerOptions{Lease: 100 * time.Millisecond}, "WorkerOptions.Heartbeat"},
		{"heartbeat past the default lease", bulkexport.WorkerOptions{Heartbeat: time.Minute}, "WorkerOptions.Heartbeat"},
		{"negative poll interval", bulkexport.WorkerOptions{PollInterval: -1}, "WorkerOptions.PollInterval"},
		{"negative file resources", bulkexport.WorkerOptions{MaxFileResources: -1}, "WorkerOptions.MaxFileResources"},
		{"negative file bytes", bulkexport.WorkerOptions{MaxFileBytes: -1}, "WorkerOptions.MaxFileBytes"},
		{"negative files per job", bulkexport.WorkerOptions{MaxFilesPerJob: -1}, "WorkerOptions.MaxFilesPerJob"},
		{"negative checkpoint interval", bulkexport.WorkerOptions{CheckpointInterval: -1}, "WorkerOptions.CheckpointInterval"},
		{"negative retention", bulkexport.WorkerOptions{Retention: -time.Hour}, "WorkerOptions.Retention"},
		{"negative purge interval", bulkexport.WorkerOptions{PurgeInterval: -1}, "WorkerOptions.PurgeInterval"},
		{"negative attempts", bulkexport.WorkerOptions{MaxAttempts: -1}, "WorkerOptions.MaxAttempts"},
	}
	for _, c := range workerCases {
		t.Run("WorkerOptions/"+c.name, func(t *testing.T) {
			_, err := bulkexport.NewWorker(store, src, storage, &c.opts)
			require.Error(t, err)
			require.Contains(t, err.Error(), c.field+":")
		})
	}
	w, err := bulkexport.NewWorker(store, src, storage, nil)
	require.NoError(t, err, "every zero value has a default")
	require.NotEmpty(t, w.ID())
}
