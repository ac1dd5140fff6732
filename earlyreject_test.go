package bulkexport_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// TestEarlyRejectionDoesNotWaitForBody: a request rejected before its body
// is read (no token, no Prefer, a wrong Content-Type, a wrong method) is
// answered while the client is still sending that body, and the server
// then closes the connection. Without "Connection: close" net/http would
// first drain the body, so a client sending it slowly, even without a
// token, would hold the connection open as long as it liked.
//
// The client below sends the headers and a few bytes of a 1000-byte body,
// and reads the answer before sending any more. The deadline only turns a
// hang into a failure; nothing is timed.
func TestEarlyRejectionDoesNotWaitForBody(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		NoWorker: true,
		Handler:  bulkexport.Options{Authenticate: tokenAuth(map[string]string{"tok": "alice"})},
	})
	host := strings.TrimPrefix(srv.URL, "http://")

	for _, tc := range []struct {
		name, method, path, headers string
		status                      int
	}{
		{"no token", "POST", "/fhir/$export", "Prefer: respond-async\r\nContent-Type: application/fhir+json\r\n", http.StatusUnauthorized},
		{"bad token", "POST", "/fhir/Patient/$export", "Authorization: Bearer nope\r\nPrefer: respond-async\r\n", http.StatusUnauthorized},
		{"no token, status", "POST", "/fhir/$export-poll-status", "", http.StatusUnauthorized},
		{"no Prefer", "POST", "/fhir/$export", "Authorization: Bearer tok\r\n", http.StatusBadRequest},
		{"wrong Content-Type", "POST", "/fhir/$export", "Authorization: Bearer tok\r\nPrefer: respond-async\r\nContent-Type: text/plain\r\n", http.StatusUnsupportedMediaType},
		{"wrong method", "PUT", "/fhir/$export", "Authorization: Bearer tok\r\n", http.StatusMethodNotAllowed},
		{"no endpoint", "POST", "/fhir/elsewhere", "Authorization: Bearer tok\r\n", http.StatusNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			conn, err := net.Dial("tcp", host)
			require.NoError(t, err)
			defer conn.Close()
			require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
			_, err = io.WriteString(conn, tc.method+" "+tc.path+" HTTP/1.1\r\nHost: "+host+"\r\n"+tc.headers+
				"Content-Length: 1000\r\n\r\n"+`{"resourceType":"Par`)
			require.NoError(t, err)

			br := bufio.NewReader(conn)
			resp, err := http.ReadResponse(br, nil)
			require.NoError(t, err, "the answer comes while the body is still pending")
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, tc.status, resp.StatusCode, "%s", body)
			require.Equal(t, "application/fhir+json", resp.Header.Get("Content-Type"))
			var oo fhirbulk.OperationOutcome
			require.NoError(t, json.Unmarshal(body, &oo))
			require.Equal(t, "OperationOutcome", oo.ResourceType)
			require.True(t, resp.Close, "Connection: close")

			// The server ends the connection rather than wait for the rest.
			_, err = br.ReadByte()
			require.True(t, errors.Is(err, io.EOF) || isConnReset(err), "connection closed: %v", err)
		})
	}

	// A client that sends its whole body at once, without a token, reads
	// its 401 as usual: the close does not reset the connection under it.
	t.Run("no token, whole body", func(t *testing.T) {
		t.Parallel()
		conn, err := net.Dial("tcp", host)
		require.NoError(t, err)
		defer conn.Close()
		require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
		body := `{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"` + strings.Repeat("x", 64<<10) + `"}]}`
		_, err = io.WriteString(conn, "POST /fhir/$export HTTP/1.1\r\nHost: "+host+"\r\nPrefer: respond-async\r\n"+
			"Content-Type: application/fhir+json\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n"+body)
		require.NoError(t, err)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		require.NoError(t, err)
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		require.Equal(t, http.StatusUnauthorized, resp.StatusCode, "%s", b)
	})

	// A body that was read to its end leaves the connection open: a
	// second request follows on it.
	t.Run("body read, keep-alive", func(t *testing.T) {
		t.Parallel()
		conn, err := net.Dial("tcp", host)
		require.NoError(t, err)
		defer conn.Close()
		require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
		br := bufio.NewReader(conn)
		const body = `{"resourceType":"Parameters","parameter":[{"name":"nope","valueString":"x"}]}`
		for range 2 {
			_, err = io.WriteString(conn, "POST /fhir/$export HTTP/1.1\r\nHost: "+host+"\r\nAuthorization: Bearer tok\r\nPrefer: respond-async\r\n"+
				"Content-Type: application/fhir+json\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n"+body)
			require.NoError(t, err)
			resp, err := http.ReadResponse(br, nil)
			require.NoError(t, err)
			b, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s", b)
			require.False(t, resp.Close, "the connection stays open")
		}
	})
}

// isConnReset reports whether err is a reset connection, which a closing
// server may cause instead of a clean end of stream.
func isConnReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && strings.Contains(op.Err.Error(), "reset")
}

// TestBodyReadFailures: a kick-off body cut off by the host's read
// deadline gets 408, and one the client breaks off gets 400, each an
// OperationOutcome on a connection that is then closed.
func TestBodyReadFailures(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		NoWorker: true,
		Handler:  bulkexport.Options{Authenticate: tokenAuth(map[string]string{"tok": "alice"})},
	})
	// The host's per-request body deadline, as the example server sets it.
	inner := srv.Config.Handler
	srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		inner.ServeHTTP(w, r)
	})
	host := strings.TrimPrefix(srv.URL, "http://")
	for _, tc := range []struct {
		name     string
		breakOff bool
		status   int
	}{
		{"deadline", false, http.StatusRequestTimeout},
		{"broken off", true, http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			conn, err := net.Dial("tcp", host)
			require.NoError(t, err)
			defer conn.Close()
			require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
			_, err = io.WriteString(conn, "POST /fhir/$export HTTP/1.1\r\nHost: "+host+"\r\nAuthorization: Bearer tok\r\n"+
				"Prefer: respond-async\r\nContent-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{")
			require.NoError(t, err)
			if tc.breakOff {
				require.NoError(t, conn.(*net.TCPConn).CloseWrite())
			}
			br := bufio.NewReader(conn)
			resp, err := http.ReadResponse(br, nil)
			require.NoError(t, err)
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, tc.status, resp.StatusCode, "%s", body)
			require.Contains(t, string(body), `"OperationOutcome"`)
			require.True(t, resp.Close)
		})
	}
}
