# shellcheck shell=bash
# Provisions a throwaway PostgreSQL server for the pgstore tests. Source it
# (do not run it) from bash, then stop the server when done:
#
#	source .ci/postgres.sh
#	trap bulkexport_pg_stop EXIT
#	go test -race ./pgstore/...
#
# It exports BULKEXPORT_TEST_POSTGRES_URL, e.g.
# postgres://postgres@127.0.0.1:55432/bulkexport_test?sslmode=disable.
#
# What it does:
#   - If BULKEXPORT_TEST_POSTGRES_URL is already set and answers, nothing.
#   - Finds the server binaries (/usr/lib/postgresql/*/bin, newest version
#     first, else initdb/pg_ctl on PATH). When there are none and we are
#     root, installs Debian's postgresql package (apt-get, non-interactive,
#     without starting the packaged cluster).
#   - initdb's a cluster in a new temporary directory owned by the postgres
#     system user (created if missing; PostgreSQL refuses to run as root),
#     with trust authentication, listening on 127.0.0.1 only, on the first
#     free port from BULKEXPORT_PG_PORT (default 55432), its unix socket in
#     the temporary directory, and fsync off (the data is disposable).
#   - Creates the database bulkexport_test.
#
# bulkexport_pg_stop stops that server and removes its directory. It is
# safe to call more than once, and does nothing for a URL it did not make.
# Works as root (CI) or as an ordinary user (who must have PostgreSQL
# installed already). Safe under set -euo pipefail.

_bulkexport_pg_log() { echo "postgres.sh: $*" >&2; }

# Runs a command as the postgres user when we are root.
_bulkexport_pg_as() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# Prints the directory holding initdb, pg_ctl and postgres, or fails.
_bulkexport_pg_bindir() {
	local d f
	for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k5,5Vr); do
		if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
			echo "$d"
			return 0
		fi
	done
	if f=$(command -v initdb 2>/dev/null); then
		d=$(dirname "$(readlink -f "$f")")
		if [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
			echo "$d"
			return 0
		fi
	fi
	return 1
}

# Installs Debian's PostgreSQL server without starting its default cluster.
_bulkexport_pg_install() {
	if [ "$(id -u)" -ne 0 ]; then
		_bulkexport_pg_log "no PostgreSQL server found, and only root may install one"
		return 1
	fi
	_bulkexport_pg_log "installing PostgreSQL from Debian's packages"
	# Keep the package's scripts from starting its cluster: invoke-rc.d
	# asks policy-rc.d, and 101 means "not allowed".
	local policy=/usr/sbin/policy-rc.d ours=0 rc=0 try
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
	fi
	for try in 1 2 3; do
		if DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null; then
			rc=0
			break
		fi
		rc=1
		_bulkexport_pg_log "apt-get update failed (try $try)"
		sleep 5
	done
	if [ "$rc" -eq 0 ]; then
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
			postgresql </dev/null || rc=$?
	fi
	if [ "$ours" -eq 1 ]; then
		rm -f "$policy"
	fi
	return "$rc"
}

# Succeeds when the URL answers a query.
_bulkexport_pg_reachable() {
	local url=$1 psql=${2:-}
	[ -n "$url" ] || return 1
	if [ -z "$psql" ]; then
		psql=$(command -v psql 2>/dev/null) || return 1
	fi
	PGCONNECT_TIMEOUT=5 "$psql" "$url" -Atqc 'SELECT 1' >/dev/null 2>&1
}

# Succeeds when something listens on 127.0.0.1:$1.
_bulkexport_pg_port_busy() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

_bulkexport_pg_start() {
	local bin dir port last url psql i

	if [ -n "${BULKEXPORT_TEST_POSTGRES_URL:-}" ] && _bulkexport_pg_reachable "$BULKEXPORT_TEST_POSTGRES_URL"; then
		_bulkexport_pg_log "using BULKEXPORT_TEST_POSTGRES_URL as set"
		return 0
	fi

	if ! bin=$(_bulkexport_pg_bindir); then
		_bulkexport_pg_install || { _bulkexport_pg_log "installing PostgreSQL failed"; return 1; }
		bin=$(_bulkexport_pg_bindir) || { _bulkexport_pg_log "no PostgreSQL server binaries after installing"; return 1; }
	fi
	psql="$bin/psql"
	[ -x "$psql" ] || psql=$(command -v psql 2>/dev/null) || psql=""
	if [ -n "${BULKEXPORT_TEST_POSTGRES_URL:-}" ] && [ -n "$psql" ] &&
		_bulkexport_pg_reachable "$BULKEXPORT_TEST_POSTGRES_URL" "$psql"; then
		_bulkexport_pg_log "using BULKEXPORT_TEST_POSTGRES_URL as set"
		return 0
	fi

	if [ "$(id -u)" -eq 0 ] && ! id -u postgres >/dev/null 2>&1; then
		useradd --system --user-group --no-create-home --home-dir /var/lib/postgresql \
			--shell /bin/sh postgres || { _bulkexport_pg_log "cannot create the postgres user"; return 1; }
	fi

	dir=$(mktemp -d /tmp/bulkexport-pg.XXXXXX) || return 1
	if [ "$(id -u)" -eq 0 ]; then
		chown postgres: "$dir" || { rm -rf "$dir"; return 1; }
	fi
	chmod 700 "$dir"

	# From inside $dir: the postgres user may not be able to read the
	# caller's working directory.
	if ! (cd "$dir" && _bulkexport_pg_as "$bin/initdb" -D "$dir/data" -U postgres -A trust \
		-E UTF8 --no-locale --no-sync >"$dir/initdb.log" 2>&1); then
		_bulkexport_pg_log "initdb failed:"
		cat "$dir/initdb.log" >&2 || true
		rm -rf "$dir"
		return 1
	fi

	port=${BULKEXPORT_PG_PORT:-55432}
	last=$((port + 100))
	while _bulkexport_pg_port_busy "$port"; do
		port=$((port + 1))
		if [ "$port" -gt "$last" ]; then
			_bulkexport_pg_log "no free port up to $last"
			rm -rf "$dir"
			return 1
		fi
	done

	if ! (cd "$dir" && _bulkexport_pg_as "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 120 \
		-o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
		start >/dev/null); then
		_bulkexport_pg_log "the server did not start:"
		cat "$dir/server.log" >&2 2>/dev/null || true
		(cd "$dir" && _bulkexport_pg_as "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1) || true
		rm -rf "$dir"
		return 1
	fi
	# From here on bulkexport_pg_stop can clean up.
	export BULKEXPORT_PG_DIR="$dir" BULKEXPORT_PG_BIN="$bin"

	for i in $(seq 1 60); do
		if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres 2>/dev/null; then
			break
		fi
		if [ "$i" -eq 60 ]; then
			_bulkexport_pg_log "the server does not answer on 127.0.0.1:$port"
			bulkexport_pg_stop
			return 1
		fi
		sleep 0.5
	done

	if ! "$psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atqc 'CREATE DATABASE bulkexport_test' >/dev/null; then
		_bulkexport_pg_log "CREATE DATABASE failed"
		bulkexport_pg_stop
		return 1
	fi

	url="postgres://postgres@127.0.0.1:$port/bulkexport_test?sslmode=disable"
	export BULKEXPORT_TEST_POSTGRES_URL="$url"
	_bulkexport_pg_log "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') in $dir; BULKEXPORT_TEST_POSTGRES_URL=$url"
	return 0
}

# bulkexport_pg_stop stops the server that sourcing this file started and
# removes its directory. It always succeeds, so that it suits a trap.
bulkexport_pg_stop() {
	local dir=${BULKEXPORT_PG_DIR:-} bin=${BULKEXPORT_PG_BIN:-}
	if [ -z "$dir" ]; then
		return 0
	fi
	if [ -n "$bin" ] && [ -f "$dir/data/postmaster.pid" ]; then
		(cd "$dir" && _bulkexport_pg_as "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1) ||
			(cd "$dir" && _bulkexport_pg_as "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1) || true
	fi
	case "$dir" in
	/tmp/bulkexport-pg.*) rm -rf "$dir" ;;
	esac
	unset BULKEXPORT_PG_DIR BULKEXPORT_PG_BIN BULKEXPORT_TEST_POSTGRES_URL
	return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	echo "postgres.sh: source this file from bash; do not run it" >&2
	exit 2
fi
_bulkexport_pg_start
