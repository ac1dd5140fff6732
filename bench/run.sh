#!/usr/bin/env bash
# Runs the comparative benchmarks and prints each one's ratio against its
# baseline, measured in the same run. Usage: bench/run.sh [count]
#
#   poll       poll-status GET vs a bare handler answering a constant 202
#   export     whole export (Worker → DirStorage) vs bufio.Writer to files
#   memory     peak heap exporting 100k vs 1M resources
#   download   file endpoint vs http.ServeFile of the same file
#   pgstore    poll-status GET over pgstore vs a raw pgx SELECT (needs
#              BULKEXPORT_TEST_POSTGRES_URL)
set -euo pipefail
cd "$(dirname "$0")/.."
count="${1:-3}"
out=$(mktemp)
trap 'rm -f "$out"' EXIT

run() { # module-dir bench-regexp benchtime
	(cd "$1" && go test -run '^$' -bench "$2" -benchtime "$3" -count "$count" . 2>&1) | tee -a "$out" | grep -E '^(Benchmark|ok|FAIL|---)' || true
}

run . 'BenchmarkPollStatus' 2s
run . 'BenchmarkExportThroughput' 3x
run . 'BenchmarkExportMemory' 1x
run . 'BenchmarkDownload' 20x
if [ -n "${BULKEXPORT_TEST_POSTGRES_URL:-}" ] && [ -d pgstore ]; then
	run pgstore 'Benchmark' 2s
fi

echo
echo "== ratios (baseline ÷ ours; 1.0 = no overhead) and peak heap"
awk '
	/^Benchmark/ {
		name=$1; sub(/-[0-9]+$/, "", name)
		for (i = 2; i < NF; i++) {
			if ($(i+1) ~ /^ratio/ || $(i+1) == "peak-MiB") {
				key = name " " $(i+1)
				vals[key] = vals[key] " " $i
			}
		}
	}
	END { for (k in vals) printf "%-60s %s\n", k, vals[k] }
' "$out" | sort
