package main

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"flag"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// defaultProtocol is what parseFlags gives without protocol flags: the
// library's defaults.
var defaultProtocol = protocol{
	profile:            "ehealth",
	signedURLExpiry:    bulkexport.DefaultSignedURLExpiry,
	maxActiveJobs:      10,
	maxFinishedJobs:    bulkexport.DefaultMaxFinishedJobsPerClient,
	cancelledRetention: 24 * time.Hour,
	manifestPageSize:   1000,
	maxBodyBytes:       1 << 20,
	maxParamLength:     8 << 10,
	maxParamValues:     1000,
	retention:          24 * time.Hour,
	maxFileResources:   100_000,
	maxFileBytes:       256 << 20,
	maxFilesPerJob:     10_000,
}

// testKeyHex is a 32-byte signing key in hex.
const testKeyHex = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"

func TestParseProtocolFlags(t *testing.T) {
	t.Parallel()
	key, err := hex.DecodeString(testKeyHex)
	require.NoError(t, err)
	o, err := parseFlags([]string{"-delete-policy", "ig", "-manifest", "stu4", "-status-url", "path",
		"-signing-key", testKeyHex, "-signed-url-expiry", "1h", "-poll-limit", "3/1.5",
		"-max-active-jobs", "1", "-max-finished-jobs", "-1", "-reuse-in-flight", "-allow-missing-respond-async",
		"-disable-separate-export-status", "-retry-after", "120s", "-cancelled-retention", "1m",
		"-manifest-page-size", "7", "-max-body-bytes", "100", "-max-param-length", "10", "-max-param-values", "2",
		"-retention", "2h", "-max-file-resources", "5", "-max-file-bytes", "4096", "-max-files-per-job", "3"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, protocol{profile: "ehealth", deletePolicy: bulkexport.DeleteFinishedRemoves,
		manifest: bulkexport.ManifestSTU4, statusURL: bulkexport.StatusPath, signingKey: key,
		signedURLExpiry: time.Hour, pollLimit: &bulkexport.PollLimit{Burst: 3, Rate: 1.5},
		maxActiveJobs: 1, maxFinishedJobs: -1, reuseInFlight: true, allowMissingRespondAsync: true,
		noSeparateExportStatus: true, retryAfter: 120 * time.Second, cancelledRetention: time.Minute,
		manifestPageSize: 7, maxBodyBytes: 100, maxParamLength: 10, maxParamValues: 2,
		retention: 2 * time.Hour, maxFileResources: 5, maxFileBytes: 4096, maxFilesPerJob: 3}, o.protocol)

	opts := o.protocol.handlerOptions()
	require.Equal(t, []bulkexport.SigningKey{{ID: "k1", Secret: key}}, opts.SigningKeys)
	require.Equal(t, bulkexport.DeleteFinishedRemoves, opts.DeletePolicy)
	require.Equal(t, 120*time.Second, o.protocol.retryAfterPolicy()(nil, time.Now()))
	var w bulkexport.WorkerOptions
	o.protocol.workerOptions(&w)
	require.Equal(t, bulkexport.WorkerOptions{Retention: 2 * time.Hour, MaxFileResources: 5, MaxFileBytes: 4096, MaxFilesPerJob: 3}, w)

	// The defaults: adaptive Retry-After, no poll limit, no keys.
	o, err = parseFlags(nil, io.Discard)
	require.NoError(t, err)
	job := &bulkexport.Job{CreatedAt: time.Now().Add(-time.Hour)}
	now := time.Now()
	require.Equal(t, bulkexport.DefaultRetryAfter(job, now), o.protocol.retryAfterPolicy()(job, now))
	require.Nil(t, o.protocol.handlerOptions().SigningKeys)
	require.Nil(t, o.protocol.pollLimit)
	o, err = parseFlags([]string{"-poll-limit", "on", "-retry-after", "adaptive"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, &bulkexport.PollLimit{Burst: 10, Rate: 2}, o.protocol.pollLimit)
	require.Zero(t, o.protocol.retryAfter)

	// -profile ig sets the IG's delete policy; an explicit -delete-policy
	// wins whatever the order.
	o, err = parseFlags([]string{"-profile", "ig"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, bulkexport.DeleteFinishedRemoves, o.protocol.deletePolicy)
	o, err = parseFlags([]string{"-delete-policy", "ehealth", "-profile", "ig"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, bulkexport.DeleteFinishedNotFound, o.protocol.deletePolicy)
	o, err = parseFlags([]string{"-profile", "ig", "-delete-policy", "ehealth"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, bulkexport.DeleteFinishedNotFound, o.protocol.deletePolicy)

	// -signing-key from a file: @PATH or a plain path; hex or raw bytes.
	dir := t.TempDir()
	hexFile, rawFile := filepath.Join(dir, "key.hex"), filepath.Join(dir, "key.bin")
	require.NoError(t, os.WriteFile(hexFile, []byte(testKeyHex+"\n"), 0o600))
	raw := bytes.Repeat([]byte{0xfe, 'x'}, 20)
	require.NoError(t, os.WriteFile(rawFile, raw, 0o600))
	for _, c := range []struct {
		arg  string
		want []byte
	}{{"@" + hexFile, key}, {hexFile, key}, {"@" + rawFile, raw}, {rawFile, raw}} {
		o, err = parseFlags([]string{"-signing-key", c.arg}, io.Discard)
		require.NoError(t, err, c.arg)
		require.Equal(t, c.want, o.protocol.signingKey, c.arg)
	}
	short := filepath.Join(dir, "short")
	require.NoError(t, os.WriteFile(short, []byte("abcd"), 0o600))

	for _, args := range [][]string{
		{"-profile", "hl7"},
		{"-delete-policy", "remove"},
		{"-manifest", "stu5"},
		{"-status-url", "fragment"},
		{"-signing-key", "abcd"},                 // too short
		{"-signing-key", testKeyHex[:62]},        // 31 bytes
		{"-signing-key", "zz" + testKeyHex},      // neither hex nor a file
		{"-signing-key", "@" + short},            // too short
		{"-signing-key", "@" + dir + "/missing"}, // no such file
		{"-signing-key", testKeyHex, "-storage", "blob:mem://", "-downloads", "redirect"},
		{"-signed-url-expiry", "0s"},
		{"-poll-limit", "fast"},
		{"-poll-limit", "0/1"},
		{"-poll-limit", "3/0"},
		{"-poll-limit", "3"},
		{"-poll-limit", "3/x"},
		{"-max-active-jobs", "0"},
		{"-max-active-jobs", "-2"},
		{"-max-finished-jobs", "0"},
		{"-reuse-in-flight=maybe"},
		{"-retry-after", "0s"},
		{"-retry-after", "-5s"},
		{"-retry-after", "soon"},
		{"-cancelled-retention", "0s"},
		{"-finished-job-cache", "-1s"},
		{"-manifest-page-size", "0"},
		{"-max-body-bytes", "0"},
		{"-max-param-length", "-1"},
		{"-max-param-values", "0"},
		{"-retention", "-1h"},
		{"-max-file-resources", "0"},
		{"-max-file-bytes", "-1"},
		{"-max-files-per-job", "0"},
	} {
		var stderr bytes.Buffer
		_, err := parseFlags(args, &stderr)
		require.ErrorIs(t, err, errUsage, "%v", args)
		require.NotEmpty(t, stderr.String(), "%v", args)
	}
}

// fhirClient talks to a server started by startRun.
type fhirClient struct {
	t     *testing.T
	base  string
	token string // sent as a bearer token when set
}

// do sends a request with the headers hdr (name, value, ...) and returns
// the answer with its body read.
func (c *fhirClient) do(method, u string, body string, hdr ...string) (*http.Response, []byte) {
	c.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, u, rd)
	require.NoError(c.t, err)
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(c.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(c.t, err)
	return resp, b
}

// kickoff starts a system export with the query q and returns its
// status URL.
func (c *fhirClient) kickoff(q string) string {
	c.t.Helper()
	resp, body := c.do(http.MethodGet, c.base+"/$export?"+q, "", "Prefer", "respond-async")
	require.Equal(c.t, http.StatusAccepted, resp.StatusCode, "%s", body)
	status := resp.Header.Get("Content-Location")
	require.NotEmpty(c.t, status)
	return status
}

// wait polls status until the export is no longer in progress (a bounded
// wait, not a timing assertion) and returns the last answer.
func (c *fhirClient) wait(status string) (*http.Response, []byte) {
	c.t.Helper()
	for range 800 {
		resp, body := c.do(http.MethodGet, status, "")
		if resp.StatusCode != http.StatusAccepted {
			return resp, body
		}
		time.Sleep(25 * time.Millisecond)
	}
	c.t.Fatalf("%s: still in progress", status)
	return nil, nil
}

// export kicks off an export with the query q, waits for it and returns
// its status URL and manifest.
func (c *fhirClient) export(q string) (string, *http.Response, fhirbulk.Manifest) {
	c.t.Helper()
	status := c.kickoff(q)
	resp, body := c.wait(status)
	require.Equal(c.t, http.StatusOK, resp.StatusCode, "%s", body)
	var m fhirbulk.Manifest
	require.NoError(c.t, json.Unmarshal(body, &m))
	return status, resp, m
}

// requireOutcome checks that body is an OperationOutcome.
func requireOutcome(t *testing.T, body []byte) {
	t.Helper()
	var oo struct {
		ResourceType string `json:"resourceType"`
		Issue        []any  `json:"issue"`
	}
	require.NoError(t, json.Unmarshal(body, &oo), "%s", body)
	require.Equal(t, "OperationOutcome", oo.ResourceType)
	require.NotEmpty(t, oo.Issue)
}

// deleteFinished: DELETE on a finished export answers 202 (the IG) or 404
// (eHealth).
func deleteFinished(t *testing.T, c *fhirClient, flagged bool) {
	status, _, _ := c.export("_type=Patient")
	resp, body := c.do(http.MethodDelete, status, "")
	if flagged {
		require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
		resp, body = c.do(http.MethodGet, status, "")
		require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s", body)
	} else {
		require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s", body)
		resp, body = c.do(http.MethodGet, status, "")
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	}
}

// slow makes an export of 100 patients last seconds, so that it is still
// running while a check looks at it.
var slow = []string{"-patients", "100", "-pace", "50ms"}

// TestProtocolFlags starts the server twice per flag, without it and with
// it, and checks that what a client sees differs as the flag says.
func TestProtocolFlags(t *testing.T) {
	t.Parallel()
	rows := []struct {
		name   string
		flag   []string // given to the flagged server only
		common []string // given to both
		check  func(t *testing.T, c *fhirClient, flagged bool)
	}{
		{name: "delete-policy", flag: []string{"-delete-policy", "ig"}, check: deleteFinished},
		{name: "profile", flag: []string{"-profile", "ig"}, check: deleteFinished},
		{name: "manifest", flag: []string{"-manifest", "stu4"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			resp, body := c.do(http.MethodGet, c.base+"/$export?_type=Patient", "", "Prefer", "respond-async")
			if flagged {
				require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode, "%s", body)
			} else {
				require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
			}
			resp, body = c.do(http.MethodPost, c.base+"/$export",
				`{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"}]}`,
				"Prefer", "respond-async", "Content-Type", "application/fhir+json")
			require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
			resp, body = c.wait(resp.Header.Get("Content-Location"))
			require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
			var m map[string]any
			require.NoError(t, json.Unmarshal(body, &m))
			if flagged {
				require.Equal(t, fhirbulk.ManifestTypeURL, m["manifestType"])
				require.NotContains(t, m, "request")
			} else {
				require.NotContains(t, m, "manifestType")
				require.Contains(t, m, "request")
				require.Contains(t, m, "error")
			}
		}},
		{name: "status-url", flag: []string{"-status-url", "path"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			status := c.kickoff("_type=Patient")
			if flagged {
				require.Regexp(t, `/\$export-poll-status/[A-Za-z0-9]+$`, status)
			} else {
				require.Contains(t, status, "/$export-poll-status?_jobId=")
			}
			resp, body := c.wait(status)
			require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
		}},
		{name: "signing-key", flag: []string{"-signing-key", testKeyHex}, common: []string{"-clients", "alice=tok"},
			check: func(t *testing.T, c *fhirClient, flagged bool) {
				_, _, m := c.export("_type=Patient")
				require.Equal(t, !flagged, m.RequiresAccessToken)
				require.NotEmpty(t, m.Output)
				anon := &fhirClient{t: t, base: c.base}
				for _, f := range m.Output {
					resp, body := anon.do(http.MethodGet, f.URL, "")
					if flagged {
						require.Contains(t, f.URL, "sig=")
						require.Contains(t, f.URL, "kid=k1")
						require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
					} else {
						require.NotContains(t, f.URL, "sig=")
						require.Equal(t, http.StatusUnauthorized, resp.StatusCode, "%s", body)
					}
				}
			}},
		{name: "signed-url-expiry", flag: []string{"-signed-url-expiry", "2h"}, common: []string{"-signing-key", testKeyHex},
			check: func(t *testing.T, c *fhirClient, flagged bool) {
				_, _, m := c.export("_type=Patient")
				require.NotEmpty(t, m.Output)
				u, err := url.Parse(m.Output[0].URL)
				require.NoError(t, err)
				exp, err := strconv.ParseInt(u.Query().Get("exp"), 10, 64)
				require.NoError(t, err, u)
				left := time.Until(time.Unix(exp, 0))
				if flagged {
					require.Greater(t, left, time.Hour)
				} else {
					require.Less(t, left, 10*time.Minute)
				}
			}},
		{name: "poll-limit", flag: []string{"-poll-limit", "1/0.1"}, common: slow, check: func(t *testing.T, c *fhirClient, flagged bool) {
			status := c.kickoff("_type=Patient")
			resp, body := c.do(http.MethodGet, status, "")
			require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
			resp, body = c.do(http.MethodGet, status, "")
			if flagged {
				require.Equal(t, http.StatusTooManyRequests, resp.StatusCode, "%s", body)
				require.NotEmpty(t, resp.Header.Get("Retry-After"))
				requireOutcome(t, body)
			} else {
				require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
			}
		}},
		{name: "max-active-jobs", flag: []string{"-max-active-jobs", "1"}, common: slow, check: func(t *testing.T, c *fhirClient, flagged bool) {
			c.kickoff("_type=Patient")
			resp, body := c.do(http.MethodGet, c.base+"/$export?_type=Observation", "", "Prefer", "respond-async")
			if flagged {
				require.Equal(t, http.StatusTooManyRequests, resp.StatusCode, "%s", body)
				require.NotEmpty(t, resp.Header.Get("Retry-After"))
			} else {
				require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
			}
		}},
		{name: "max-finished-jobs", flag: []string{"-max-finished-jobs", "1"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			first, _, _ := c.export("_type=Patient")
			c.export("_type=Observation")
			c.export("_type=Encounter")
			resp, body := c.do(http.MethodGet, first, "")
			if flagged {
				require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s", body)
			} else {
				require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
			}
		}},
		{name: "reuse-in-flight", flag: []string{"-reuse-in-flight"}, common: slow, check: func(t *testing.T, c *fhirClient, flagged bool) {
			a, b := c.kickoff("_type=Patient"), c.kickoff("_type=Patient")
			if flagged {
				require.Equal(t, a, b)
			} else {
				require.NotEqual(t, a, b)
			}
		}},
		{name: "allow-missing-respond-async", flag: []string{"-allow-missing-respond-async"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			resp, body := c.do(http.MethodGet, c.base+"/$export?_type=Patient", "")
			if flagged {
				require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
				resp, body = c.wait(resp.Header.Get("Content-Location"))
				require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
			} else {
				require.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s", body)
			}
		}},
		{name: "disable-separate-export-status", flag: []string{"-disable-separate-export-status"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			resp, body := c.do(http.MethodGet, c.base+"/$export?_type=Patient", "", "Prefer", "respond-async, separate-export-status")
			require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
			if flagged {
				require.NotContains(t, resp.Header.Get("Preference-Applied"), "separate-export-status")
			} else {
				require.Contains(t, resp.Header.Get("Preference-Applied"), "separate-export-status")
			}
		}},
		{name: "retry-after", flag: []string{"-retry-after", "120s"}, common: slow, check: func(t *testing.T, c *fhirClient, flagged bool) {
			resp, body := c.do(http.MethodGet, c.kickoff("_type=Patient"), "")
			require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
			if flagged {
				require.Equal(t, "120", resp.Header.Get("Retry-After"))
			} else {
				require.NotEqual(t, "120", resp.Header.Get("Retry-After"))
				require.NotEmpty(t, resp.Header.Get("Retry-After"))
			}
		}},
		{name: "cancelled-retention", flag: []string{"-cancelled-retention", "1ms"}, common: slow, check: func(t *testing.T, c *fhirClient, flagged bool) {
			status := c.kickoff("_type=Patient")
			resp, body := c.do(http.MethodDelete, status, "")
			require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
			time.Sleep(5 * time.Millisecond) // past the 1ms
			resp, body = c.do(http.MethodGet, status, "")
			require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s", body)
			if flagged {
				require.NotContains(t, string(body), "cancelled")
			} else {
				require.Contains(t, string(body), "cancelled")
			}
		}},
		{name: "manifest-page-size", flag: []string{"-manifest-page-size", "1"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			_, _, m := c.export("_type=Patient,Observation&allowPartialManifests=true")
			if flagged {
				require.Len(t, m.Output, 1)
				require.NotEmpty(t, m.Link)
			} else {
				require.Len(t, m.Output, 2)
				require.Empty(t, m.Link)
			}
		}},
		{name: "max-body-bytes", flag: []string{"-max-body-bytes", "100"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			body := `{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"},` +
				`{"name":"_type","valueString":"Observation"}]}`
			require.Greater(t, len(body), 100)
			resp, b := c.do(http.MethodPost, c.base+"/$export", body, "Prefer", "respond-async", "Content-Type", "application/fhir+json")
			if flagged {
				require.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode, "%s", b)
			} else {
				require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", b)
			}
		}},
		{name: "max-param-length", flag: []string{"-max-param-length", "10"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			resp, body := c.do(http.MethodGet, c.base+"/$export?_type=Patient,Observation", "", "Prefer", "respond-async")
			if flagged {
				require.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s", body)
				requireOutcome(t, body)
			} else {
				require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
			}
		}},
		{name: "max-param-values", flag: []string{"-max-param-values", "1"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			resp, body := c.do(http.MethodGet, c.base+"/$export?_type=Patient&_type=Observation", "", "Prefer", "respond-async")
			if flagged {
				require.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s", body)
				requireOutcome(t, body)
			} else {
				require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
			}
		}},
		{name: "retention", flag: []string{"-retention", "1h"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			_, resp, _ := c.export("_type=Patient")
			exp, err := http.ParseTime(resp.Header.Get("Expires"))
			require.NoError(t, err)
			if flagged {
				require.Less(t, time.Until(exp), 2*time.Hour)
			} else {
				require.Greater(t, time.Until(exp), 20*time.Hour)
			}
		}},
		{name: "max-file-resources", flag: []string{"-max-file-resources", "4"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			_, _, m := c.export("_type=Patient")
			if flagged {
				require.Len(t, m.Output, 3) // 10 patients: 4, 4, 2
			} else {
				require.Len(t, m.Output, 1)
			}
		}},
		{name: "max-file-bytes", flag: []string{"-max-file-bytes", "1000"}, check: func(t *testing.T, c *fhirClient, flagged bool) {
			_, _, m := c.export("_type=Patient")
			if flagged {
				require.Greater(t, len(m.Output), 1)
			} else {
				require.Len(t, m.Output, 1)
			}
		}},
		{name: "max-files-per-job", flag: []string{"-max-files-per-job", "1"}, common: []string{"-max-file-resources", "4"},
			check: func(t *testing.T, c *fhirClient, flagged bool) {
				resp, body := c.wait(c.kickoff("_type=Patient"))
				if flagged {
					require.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode, "%s", body)
					requireOutcome(t, body)
				} else {
					require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
				}
			}},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			t.Parallel()
			for _, flagged := range []bool{false, true} {
				args := []string{"-store", "memory", "-storage", "dir:" + t.TempDir(), "-patients", "10"}
				args = append(args, row.common...)
				if flagged {
					args = append(args, row.flag...)
				}
				base, stop := startRun(t, args...)
				c := &fhirClient{t: t, base: base}
				if slices.Contains(args, "-clients") {
					c.token = "tok"
				}
				row.check(t, c, flagged)
				stop()
			}
		})
	}
}

// TestProfileIGConformance mimics a conformance kit (Inferno's bulk data
// test kit) against -profile ig: it kicks off, waits until the export has
// finished, and DELETEs it at once: 202; then the status URL and every
// file are gone (404 with an OperationOutcome).
func TestProfileIGConformance(t *testing.T) {
	t.Parallel()
	base, stop := startRun(t, "-profile", "ig", "-store", "memory", "-storage", "dir:"+t.TempDir(), "-patients", "5",
		"-clients", "inferno=tok")
	c := &fhirClient{t: t, base: base, token: "tok"}
	resp, body := c.do(http.MethodGet, base+"/$export", "", "Prefer", "respond-async", "Accept", "application/fhir+json")
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
	status := resp.Header.Get("Content-Location")
	resp, body = c.wait(status)
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.NotEmpty(t, m.Output)
	for _, f := range m.Output { // the files are there before the DELETE
		resp, body := c.do(http.MethodGet, f.URL, "")
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	}

	resp, body = c.do(http.MethodDelete, status, "")
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
	requireOutcome(t, body)

	resp, body = c.do(http.MethodGet, status, "")
	require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s", body)
	requireOutcome(t, body)
	for _, f := range append(m.Output, m.Error...) {
		resp, body := c.do(http.MethodGet, f.URL, "")
		require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s: %s", f.URL, body)
	}

	// The kit's own order: DELETE right after the kick-off, whether the
	// export is still running (it is cancelled) or has already finished
	// (it is removed): 202 either way, then 404.
	for range 5 {
		status := c.kickoff("_type=Patient")
		resp, body := c.do(http.MethodDelete, status, "")
		require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
		resp, body = c.do(http.MethodGet, status, "")
		require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s", body)
		requireOutcome(t, body)
	}
	stop()
}

// TestEveryFlagDocumented: every flag -h lists has a row in the README's
// flag table, and every row names a flag -h lists.
func TestEveryFlagDocumented(t *testing.T) {
	t.Parallel()
	var usage bytes.Buffer
	_, err := parseFlags([]string{"-h"}, &usage)
	require.ErrorIs(t, err, flag.ErrHelp)
	listed := map[string]bool{}
	for _, line := range strings.Split(usage.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "  -"); ok {
			name, _, _ := strings.Cut(rest, " ")
			listed[name] = true
		}
	}
	require.Contains(t, listed, "profile")
	readme, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	require.NoError(t, err)
	table := map[string]bool{}
	for _, line := range strings.Split(string(readme), "\n") {
		if rest, ok := strings.CutPrefix(line, "| `-"); ok {
			name, _, _ := strings.Cut(rest, "`")
			table[name] = true
		}
	}
	require.Equal(t, listed, table)
}
