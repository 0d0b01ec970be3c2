#!/usr/bin/env bash
# `postlog import imap` throughput from a private Dovecot on loopback (IMAPS, certificate from
# a private CA passed with --ca-file), into a Postlog server on loopback.
#
#   bench/import-imap.sh                     # 10,000 messages (about 460 MB)
#   bench/import-imap.sh --messages 2000
#
# Runs, each into a fresh account with a fresh profile:
#   1. warm-up import (Dovecot builds its index and reads the mail into the page cache;
#      reported, not the headline);
#   2. timed import of the whole corpus (the headline: messages/s, MB/s);
#   3. the same profile again: nothing new (the cost of a periodic bridge run).
# Needs root (apt, and Dovecot switches to its own users). Installs dovecot-imapd when
# missing, builds postlog and postlog-bench in release (through flock
# /tmp/postlog-cargo.lock), and removes its work directory at exit (--keep keeps it).
set -euo pipefail
export LC_ALL=C

N=10000 SEED=1 WORKDIR="" KEEP=0 BUILD=1
while (($#)); do
    case "$1" in
    --messages) N=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,15p' "$0"; echo "options: --messages N --seed S --workdir DIR --keep --no-build"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[[ $(id -u) == 0 ]] || die "run as root (apt-get, and Dovecot switches to its own users)"

if ! command -v dovecot >/dev/null || ! id dovecot >/dev/null 2>&1; then
    log "installing dovecot-imapd"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-imapd >/dev/null
fi
if ((BUILD)); then
    log "building postlog and postlog-bench (release)"
    (cd "$REPO" && flock /tmp/postlog-cargo.lock cargo build --release --locked -p postlog -p postlog-bench 2>&1 | tail -n 2) >&2
fi

if [[ -z $WORKDIR ]]; then WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/postlog-import-imap.XXXXXX"); else mkdir -p "$WORKDIR"; fi
W=$(cd "$WORKDIR" && pwd)
chmod 755 "$W"
mkdir -p "$W/bin"
for b in postlog make-corpus; do
    [[ -x $REPO/target/release/$b ]] || die "target/release/$b missing: build with cargo build --release -p postlog -p postlog-bench"
    cp "$REPO/target/release/$b" "$W/bin/"
done
BIN=$W/bin
VERS="postlog $(cd "$REPO" && git rev-parse --short HEAD)$(cd "$REPO" && git diff --quiet HEAD -- crates || echo '+dirty')"

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

free_port() {
    python3 -c 'import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1] == "udp" else socket.SOCK_STREAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' "$1"
}
timed() { # OUT CMD...: runs CMD, sets T (wall seconds)
    local out=$1 t0
    shift
    t0=$EPOCHREALTIME
    "$@" >"$out" 2>&1 || { cat "$out" >&2; die "failed: $*"; }
    T=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.3f", b - a}')
}

log "work directory $W; generating $N messages (seed $SEED)"
"$BIN/make-corpus" --seed "$SEED" --messages "$N" --out "$W/corpus" >"$W/corpus.out"
BYTES=$(awk '{print $3}' "$W/corpus.out")

# ------------------------------------------------------------------ Dovecot, IMAPS
DV=$W/dovecot
mkdir -p "$DV/home" "$DV/run" "$DV/state"
cp -a "$W/corpus" "$DV/home/Maildir"
chown -R dovecot:dovecot "$DV/home"
(
    cd "$DV"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -keyout ca.key -out ca.pem -subj /CN=postlog-bench-ca \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout server.key -out server.csr -subj /CN=127.0.0.1
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -out server.pem -extfile ext
) >/dev/null 2>&1 || die "openssl could not make the certificates"
echo "bench:{PLAIN}bench::::::" >"$DV/users"
echo bench >"$W/password"
IMAPS=$(free_port tcp)
cat >"$DV/dovecot.conf" <<EOF
base_dir = $DV/run
state_dir = $DV/state
log_path = $DV/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <$DV/server.pem
ssl_key = <$DV/server.key
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:~/Maildir
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $DV/users
}
userdb {
  driver = static
  args = uid=dovecot gid=dovecot home=$DV/home
}
service imap-login {
  inet_listener imap {
    port = 0
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $IMAPS
    ssl = yes
  }
}
EOF
dovecot -F -c "$DV/dovecot.conf" 2>"$DV/stderr" &
PIDS+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$IMAPS") 2>/dev/null && break; sleep 0.1; done
(exec 3<>"/dev/tcp/127.0.0.1/$IMAPS") 2>/dev/null || { cat "$DV/stderr" "$DV/dovecot.log" >&2; die "Dovecot did not start"; }

# ------------------------------------------------------------------ Postlog server
UDP=$(free_port udp)
"$BIN/postlog" serve --data "$W/server" --listen "127.0.0.1:$UDP" 2>"$W/server.log" &
PIDS+=($!)
for _ in $(seq 100); do ss -Hlun "sport = :$UDP" | grep -q . && break; sleep 0.1; done
ss -Hlun "sport = :$UDP" | grep -q . || { cat "$W/server.log" >&2; die "postlog serve did not start"; }

import() { # PROFILE
    "$BIN/postlog" import imap --profile "$1" --host 127.0.0.1 --port "$IMAPS" --user bench \
        --password-file "$W/password" --ca-file "$DV/ca.pem"
}
declare -A S
for run in warm timed; do
    url=$("$BIN/postlog" account add "$run" --data "$W/server" --server "127.0.0.1:$UDP" 2>/dev/null | tail -n 1)
    "$BIN/postlog" login "$url" --profile "$W/$run" >/dev/null 2>&1
    sync
    log "import ($run)"
    timed "$W/$run.out" import "$W/$run"
    S[$run]=$T
    grep -q "^$N new in 1 folders, $N stored" "$W/$run.out" || { cat "$W/$run.out" >&2; die "$run import did not store $N messages"; }
    log "$run: $(cat "$W/$run.out")"
done
timed "$W/again.out" import "$W/timed"
S[again]=$T
grep -q "^0 new in 1 folders, 0 stored" "$W/again.out" || { cat "$W/again.out" >&2; die "the second run copied something"; }
log "again: $(cat "$W/again.out")"

MB=$(awk -v b="$BYTES" 'BEGIN {printf "%.1f", b / 1e6}')
rate() { awk -v n="$1" -v b="$BYTES" -v t="$2" 'BEGIN {printf "%.0f msg/s, %.0f MB/s", n / t, b / 1e6 / t}'; }
cat <<EOF

### postlog import imap, $N messages ($MB MB, seed $SEED), Dovecot IMAPS on loopback

$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); $VERS; Dovecot $(dovecot --version | cut -d' ' -f1).
Wall time of the \`postlog import imap\` process, including start, TLS and login. Page cache warm.

| Run | Time | Rate |
|---|---|---|
| Warm-up (Dovecot builds its index), into a fresh account | ${S[warm]} s | $(rate "$N" "${S[warm]}") |
| Full import into a fresh account | ${S[timed]} s | $(rate "$N" "${S[timed]}") |
| Second run, nothing new | ${S[again]} s | |
EOF
