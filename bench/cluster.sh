#!/usr/bin/env bash
# Several server nodes on PostgreSQL + S3 against the embedded store, in one run (issue #9):
# Store throughput and push latency with 1, 2 and 3 nodes on one database, and the server
# memory (and idle CPU) of 10,000 idle watching connections. See bench/README.md, `cluster`.
#
#   bench/cluster.sh                         # defaults: a few minutes on 2 cores
#   bench/cluster.sh --idle 2000             # fewer idle connections
#   bench/cluster.sh --out /tmp/cluster.md   # also write the results table to a file
#
# Starts the test services (scripts/test-services.sh: PostgreSQL on 127.0.0.1:55432, Garage
# S3 on :53900), and stops them at exit if this script started them (a set that was already
# running is reused and left running). Builds postlog and postlog-bench in release (through
# flock /tmp/postlog-cargo.lock; CARGO_TARGET_DIR is honoured), runs target/release/cluster
# with the remaining options, and prints its markdown table on stdout (progress on stderr).
#
# Options: --no-build, plus every option of the `cluster` binary (--help lists them).
set -euo pipefail
export LC_ALL=C

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BUILD=1
PASS=()
while (($#)); do
    case "$1" in
    --no-build) BUILD=0; shift ;;
    -h | --help)
        sed -n '2,17p' "$0"
        [[ -x $TARGET/release/cluster ]] && "$TARGET/release/cluster" --help
        exit 0
        ;;
    *) PASS+=("$1"); shift ;;
    esac
done

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SERVICES=$REPO/scripts/test-services.sh
SERVICES_DIR=${POSTLOG_SERVICES_DIR:-/tmp/postlog-services}
STARTED=0 BENCH=""
cleanup() {
    local rc=$?
    set +e
    # The benchmark kills its `postlog serve` child and drops its databases on SIGTERM.
    if [[ -n $BENCH ]] && kill -0 "$BENCH" 2>/dev/null; then
        kill -TERM "$BENCH"
        wait "$BENCH"
    fi
    if ((STARTED)); then
        log "stopping the test services this script started"
        "$SERVICES" stop
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ((BUILD)); then
    log "building postlog and postlog-bench (release)"
    (cd "$REPO" && flock /tmp/postlog-cargo.lock cargo build --release --locked -p postlog -p postlog-bench 2>&1 | tail -n 2) >&2
fi
for b in postlog cluster; do
    [[ -x $TARGET/release/$b ]] || die "$TARGET/release/$b missing: build with cargo build --release -p postlog -p postlog-bench"
done

log "starting the test services"
out=$("$SERVICES" start 2>&1) || { printf '%s\n' "$out" >&2; die "scripts/test-services.sh start failed"; }
printf '%s\n' "$out" >&2
grep -q 'already running' <<<"$out" || STARTED=1
# shellcheck disable=SC1091
source "$SERVICES_DIR/env"

VERS="$(cd "$REPO" && git rev-parse --short HEAD)$(cd "$REPO" && git diff --quiet HEAD -- crates bench/src || echo '+dirty')"
log "postlog $VERS; running $TARGET/release/cluster ${PASS[*]:-}"
"$TARGET/release/cluster" --postlog "$TARGET/release/postlog" ${PASS[@]+"${PASS[@]}"} &
BENCH=$!
wait "$BENCH"
BENCH=""
log "done (postlog $VERS, $(date -u +%Y-%m-%d))"
