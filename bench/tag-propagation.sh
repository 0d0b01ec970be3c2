#!/usr/bin/env bash
# Tag propagation through notmuch (issue #4's benchmark), on loopback.
#
#   bench/tag-propagation.sh                     # 10,000 messages, 10,000 tag changes
#   bench/tag-propagation.sh --messages 100000   # also the 100,000-message no-change sync
#
# What it measures:
#   1. initial sync of N messages into notmuch on two replicas A and B (index + tags);
#   2. no-change sync of A (notmuch profile) repeated: wall time including process start,
#      and the notmuch messages it read/wrote (both must be 0);
#   3. N tag changes made in notmuch on A (`notmuch tag +bench -- '*'`, one change per
#      message): `postlog sync` on A (finds them through notmuch's lastmod, sends them),
#      then `postlog sync` on B (applies them to B's notmuch); checked with notmuch count;
#   4. one tag change at a time to a watching client (`postlog sync --watch`, plain Maildir):
#      Tag acknowledged -> the watcher's file renamed (p50/p99), by bench/src/bin/tag_latency.rs.
# It installs notmuch and libnotmuch-dev when missing, builds postlog (--features notmuch)
# and postlog-bench in release, and removes its work directory on exit.
set -euo pipefail
export LC_ALL=C

N=10000 NOOP_RUNS=10 LAT=50 WORKDIR="" KEEP=0 BUILD=1 OUT="" NOOP_ONLY=0
while (($#)); do
    case "$1" in
    --messages) N=$2; shift 2 ;;
    --noop-runs) NOOP_RUNS=$2; shift 2 ;;
    --latency-changes) LAT=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --noop-only) NOOP_ONLY=1; shift ;;
    -h | --help)
        sed -n '2,18p' "$0"
        echo "options: --messages N --noop-runs K --latency-changes M --workdir DIR --out FILE --keep --no-build"
        echo "         --noop-only   only A: import, initial sync into notmuch, no-change syncs (for 100,000)"
        exit 0
        ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
LOCK=/tmp/postlog-cargo.lock
log() { printf '[%s load %s] %s\n' "$(date +%T)" "$(cut -d' ' -f1 /proc/loadavg)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if ! command -v notmuch >/dev/null || ! dpkg -s libnotmuch-dev >/dev/null 2>&1; then
    log "installing notmuch and libnotmuch-dev"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq notmuch libnotmuch-dev >/dev/null
fi
if ((BUILD)); then
    log "building postlog (--features notmuch) and postlog-bench (release)"
    (cd "$REPO" && flock "$LOCK" cargo build --release --locked -p postlog --features postlog/notmuch -p postlog-bench 2>&1 | tail -n 2) >&2
fi
VERS="postlog $(cd "$REPO" && git rev-parse --short HEAD)$(cd "$REPO" && git diff --quiet HEAD -- crates || echo '+dirty')"

if [[ -z $WORKDIR ]]; then WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/postlog-tags.XXXXXX"); else mkdir -p "$WORKDIR"; fi
W=$(cd "$WORKDIR" && pwd)
mkdir -p "$W/bin"
for b in postlog make-corpus tag-latency; do cp "$REPO/target/release/$b" "$W/bin/"; done
BIN=$W/bin
PIDS=()
cleanup() {
    local rc=$?
    set +e
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    if ((KEEP)); then log "kept $W"; else rm -rf "$W"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
# timed CMD...: runs CMD, output to $W/last.out; sets T to the wall seconds.
T=""
timed() {
    local t0=$EPOCHREALTIME
    "$@" >"$W/last.out" 2>&1 || { cat "$W/last.out" >&2; die "failed: $*"; }
    T=$(secs "$t0" "$EPOCHREALTIME")
}

# ---------------------------------------------------------------- server, devices, corpus
log "writing $N messages"
"$BIN/make-corpus" --messages "$N" --out "$W/corpus" >/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN/postlog" serve --data "$W/server" --listen "127.0.0.1:$PORT" 2>"$W/server.log" &
PIDS+=($!)
for _ in $(seq 100); do ss -Hlun "sport = :$PORT" | grep -q . && break; sleep 0.05; done
url() { "$BIN/postlog" account add bench --data "$W/server" --device "$1" --server "127.0.0.1:$PORT" 2>/dev/null | tail -n 1; }
# nm_login NAME: a notmuch database in $W/nm-NAME and a profile in $W/NAME indexing into it.
nm_login() {
    local root=$W/nm-$1
    mkdir -p "$root"
    printf '[database]\npath=%s\n[new]\ntags=\n[maildir]\nsynchronize_flags=true\n' "$root" >"$W/$1.notmuch-config"
    NOTMUCH_CONFIG=$W/$1.notmuch-config notmuch new >/dev/null 2>&1
    NOTMUCH_CONFIG=$W/$1.notmuch-config "$BIN/postlog" login "$(url "$1")" --profile "$W/$1" --notmuch "$root" 2>/dev/null
}
nm() { local who=$1; shift; NOTMUCH_CONFIG=$W/$who.notmuch-config notmuch "$@"; }
pl() { local who=$1; shift; NOTMUCH_CONFIG=$W/$who.notmuch-config "$BIN/postlog" "$@"; }
nm_login A
nm_login B
"$BIN/postlog" login "$(url watch)" --profile "$W/watch" --maildir "$W/watch-mail" 2>/dev/null
"$BIN/postlog" login "$(url tagger)" --profile "$W/tagger" --maildir "$W/tagger-mail" 2>/dev/null

log "importing $N messages"
timed pl A import maildir "$W/corpus" --profile "$W/A" -q
IMPORT=$T
timed pl A sync --profile "$W/A"
SYNC_A=$T
[[ $(nm A count '*') == "$N" ]] || die "A's notmuch holds $(nm A count '*') messages, not $N"
SYNC_B="-"
if ((!NOOP_ONLY)); then
    timed pl B sync --profile "$W/B"
    SYNC_B=$T
    [[ $(nm B count '*') == "$N" ]] || die "B's notmuch holds $(nm B count '*') messages, not $N"
fi
log "initial sync into notmuch: A $SYNC_A s, B $SYNC_B s"

# ---------------------------------------------------------------- no-change sync
ts=()
for _ in $(seq "$NOOP_RUNS"); do
    timed pl A sync --profile "$W/A"
    ts+=("$T")
done
NOOP=$(median "${ts[@]}")
NOOP_WORK=$(grep -o 'notmuch: .*' "$W/last.out" || echo "notmuch: ?")
log "no-change sync: median $NOOP s ($NOOP_WORK)"
if ((NOOP_ONLY)); then
    TABLE=$(printf '| Tag propagation (%s messages, loopback, %s) | result |\n|---|---|\n| import %s messages (A) | %s s |\n| initial sync into notmuch (A) | %s s |\n| no-change sync of A, median of %s, incl. process start | %s s (%s) |\n' \
        "$N" "$VERS" "$N" "$IMPORT" "$SYNC_A" "$NOOP_RUNS" "$NOOP" "$NOOP_WORK")
    echo "$TABLE"
    [[ -z $OUT ]] || echo "$TABLE" >"$OUT"
    exit 0
fi

# ---------------------------------------------------------------- N tag changes
t0=$EPOCHREALTIME
nm A tag +bench-propagation -- '*'
TAGGING=$(secs "$t0" "$EPOCHREALTIME")
timed pl A sync --profile "$W/A"
PUSH_A=$T
timed pl B sync --profile "$W/B"
APPLY_B=$T
GOT=$(nm B count tag:bench-propagation)
[[ $GOT == "$N" ]] || die "B has the tag on $GOT messages, not $N"
TOTAL=$(awk -v a="$PUSH_A" -v b="$APPLY_B" 'BEGIN {printf "%.3f", a + b}')
log "$N tag changes: A sends in $PUSH_A s, B applies in $APPLY_B s"

# ---------------------------------------------------------------- one change to a watcher
"$BIN/postlog" sync --profile "$W/watch" -q
"$BIN/postlog" sync --watch --profile "$W/watch" 2>"$W/watch.log" &
PIDS+=($!)
sleep 1
"$BIN/tag-latency" --tag-profile "$W/tagger" --watch-profile "$W/watch" --changes "$LAT" | tee "$W/latency.out" >&2
LAT_LINE=$(grep '^[0-9]* changes; summary' "$W/latency.out")
p() { sed -n "s/.* $1=\([0-9.-]*\).*/\1/p" <<<"$LAT_LINE"; }

TABLE=$(cat <<EOF
| Tag propagation ($N messages, loopback, $VERS) | result |
|---|---|
| import $N messages (A) | $IMPORT s |
| initial sync into notmuch: A / B | $SYNC_A s / $SYNC_B s |
| no-change sync of A, median of $NOOP_RUNS, incl. process start | $NOOP s ($NOOP_WORK) |
| $N tag changes in notmuch on A (\`notmuch tag\` itself) | $TAGGING s |
| ... \`postlog sync\` on A (find via lastmod, send) | $PUSH_A s |
| ... \`postlog sync\` on B (apply to notmuch) | $APPLY_B s |
| ... A + B, until B has them all | $TOTAL s |
| one change, Tag ack -> watcher's file renamed, p50 / p99 ($LAT changes) | $(p from_ack_p50) / $(p from_ack_p99) ms |
| one change, Tag sent -> watcher's file renamed, p50 / p99 | $(p from_start_p50) / $(p from_start_p99) ms |
EOF
)
echo "$TABLE"
[[ -z $OUT ]] || echo "$TABLE" >"$OUT"
