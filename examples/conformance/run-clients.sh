#!/usr/bin/env bash
# Runs the SMART bulk-data-client and Google's bulk_fhir_fetch against the
# example server on 127.0.0.1, at system, Patient and Group level, with and
# without bearer tokens, and prints what each run downloaded.
# docs/conformance.md §4 explains the commands and the results.
#
# Point it at clients you have already installed:
#   SMART_CLIENT_DIR  a checkout of smart-on-fhir/bulk-data-client after `npm ci`
#   SMART_NODE        a Node 15–18 binary (default: node); the client hangs up silently on Node 20
#   BULK_FHIR_FETCH   a built cmd/bulk_fhir_fetch from google/bulk_fhir_tools
# Either client may be left unset; its runs are then skipped.
# Optional: PORT_BASE (default 18180), PATIENTS (default 50), OUT (default: a new temp dir).
set -euo pipefail
cd "$(dirname "$0")/../.."

PORT_BASE=${PORT_BASE:-18180}
PATIENTS=${PATIENTS:-50}
OUT=${OUT:-$(mktemp -d /tmp/bulkexport-conformance.XXXXXX)}
SMART_NODE=${SMART_NODE:-node}
OPEN=127.0.0.1:$((PORT_BASE + 1))
AUTH=127.0.0.1:$((PORT_BASE + 2))
STUB=127.0.0.1:$((PORT_BASE + 10))
TOKEN=s3cret
mkdir -p "$OUT"
echo "output under $OUT"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

(cd examples && go build -o "$OUT/example-server" ./server)
start_server() { # addr, extra flags...
	local addr=$1; shift
	mkdir -p "$OUT/srv-$addr"
	timeout 1800 "$OUT/example-server" -addr "$addr" -store memory -patients "$PATIENTS" \
		-storage "dir:$OUT/srv-$addr/data" "$@" >"$OUT/srv-$addr/log" 2>&1 &
	pids+=($!)
}
start_server "$OPEN"
start_server "$AUTH" -clients "alice=$TOKEN"
timeout 1800 python3 examples/conformance/token-stub.py "$STUB" "$TOKEN" >"$OUT/token-stub.log" 2>&1 &
pids+=($!)
for a in "$OPEN" "$AUTH"; do
	for _ in $(seq 50); do curl -sf -o /dev/null "http://$a/fhir/metadata" && break; sleep 0.2; done
done

count() { # dir: resources per type over every .ndjson file but the client's log
	python3 - "$1" <<'EOF'
import collections, glob, json, os, sys
c = collections.Counter()
for f in glob.glob(os.path.join(sys.argv[1], "*.ndjson")):
    if os.path.basename(f) == "log.ndjson":
        continue
    for line in open(f):
        if line.strip():
            c[json.loads(line)["resourceType"]] += 1
print("   ", dict(sorted(c.items())), "total", sum(c.values()))
EOF
}

run() { # name, dir, command...
	local name=$1 dir=$2; shift 2
	mkdir -p "$dir"
	local rc=0
	timeout 180 "$@" </dev/null >"$dir.log" 2>&1 || rc=$?
	echo "$name: exit $rc, $(find "$dir" -name '*.ndjson' ! -name log.ndjson | wc -l) files"
	count "$dir"
}

if [ -n "${SMART_CLIENT_DIR:-}" ]; then
	cfg=$(cd examples/conformance && pwd)/smart-static-token.js
	export AUTO_RETRY_TRANSIENT_ERRORS=1 SHOW_ERRORS=1
	for mode in open auth; do
		if [ $mode = open ]; then base=http://$OPEN/fhir; extra=(); else base=http://$AUTH/fhir; extra=(--config "$cfg"); fi
		for level in system patient group; do
			case $level in system) lv=(--global) ;; patient) lv=() ;; group) lv=(-g cohort-3) ;; esac
			d=$OUT/smart-$mode-$level
			run "smart $mode $level" "$d" \
				bash -c 'cd "$0" && exec "$@"' "$SMART_CLIENT_DIR" "$SMART_NODE" . "${extra[@]}" -f "$base" "${lv[@]}" --reporter text -d "$d"
		done
	done
fi

if [ -n "${BULK_FHIR_FETCH:-}" ]; then
	for mode in open auth; do
		if [ $mode = open ]; then base=http://$OPEN/fhir; else base=http://$AUTH/fhir; fi
		for level in patient group; do
			grp=(); [ $level = group ] && grp=(-group_id cohort-3)
			d=$OUT/bff-$mode-$level
			run "bulk_fhir_fetch $mode $level" "$d" \
				"$BULK_FHIR_FETCH" -client_id alice -client_secret "$TOKEN" \
				-fhir_auth_url "http://$STUB/token" -fhir_server_base_url "$base" "${grp[@]}" -output_dir "$d"
		done
	done
fi
