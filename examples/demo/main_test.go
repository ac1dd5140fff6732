package main

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

func TestDemo(t *testing.T) {
	t.Parallel()
	for _, level := range []fhirbulk.Level{fhirbulk.LevelSystem, fhirbulk.LevelPatient, fhirbulk.LevelGroup} {
		t.Run(string(level), func(t *testing.T) {
			t.Parallel()
			var stdout, stderr bytes.Buffer
			res, err := demo(context.Background(), config{patients: 20, level: level}, &stdout, &stderr)
			require.NoError(t, err, stderr.String())

			tx, err := fhirbulk.ParseInstant(res.manifest.TransactionTime)
			require.NoError(t, err)
			q := &bulkexport.Query{Level: level, TransactionTime: tx}
			if level == fhirbulk.LevelGroup {
				q.GroupID = "all"
				require.True(t, strings.HasSuffix(res.manifest.Request, "/Group/all/$export"), res.manifest.Request)
			}
			ds := dataset.New(20)
			types, err := ds.ResourceTypes(context.Background(), level)
			require.NoError(t, err)
			got := map[string]int64{}
			for _, f := range res.files {
				require.Equal(t, "output", f.kind)
				require.Positive(t, f.bytes)
				got[f.typ] += f.count
			}
			require.Len(t, got, len(types))
			for _, typ := range types {
				want, err := ds.Count(context.Background(), q, typ)
				require.NoError(t, err)
				require.Equal(t, want, got[typ], typ)
			}

			out := stdout.String()
			require.True(t, strings.HasPrefix(out, "Manifest:\n{\n  \"transactionTime\""), out)
			require.Contains(t, out, "TYPE")
			require.Contains(t, out, "COUNT")
			require.Contains(t, out, "BYTES")
			require.Contains(t, out, "Patient.000001.c2.ndjson")
			require.Regexp(t, `(?m)^Patient +20 +\d+ +Patient\.000001\.c\d+\.ndjson$`, out)
			require.Regexp(t, `(?m)^TOTAL +\d+ +\d+ +\d+ files$`, out)
			require.Contains(t, stderr.String(), "kick-off: 202 Accepted")
		})
	}
}

func TestRun(t *testing.T) {
	t.Parallel()
	var stdout bytes.Buffer
	require.NoError(t, run(context.Background(), []string{"-patients", "3", "-level", "group"}, &stdout, io.Discard))
	require.Contains(t, stdout.String(), "TOTAL")

	for _, args := range [][]string{{"-level", "world"}, {"-patients", "-2"}, {"-x"}, {"extra"}} {
		var stderr bytes.Buffer
		err := run(context.Background(), args, io.Discard, &stderr)
		require.ErrorIs(t, err, errUsage, "%v", args)
		require.NotEmpty(t, stderr.String())
	}
}

func TestCancelledDemo(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := demo(ctx, config{patients: 5, level: fhirbulk.LevelSystem}, io.Discard, io.Discard)
	require.ErrorIs(t, err, context.Canceled)
}
