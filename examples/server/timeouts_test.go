package main

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The tests below talk raw HTTP/1.1 over TCP to a server started as main
// does. Every connection has a 10 s deadline: it only turns a hang into a
// failure, nothing is timed.

// dialServer opens a connection to the server of base URL base.
func dialServer(t *testing.T, base string) (net.Conn, *bufio.Reader) {
	t.Helper()
	host := strings.TrimSuffix(strings.TrimPrefix(base, "http://"), "/fhir")
	conn, err := net.Dial("tcp", host)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
	return conn, bufio.NewReader(conn)
}

// requireServerClosed reads the connection to its end: the server must
// close it (an end of stream or a reset) before the test's deadline.
func requireServerClosed(t *testing.T, br *bufio.Reader) {
	t.Helper()
	_, err := io.Copy(io.Discard, br)
	require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the server left the connection open: %v", err)
}

// TestSlowBodyCutOff: a kick-off whose body trickles in, a byte every
// 200 ms, does not keep its connection: without a token it gets 401 at
// once (the handler does not wait for the body), with one it gets 408
// when -read-timeout runs out; either way the server then closes the
// connection.
func TestSlowBodyCutOff(t *testing.T) {
	t.Parallel()
	base, stop := startRun(t, "-patients", "1", "-store", "memory", "-storage", "dir:"+t.TempDir(),
		"-clients", "alice=tok", "-read-timeout", "300ms")
	defer stop()
	for _, tc := range []struct {
		name, headers string
		status        int
	}{
		{"no token", "", http.StatusUnauthorized},
		{"bad token", "Authorization: Bearer nope\r\n", http.StatusUnauthorized},
		{"token", "Authorization: Bearer tok\r\n", http.StatusRequestTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, br := dialServer(t, base)
			_, err := io.WriteString(conn, "POST /fhir/$export HTTP/1.1\r\nHost: x\r\nPrefer: respond-async\r\n"+
				"Content-Type: application/fhir+json\r\nContent-Length: 1000\r\n"+tc.headers+"\r\n{")
			require.NoError(t, err)
			// Drip the rest of the body until the server gives up on it
			// (the write fails) or the test ends.
			quit, dripped := make(chan struct{}), make(chan struct{})
			go func() {
				defer close(dripped)
				tick := time.NewTicker(200 * time.Millisecond)
				defer tick.Stop()
				for range 999 {
					select {
					case <-quit:
						return
					case <-tick.C:
					}
					if _, err := conn.Write([]byte(" ")); err != nil {
						return
					}
				}
			}()
			defer func() { close(quit); <-dripped }()

			resp, err := http.ReadResponse(br, nil)
			require.NoError(t, err)
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, tc.status, resp.StatusCode, "%s", body)
			require.Contains(t, string(body), `"OperationOutcome"`)
			require.True(t, resp.Close, "Connection: close")
			requireServerClosed(t, br)
		})
	}
}

// TestIdleConnectionClosed: a keep-alive connection that stays idle is
// closed after -idle-timeout.
func TestIdleConnectionClosed(t *testing.T) {
	t.Parallel()
	base, stop := startRun(t, "-patients", "1", "-store", "memory", "-storage", "dir:"+t.TempDir(), "-idle-timeout", "300ms")
	defer stop()
	conn, br := dialServer(t, base)
	for range 2 { // the connection is kept alive between requests
		_, err := io.WriteString(conn, "GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
		require.NoError(t, err)
		resp, err := http.ReadResponse(br, nil)
		require.NoError(t, err)
		_, err = io.Copy(io.Discard, resp.Body)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.False(t, resp.Close)
	}
	requireServerClosed(t, br)
}

// TestLargeHeaderRejected: headers beyond -max-header-bytes (and the
// 4 KiB net/http adds) get 431.
func TestLargeHeaderRejected(t *testing.T) {
	t.Parallel()
	base, stop := startRun(t, "-patients", "1", "-store", "memory", "-storage", "dir:"+t.TempDir(), "-max-header-bytes", "1024")
	defer stop()
	conn, br := dialServer(t, base)
	_, err := io.WriteString(conn, "GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Padding: "+strings.Repeat("a", 16<<10)+"\r\n\r\n")
	require.NoError(t, err)
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusRequestHeaderFieldsTooLarge, resp.StatusCode)

	// A header block within the limit is served.
	conn, br = dialServer(t, base)
	_, err = io.WriteString(conn, "GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Padding: "+strings.Repeat("a", 512)+"\r\n\r\n")
	require.NoError(t, err)
	resp, err = http.ReadResponse(br, nil)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

// TestDownloadWriteDeadline: -write-timeout bounds every answer but file
// downloads, which have -download-timeout instead. A timeout of 1ns has
// always run out by the time the answer is written, so it makes the
// answers it governs fail, and the others work.
func TestDownloadWriteDeadline(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	args := []string{"-patients", "3", "-store", "sqlite:" + dir + "/jobs.db", "-storage", "dir:" + dir + "/files"}
	get := func(url string) (int, []byte, error) {
		c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
		resp, err := c.Get(url)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return resp.StatusCode, body, err
	}

	// Export with the default limits.
	base, stop := startRun(t, args...)
	_, _, m := (&fhirClient{t: t, base: base}).export("_type=Patient")
	require.NotEmpty(t, m.Output)
	filePath, ok := strings.CutPrefix(m.Output[0].URL, base)
	require.True(t, ok, m.Output[0].URL)
	require.True(t, strings.HasPrefix(filePath, "/bulkfiles/"), filePath)
	stop()

	t.Run("write-timeout", func(t *testing.T) {
		base, stop := startRun(t, append(args, "-write-timeout", "1ns")...)
		defer stop()
		_, _, err := get(base + "/metadata")
		require.Error(t, err, "the answer ran out of time")
		code, body, err := get(base + filePath)
		require.NoError(t, err, "a download has -download-timeout")
		require.Equal(t, http.StatusOK, code, "%s", body)
		require.Equal(t, 3, strings.Count(string(body), `"resourceType":"Patient"`))
	})
	t.Run("download-timeout", func(t *testing.T) {
		base, stop := startRun(t, append(args, "-download-timeout", "1ns")...)
		defer stop()
		code, body, err := get(base + "/metadata")
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, code, "%s", body)
		_, _, err = get(base + filePath)
		require.Error(t, err, "the download ran out of time")
	})
}
