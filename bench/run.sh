#!/usr/bin/env bash
# Runs the comparative benchmarks and prints each one's ratio against its
# baseline, measured in the same run. Usage: bench/run.sh [count]
#
#   poll         poll-status GET vs a bare handler answering a constant 202
#   poll+metrics the same, with and without an OpenTelemetry SDK meter
#   export       whole export (Worker → DirStorage) vs bufio.Writer to files
#   memory       peak heap exporting 100k vs 1M resources
#   download     file endpoint vs http.ServeFile of the same file
#   dirstorage   DirStorage writes vs bufio.Writer + fsync
#   kickoff      kick-off with 5,000 expired finished jobs of the client
#                waiting for the purge vs with none
#   pgstore      poll-status over pgstore vs a raw pgx SELECT; Claim with
#                10,000 queued jobs (needs BULKEXPORT_TEST_POSTGRES_URL;
#                `source .ci/postgres.sh` provides one)
#   scaleout     one partitioned job on 1, 2, 4 and 8 worker processes
#                sharing pgstore, over a Source with a fixed latency per
#                page: speedup-N and efficiency-N against one worker
#                (needs BULKEXPORT_TEST_POSTGRES_URL)
set -euo pipefail
cd "$(dirname "$0")/.."
count="${1:-3}"
out=$(mktemp)
trap 'rm -f "$out"' EXIT

run() { # package bench-regexp benchtime
	go test -run '^$' -bench "$2" -benchtime "$3" -count "$count" "$1" 2>&1 | tee -a "$out" | grep -E '^(Benchmark|ok|FAIL|---)' || true
}

run . 'BenchmarkPollStatusRatio$' 10000x
run ./examples/observability 'BenchmarkPollStatusRatioMetrics$' 10000x
run . 'BenchmarkExportThroughput$' 3x
run . 'BenchmarkExportMemory$' 1x
run . 'BenchmarkDownload$' 20x
run . 'BenchmarkDirStorageWrite$' 10x
run . 'BenchmarkKickoffFinishedBacklog$' 400x
if [ -n "${BULKEXPORT_TEST_POSTGRES_URL:-}" ]; then
	run ./pgstore 'BenchmarkPollStatus$|BenchmarkClaim$' 2s
	run ./examples/scaleout 'BenchmarkScaleOut$' 1x
fi

echo
echo "== ratios (baseline ÷ ours unless the unit says otherwise) and peak heap, one value per run"
awk '
	/^Benchmark/ {
		name=$1; sub(/-[0-9]+$/, "", name)
		for (i = 2; i < NF; i++) {
			u = $(i+1)
			if (u ~ /ratio/ || u ~ /-poll\/|store\/raw/ || u ~ /^(speedup|efficiency)-/ || u == "peak-MiB") {
				key = name " " u
				vals[key] = vals[key] " " $i
			}
		}
	}
	END { for (k in vals) printf "%-72s %s\n", k, vals[k] }
' "$out" | sort
