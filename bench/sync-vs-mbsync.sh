#!/usr/bin/env bash
# Postlog vs mbsync (isync) against Dovecot, side by side in one run, on loopback.
#
#   bench/sync-vs-mbsync.sh                      # 10,000 messages (about 460 MB)
#   bench/sync-vs-mbsync.sh --messages 100000    # about 4.6 GB; needs about 10x that on disk
#
# What it measures (bench/README.md explains every number):
#   1. full initial sync into a fresh directory: postlog, mbsync (per-message fsync, its
#      default) and mbsync with `FSync no`;
#   2. the machine's durable-copy limit (same files, one barrier) and BLAKE3 of all files;
#   3. no-change sync, repeated, wall time including process start;
#   4. incremental sync of 100 new messages;
#   5. push latency to a `postlog sync --watch` client;
#   6. no-change and incremental sync again at --rtt-ms (default 50 ms) round-trip time,
#      both tools behind the same postlog-netsim delay proxy (UDP for Postlog, TCP for IMAP).
# It installs dovecot-imapd and isync when missing, builds postlog and postlog-bench in
# release, and stops everything it started and removes its work directory on exit.
# Needs root (apt, and Dovecot switches to its own users). Page caches are NOT dropped:
# both servers' mail is in the page cache for every run, equally for both sides.
set -euo pipefail
export LC_ALL=C

usage() {
    cat <<'EOF'
usage: bench/sync-vs-mbsync.sh [options]
  --messages N      corpus size (default 10000; 100000 works, needs ~45 GB free)
  --seed S          corpus seed (default 1)
  --reps R          full-sync repetitions per tool, median reported (default 5; 1 if N >= 50000)
  --noop-runs K     no-change sync runs per tool (default 20)
  --inc-rounds R    incremental rounds of 100 new messages (default 3)
  --push M          messages for the push-latency measurement (default 50)
  --rtt-ms MS       round-trip time for the no-change/incremental runs through the delay
                    proxies (default 50; 0 = skip them)
  --rtt-runs K      no-change sync runs per tool at that RTT (default 5)
  --quiet-cpu PCT   before each timed run, wait while other processes use more than PCT%
                    of the CPUs (default 25) ...
  --max-wait S      ... but at most S seconds over the whole run (default 600)
  --prefault MB     touch and free MB of memory right before each timed run (default: corpus
                    size + 512 MB; never more than free memory - 1 GB; 0 = off; see prefault())
  --workdir DIR     where to put everything (default: a new directory under $TMPDIR or /tmp)
  --out FILE        also write the results table (markdown) to FILE
  --keep            keep the work directory (default: removed at exit)
  --no-build        use the binaries already in target/release
  --bin-dir DIR     use postlog and the postlog-bench binaries from DIR (implies --no-build)
  --no-install      do not apt-get install missing tools
EOF
}

N=10000 SEED=1 REPS="" NOOP_RUNS=20 INC_ROUNDS=3 INC_N=100 PUSH_M=50 QUIET_CPU=25 MAX_WAIT=600
RTT_MS=50 RTT_RUNS=5
PREFAULT_MB=""
WORKDIR="" OUT="" KEEP=0 BUILD=1 INSTALL=1 BIN_DIR=""
while (($#)); do
    case "$1" in
    --messages) N=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --noop-runs) NOOP_RUNS=$2; shift 2 ;;
    --inc-rounds) INC_ROUNDS=$2; shift 2 ;;
    --push) PUSH_M=$2; shift 2 ;;
    --rtt-ms) RTT_MS=$2; shift 2 ;;
    --rtt-runs) RTT_RUNS=$2; shift 2 ;;
    --quiet-cpu) QUIET_CPU=$2; shift 2 ;;
    --max-wait) MAX_WAIT=$2; shift 2 ;;
    --prefault) PREFAULT_MB=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --bin-dir) BIN_DIR=$2; BUILD=0; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ -z $REPS ]] && { if ((N >= 50000)); then REPS=1; else REPS=5; fi; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
# What is being measured: the checkout's commit, "+dirty" when crates/ has local changes,
# and when the postlog binary was built.
VERS_PL="postlog $(cd "$REPO" && git rev-parse --short HEAD)$(cd "$REPO" && git diff --quiet HEAD -- crates || echo '+dirty')"
[[ -z $BIN_DIR ]] || VERS_PL="postlog from $BIN_DIR"
BIN=${BIN_DIR:-$REPO/target/release}
LOCK=/tmp/postlog-cargo.lock

log() { printf '[%s load %s] %s\n' "$(date +%T)" "$(cut -d' ' -f1 /proc/loadavg)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (apt-get, and Dovecot switches to its own users)"

# ---------------------------------------------------------------- prerequisites
if ! command -v dovecot >/dev/null || ! command -v mbsync >/dev/null || ! command -v doveadm >/dev/null; then
    ((INSTALL)) || die "dovecot and mbsync are missing (drop --no-install to install them)"
    log "installing dovecot-imapd and isync"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y dovecot-imapd isync >/dev/null 2>&1; then
        apt-get update >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y dovecot-imapd isync >/dev/null
    fi
fi
for u in dovecot dovenull; do id "$u" >/dev/null 2>&1 || die "user $u missing (dovecot-core creates it)"; done

if ((BUILD)); then
    log "building postlog and postlog-bench (release)"
    (cd "$REPO" && flock "$LOCK" cargo build --release --locked -p postlog -p postlog-bench 2>&1 | tail -n 3) >&2
fi

# ---------------------------------------------------------------- work directory
if [[ -z $WORKDIR ]]; then
    WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/postlog-vs-mbsync.XXXXXX")
else
    mkdir -p "$WORKDIR"
fi
W=$(cd "$WORKDIR" && pwd)
chmod 755 "$W" # Dovecot's mail processes run as user dovecot and must reach its Maildir

# Run private copies of the binaries: on a shared checkout someone may rebuild target/ while
# this runs, and every measurement must use the same build.
mkdir -p "$W/bin"
for b in postlog make-corpus durable-copy hash-all push-latency netsim; do
    [[ -x $BIN/$b ]] || die "$BIN/$b missing: build with cargo build --release -p postlog -p postlog-bench"
    cp "$BIN/$b" "$W/bin/"
done
BUILT=$(date -r "$BIN/postlog" '+%F %T')
BIN=$W/bin

# Space: corpus, Dovecot's copy, Postlog's blobs, two warm-up copies (removed after the
# warm-up from 50,000 messages), and per repetition three sync targets plus the durable
# copy; about 46 KB per message.
copies=$((N >= 50000 ? 4 + 4 * REPS : 6 + 4 * REPS))
need_kb=$((N * 46 * copies * 11 / 10))
avail_kb=$(df -Pk "$W" | awk 'NR==2 {print $4}')
((avail_kb > need_kb)) || die "need about $((need_kb / 1024 / 1024)) GB free in $W, have $((avail_kb / 1024 / 1024)) GB"

PIDS=()
cleanup() {
    local rc=$?
    set +e
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null && wait "${PIDS[i]}" 2>/dev/null
    done
    if ((KEEP)); then
        log "kept $W"
    else
        log "removing $W"
        rm -rf "$W"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { # $1 = tcp|udp
    # A free port below the kernel's ephemeral range: a port from a bind to port 0 could be
    # handed to another socket bound to port 0 before the server binds it (see
    # postlog_net::port_below_ephemeral).
    python3 - "$1" <<'EOF'
import random, socket, sys
kind = socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM
try:
    first = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    first = 32768
for _ in range(1000):
    port = random.randrange(10000, max(first, 10001))
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind(("0.0.0.0", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    sys.exit(0)
sys.exit("no free port below the ephemeral range")
EOF
}

# ---------------------------------------------------------------- helpers
# timed OUTFILE CMD...: runs CMD (stdout+stderr to OUTFILE), sets T to the wall seconds, RD
# to the MB read from disk meanwhile (system-wide) and L to the 1-minute load average before
# the run (it includes this script's own earlier runs).
T="" L="" RD=0
timed() {
    local out=$1 t0 t1
    shift
    L=$(cut -d' ' -f1 /proc/loadavg)
    RD0=$(disk_read_mb)
    t0=$EPOCHREALTIME
    if ! "$@" >"$out" 2>&1; then
        cat "$out" >&2
        die "failed: $*"
    fi
    t1=$EPOCHREALTIME
    RD=$(($(disk_read_mb) - RD0))
    T=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.6f", b - a}')
}
# pct P VALUES...: nearest-rank percentile
pct() {
    local p=$1
    shift
    printf '%s\n' "$@" | sort -g | awk -v p="$p" '{a[NR] = $1} END {r = int((p * NR + 99) / 100); if (r < 1) r = 1; print a[r]}'
}
ok() { if awk "BEGIN {exit !($1)}"; then echo "met"; else echo "**missed**"; fi; }
maxof() { printf '%s\n' "$@" | sort -g | tail -n 1; }
minof() { printf '%s\n' "$@" | sort -g | head -n 1; }
calc() { awk "BEGIN {printf \"$1\", $2}"; }
count_mail() { find "$1/cur" "$1/new" -type f | wc -l; }
# Quiet disk before a timed run: flush dirty pages (from earlier runs, not the page cache),
# then a pause of 1.1 s (mbsync sleeps a second by itself when a Maildir changed within the
# last second). The pause doubles as a disturbance check: BG is how busy the CPUs were
# during it (percent of all cores; this script is idle then, so it is other processes).
# While BG is above --quiet-cpu, it waits for the machine to calm down, up to --max-wait
# seconds in all over the whole run.
cpu_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6}' /proc/stat; }
BG=0 WAITED=0
settle() {
    local a b start=$SECONDS
    sync
    while :; do
        a=$(cpu_ticks)
        sleep 1.1
        b=$(cpu_ticks)
        BG=$(awk -v a="$a" -v b="$b" 'BEGIN {split(a, x, " "); split(b, y, " "); u = y[1] - x[1]; i = y[2] - x[2]; printf "%.0f", (u + i > 0) ? 100 * u / (u + i) : 0}')
        ((BG <= QUIET_CPU || WAITED * 11 / 10 >= MAX_WAIT)) && break
        [[ ${1:-} != nowait ]] || break
        WAITED=$((WAITED + 1)) # extra pauses of 1.1 s
    done
    if ((SECONDS - start > 5)); then
        log "waited $((SECONDS - start)) s for other processes to calm down (now $BG% CPU)"
        sync
    fi
    # (Not before no-change runs, which write nothing: settle light. And "settle nowait"
    # does not wait for quiet: for what is not compared.)
    ((PREFAULT_MB == 0)) || [[ ${1:-} == light ]] || prefault "$PREFAULT_MB"
}
# prefault MB: touch and free MB of memory right before a run. On a VM with free page
# reporting (virtio-balloon; this one has it, and DAMON page-out), free guest memory is
# handed back to the host and the next first touch of each page faults in the host, so
# filling the page cache with new files costs 2-4x more, by an amount that varies with the
# memory's history. Touching the memory first makes every run start with host-backed free
# memory, as on bare metal (the kernel reports free memory again about 2 s after it is freed).
# At most the free memory less 1 GB: more would evict page cache (the data just warmed).
prefault() {
    local mb=$1 free
    free=$(awk '/^MemFree/ {printf "%d", $2 / 1024 - 1024}' /proc/meminfo)
    ((free < mb)) && mb=$free
    ((mb < 256)) || python3 -c 'import sys; b = b"\x01" * (int(sys.argv[1]) << 20)' "$mb"
}
# warm DIR...: read every file once, so what a run reads is in the page cache. The VM this
# was written on runs DAMON proactive reclaim (page-out of memory idle for about a minute),
# which otherwise evicts a server's mail between repetitions, unevenly.
warm() { find "$@" -type f -print0 | xargs -0 cat >/dev/null; }
disk_read_mb() { awk '/^pgpgin / {printf "%.0f", $2 / 1024}' /proc/vmstat; } # system-wide
udp_drops() { awk '/^Udp:/ {getline; print $6}' /proc/net/snmp; } # RcvbufErrors, system-wide

# ---------------------------------------------------------------- corpus
log "work directory $W; $N messages, seed $SEED, $REPS repetition(s)"
log "generating the corpus"
"$BIN/make-corpus" --seed "$SEED" --messages "$N" --out "$W/corpus" >"$W/corpus.out"
BYTES=$(awk '{print $3}' "$W/corpus.out")
MB=$(calc %.1f "$BYTES / 1e6")
[[ -n $PREFAULT_MB ]] || PREFAULT_MB=$((BYTES / 1048576 + 512))
log "corpus: $N messages, $MB MB"

# ---------------------------------------------------------------- Dovecot
DV=$W/dovecot
mkdir -p "$DV/home" "$DV/run" "$DV/state"
cp -a "$W/corpus" "$DV/home/Maildir"
chown -R dovecot:dovecot "$DV/home"
IMAP_PORT=$(free_port tcp)
cat >"$DV/dovecot.conf" <<EOF
# Private Dovecot for the benchmark: loopback only, plaintext auth, one static user.
base_dir = $DV/run
state_dir = $DV/state
log_path = $DV/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
# Dovecot refuses to run as root; these users come with dovecot-core.
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:$DV/home/Maildir
passdb {
  driver = static
  args = password=bench
}
userdb {
  driver = static
  args = uid=dovecot gid=dovecot home=$DV/home
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $IMAP_PORT
  }
  inet_listener imaps {
    port = 0
  }
}
EOF
dovecot -F -c "$DV/dovecot.conf" 2>"$DV/stderr" &
PIDS+=($!)
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$IMAP_PORT") 2>/dev/null && break
    sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$IMAP_PORT") 2>/dev/null || { cat "$DV/stderr" "$DV/dovecot.log" >&2; die "Dovecot did not start"; }
log "Dovecot listening on 127.0.0.1:$IMAP_PORT"

# mbsyncrc DIR FSYNC: an mbsync configuration pulling INBOX into the Maildir DIR/INBOX.
mbsyncrc() {
    cat >"$1.mbsyncrc" <<EOF
FSync $2

IMAPAccount bench
Host 127.0.0.1
Port $IMAP_PORT
User bench
Pass bench
SSLType None
AuthMechs LOGIN PLAIN

IMAPStore remote
Account bench

MaildirStore local
Path $1/
Inbox $1/INBOX

Channel bench
Far :remote:
Near :local:
Patterns INBOX
Sync Pull
Create Near
SyncState *
EOF
    mkdir -p "$1"
}
mbsync_run() { mbsync -q -c "$1.mbsyncrc" -a; }

# ---------------------------------------------------------------- Postlog server
PL=$W/postlog
UDP_PORT=$(free_port udp)
"$BIN/postlog" serve --data "$PL/server" --listen "127.0.0.1:$UDP_PORT" 2>"$PL.server.log" &
PIDS+=($!)
for _ in $(seq 100); do
    ss -Hlun "sport = :$UDP_PORT" | grep -q . && break
    sleep 0.1
done
ss -Hlun "sport = :$UDP_PORT" | grep -q . || { cat "$PL.server.log" >&2; die "postlog serve did not start"; }
URL_SYNC=$("$BIN/postlog" account add bench --data "$PL/server" --device sync --server "127.0.0.1:$UDP_PORT" 2>/dev/null | tail -n 1)
URL_STORE=$("$BIN/postlog" account add bench --data "$PL/server" --device store --server "127.0.0.1:$UDP_PORT" 2>/dev/null | tail -n 1)
log "postlog server on udp 127.0.0.1:$UDP_PORT"

# pl_login DIR URL: a fresh profile in DIR/profile with its Maildir in DIR/mail.
pl_login() { "$BIN/postlog" login "$2" --profile "$1/profile" --maildir "$1/mail" 2>/dev/null; }
pl_sync() { "$BIN/postlog" sync --profile "$1/profile" -q; }

STORE=$W/store
pl_login "$STORE" "$URL_STORE"
log "importing the corpus into Postlog (not part of the comparison)"
settle nowait
timed "$W/import.out" "$BIN/postlog" import maildir "$W/corpus" --profile "$STORE/profile" -q
IMPORT_S=$T IMPORT_BG=$BG
grep -q "^$N found, $N stored" "$W/import.out" || { cat "$W/import.out" >&2; die "import did not store all $N messages"; }
log "import: $(cat "$W/import.out")"

# ---------------------------------------------------------------- warm-up (not timed)
# Dovecot builds its index and dovecot-uidlist on first access, and both servers read
# their mail once into the page cache, so neither side's timed runs pay a cold start.
log "warm-up: one untimed full sync each"
mkdir -p "$W/warm"
pl_login "$W/warm/postlog" "$URL_SYNC"
pl_sync "$W/warm/postlog" >/dev/null
mbsyncrc "$W/warm/mbsync" no
mbsync_run "$W/warm/mbsync"
[[ $(count_mail "$W/warm/postlog/mail") == "$N" ]] || die "warm-up postlog sync: wrong message count"
[[ $(count_mail "$W/warm/mbsync/INBOX") == "$N" ]] || die "warm-up mbsync: wrong message count"
if ((N >= 50000)); then
    # Big corpora: free the disk space now, and let the file system settle before the
    # timed runs. Deleting many files right before a timed run slows it: ext4 without a
    # journal (this machine's) does not reuse an inode freed less than 60 s ago (300 s
    # more while its inode-table block is dirty; `recently_deleted` in fs/ext4/ialloc.c),
    # so each new file first walks past the freed ones. A client profile taken 2 s after
    # removing 10,000 files spent ~45% of its samples there (find_get_block_common,
    # recently_deleted, and lock spinning behind them). After `sync` the blocks are clean.
    log "removing the warm-up copies (then 65 s for the file system's recently-freed inodes)"
    rm -rf "$W/warm"
    sync
    sleep 65
fi

# ---------------------------------------------------------------- 1 + 2: full sync, limits
declare -a FULL_PL FULL_MB FULL_MBNF COPY HASH BGS DROPS RD_PL RD_MB RD_MBNF RD_COPY
for ((r = 1; r <= REPS; r++)); do
    R=$W/full$r
    mkdir -p "$R"
    # Interleaved, one of each per repetition, every target a new directory; old targets
    # are kept until the end (deleting 10,000 files right before a timed run slows it).
    pl_login "$R/postlog" "$URL_SYNC"
    warm "$PL/server"
    settle
    d0=$(udp_drops)
    timed "$R/postlog.out" pl_sync "$R/postlog"
    FULL_PL+=("$T") BGS+=("$BG") DROPS+=($(($(udp_drops) - d0))) RD_PL+=("$RD")
    [[ $(count_mail "$R/postlog/mail") == "$N" ]] || die "postlog full sync: wrong message count"
    log "full sync $r/$REPS postlog: $T s (background CPU $BG%; UDP receive-buffer drops ${DROPS[-1]}; disk reads $RD MB)"

    mbsyncrc "$R/mbsync" yes
    warm "$DV/home"
    settle
    timed "$R/mbsync.out" mbsync_run "$R/mbsync"
    FULL_MB+=("$T") BGS+=("$BG") RD_MB+=("$RD")
    [[ $(count_mail "$R/mbsync/INBOX") == "$N" ]] || die "mbsync full sync: wrong message count"
    log "full sync $r/$REPS mbsync (fsync per message): $T s (background CPU $BG%; disk reads $RD MB)"

    mbsyncrc "$R/mbsync-nofsync" no
    warm "$DV/home"
    settle
    timed "$R/mbsync-nofsync.out" mbsync_run "$R/mbsync-nofsync"
    FULL_MBNF+=("$T") BGS+=("$BG") RD_MBNF+=("$RD")
    [[ $(count_mail "$R/mbsync-nofsync/INBOX") == "$N" ]] || die "mbsync FSync no: wrong message count"
    log "full sync $r/$REPS mbsync FSync no: $T s (background CPU $BG%; disk reads $RD MB)"

    warm "$W/corpus"
    settle
    timed "$R/copy.out" "$BIN/durable-copy" --from "$W/corpus" --to "$R/copy"
    COPY+=("$T") BGS+=("$BG") RD_COPY+=("$RD")
    log "durable copy $r/$REPS: $T s (background CPU $BG%; disk reads $RD MB): $(cat "$R/copy.out")"

    timed "$R/hash.out" "$BIN/hash-all" "$W/corpus/cur" "$W/corpus/new"
    HASH+=("$T") BGS+=("$BG")
    log "hash $r/$REPS: $T s ($(cat "$R/hash.out"))"
done
FULL_BG=$(maxof "${BGS[@]}")
# The last repetition's targets go on to the next measurements.
PL_T=$W/full$REPS/postlog MB_T=$W/full$REPS/mbsync MBNF_T=$W/full$REPS/mbsync-nofsync

# ---------------------------------------------------------------- 3: no-change sync
log "no-change sync, $NOOP_RUNS runs each"
declare -a NOOP_PL NOOP_MB BGS=()
MB_SLEPT=0
for ((i = 1; i <= NOOP_RUNS; i++)); do
    settle light
    timed "$W/noop-pl.out" pl_sync "$PL_T"
    NOOP_PL+=("$T") BGS+=("$BG")
    settle light
    # Not -q: mbsync then says when it slept for a recent directory change.
    timed "$W/noop-mb.out" mbsync -c "$MB_T.mbsyncrc" -a
    NOOP_MB+=("$T") BGS+=("$BG")
    if grep -q sleeping "$W/noop-mb.out"; then MB_SLEPT=$((MB_SLEPT + 1)); fi
done
log "no-change: postlog p50 $(pct 50 "${NOOP_PL[@]}") s, mbsync p50 $(pct 50 "${NOOP_MB[@]}") s (background CPU up to $(maxof "${BGS[@]}")%)"
NOOP_BG=$(maxof "${BGS[@]}")
[[ $(count_mail "$PL_T/mail") == "$N" && $(count_mail "$MB_T/INBOX") == "$N" ]] || die "a no-change sync changed the message count"
((MB_SLEPT == 0)) || log "warning: mbsync slept for a recent directory change in $MB_SLEPT no-change runs"

# ---------------------------------------------------------------- 4: incremental
log "incremental: $INC_ROUNDS rounds of $INC_N new messages"
declare -a INC_PL INC_MB INC_MBNF INC_COPY INC_BYTES BGS=()
for ((r = 0; r < INC_ROUNDS; r++)); do
    from=$((N + r * INC_N))
    I=$W/inc$r
    "$BIN/make-corpus" --seed "$SEED" --from "$from" --messages "$INC_N" --out "$I" >"$I.out"
    INC_BYTES+=("$(awk '{print $3}' "$I.out")")
    # Postlog: stored through the other device's profile.
    "$BIN/postlog" import maildir "$I" --profile "$STORE/profile" -q >"$I.import.out"
    grep -q "^$INC_N found, $INC_N stored" "$I.import.out" || { cat "$I.import.out" >&2; die "incremental import failed"; }
    # Dovecot: delivered as an MDA would, tmp/ then rename into new/.
    for f in "$I"/new/*; do
        b=$(basename "$f")
        cp "$f" "$DV/home/Maildir/tmp/$b"
        chown dovecot:dovecot "$DV/home/Maildir/tmp/$b"
        mv "$DV/home/Maildir/tmp/$b" "$DV/home/Maildir/new/$b"
    done
    settle
    timed "$I.pl.out" pl_sync "$PL_T"
    INC_PL+=("$T") BGS+=("$BG")
    settle
    timed "$I.mb.out" mbsync_run "$MB_T"
    INC_MB+=("$T") BGS+=("$BG")
    settle
    timed "$I.mbnf.out" mbsync_run "$MBNF_T"
    INC_MBNF+=("$T") BGS+=("$BG")
    # The machine's cost of writing the same new files durably (one barrier), for scale.
    settle
    timed "$I.copy.out" "$BIN/durable-copy" --from "$I" --to "$W/inccopy$r"
    INC_COPY+=("$T") BGS+=("$BG")
    want=$((N + (r + 1) * INC_N))
    [[ $(count_mail "$PL_T/mail") == "$want" && $(count_mail "$MB_T/INBOX") == "$want" && $(count_mail "$MBNF_T/INBOX") == "$want" ]] ||
        die "incremental round $r: message counts differ from $want"
    log "incremental $((r + 1))/$INC_ROUNDS: postlog ${INC_PL[r]} s, mbsync ${INC_MB[r]} s, mbsync FSync no ${INC_MBNF[r]} s, durable copy ${INC_COPY[r]} s"
done
INC_BG=$(maxof "${BGS[@]}")

# ---------------------------------------------------------------- 4b: at an RTT
# The same replicas, reached through postlog-netsim delay proxies: UDP in front of the
# Postlog server, TCP in front of Dovecot, each adding RTT_MS of round-trip time.
RTT_DONE=0
if ((RTT_MS > 0)); then
    log "no-change ($RTT_RUNS runs) and incremental sync at $RTT_MS ms RTT"
    "$BIN/netsim" udp "127.0.0.1:$UDP_PORT" "$RTT_MS" >"$W/netsim-udp.addr" 2>"$W/netsim-udp.log" &
    PIDS+=($!)
    "$BIN/netsim" tcp "127.0.0.1:$IMAP_PORT" "$RTT_MS" >"$W/netsim-tcp.addr" 2>"$W/netsim-tcp.log" &
    PIDS+=($!)
    for _ in $(seq 100); do
        [[ -s $W/netsim-udp.addr && -s $W/netsim-tcp.addr ]] && break
        sleep 0.1
    done
    UDP_PROXY=$(head -n 1 "$W/netsim-udp.addr")
    TCP_PROXY_PORT=$(head -n 1 "$W/netsim-tcp.addr" | sed 's/.*://')
    [[ -n $UDP_PROXY && -n $TCP_PROXY_PORT ]] || die "the netsim proxies did not start"
    cp "$PL_T/profile/profile.toml" "$W/profile.toml.loopback"
    sed -i "s|^server = .*|server = \"$UDP_PROXY\"|" "$PL_T/profile/profile.toml"
    sed "s/^Port .*/Port $TCP_PROXY_PORT/" "$MB_T.mbsyncrc" >"$MB_T.rtt.mbsyncrc"
    declare -a RTT_PL RTT_MB
    for ((i = 1; i <= RTT_RUNS; i++)); do
        settle light
        timed "$W/rtt-noop-pl.out" pl_sync "$PL_T"
        RTT_PL+=("$T")
        settle light
        timed "$W/rtt-noop-mb.out" mbsync -q -c "$MB_T.rtt.mbsyncrc" -a
        RTT_MB+=("$T")
    done
    I=$W/inc-rtt
    "$BIN/make-corpus" --seed "$SEED" --from $((N + INC_ROUNDS * INC_N + 2000)) --messages "$INC_N" --out "$I" >"$I.out"
    "$BIN/postlog" import maildir "$I" --profile "$STORE/profile" -q >"$I.import.out"
    grep -q "^$INC_N found, $INC_N stored" "$I.import.out" || { cat "$I.import.out" >&2; die "incremental import failed"; }
    for f in "$I"/new/*; do
        b=$(basename "$f")
        cp "$f" "$DV/home/Maildir/tmp/$b"
        chown dovecot:dovecot "$DV/home/Maildir/tmp/$b"
        mv "$DV/home/Maildir/tmp/$b" "$DV/home/Maildir/new/$b"
    done
    settle
    timed "$I.pl.out" pl_sync "$PL_T"
    RTT_INC_PL=$T
    settle
    timed "$I.mb.out" mbsync -q -c "$MB_T.rtt.mbsyncrc" -a
    RTT_INC_MB=$T
    want=$((N + (INC_ROUNDS + 1) * INC_N))
    [[ $(count_mail "$PL_T/mail") == "$want" && $(count_mail "$MB_T/INBOX") == "$want" ]] ||
        die "incremental at $RTT_MS ms RTT: message counts differ from $want"
    cp "$W/profile.toml.loopback" "$PL_T/profile/profile.toml"
    rp=$(pct 50 "${RTT_PL[@]}") rm_=$(pct 50 "${RTT_MB[@]}")
    rtt_s=$(calc %.6f "$RTT_MS / 1000")
    log "at $RTT_MS ms RTT: no-change postlog p50 $rp s, mbsync p50 $rm_ s; incremental postlog $RTT_INC_PL s, mbsync $RTT_INC_MB s"
    RTT_DONE=1
fi

# ---------------------------------------------------------------- 5: push latency
log "push latency: $PUSH_M messages to a watching client"
"$BIN/postlog" sync --watch --profile "$PL_T/profile" 2>"$W/watch.log" &
WATCH_PID=$!
PIDS+=("$WATCH_PID")
for _ in $(seq 100); do
    grep -q connected "$W/watch.log" && break
    sleep 0.1
done
grep -q connected "$W/watch.log" || { cat "$W/watch.log" >&2; die "postlog sync --watch did not connect"; }
settle
PUSH_BG=$BG PUSH_FAIL=""
if ! "$BIN/push-latency" --store-profile "$STORE/profile" --watch-profile "$PL_T/profile" \
    --messages "$PUSH_M" --seed "$SEED" --from $((N + INC_ROUNDS * INC_N + 1000)) >"$W/push.out" 2>"$W/push.err"; then
    head -n 3 "$W/push.err" >&2
    log "postlog sync --watch said:"
    tail -n 20 "$W/watch.log" >&2
    log "postlog serve said:"
    tail -n 20 "$PL.server.log" >&2
    if kill -0 "$WATCH_PID" 2>/dev/null; then
        PUSH_FAIL="failed: $(grep -m1 . "$W/push.err" | cut -c1-100)"
    else
        PUSH_FAIL="failed: \`postlog sync --watch\` exited: $(tail -n 1 "$W/watch.log" | cut -c1-140)"
    fi
    log "push-latency $PUSH_FAIL"
fi
cat "$W/push.out" >&2
kill -TERM "$WATCH_PID" 2>/dev/null || true
wait "$WATCH_PID" || true
unset 'PIDS[${#PIDS[@]}-1]'
pv() { sed -n "s/.* $1=\([-0-9.]*\).*/\1/p" "$W/push.out"; }
if [[ -z $PUSH_FAIL ]]; then
    PUSH_ROWS="| Push, store ack → on disk, ms p50 / p99 ($PUSH_M msgs) | $(pv from_ack_p50) / $(pv from_ack_p99) | — | — | < 10 ms | | $(ok "$(pv from_ack_p99) < 10") (p99) |
| Push, store sent → on disk, ms p50 / p99 | $(pv from_start_p50) / $(pv from_start_p99) | — | — | | store ack p50 / p99 $(pv ack_p50) / $(pv ack_p99) | |"
else
    PUSH_ROWS="| Push ($PUSH_M msgs) | $PUSH_FAIL | — | — | < 10 ms | | **failed** |"
fi

# ---------------------------------------------------------------- results
med() { pct 50 "$@"; }
pl=$(med "${FULL_PL[@]}") mb=$(med "${FULL_MB[@]}") mbnf=$(med "${FULL_MBNF[@]}")
cp_s=$(med "${COPY[@]}") h_s=$(med "${HASH[@]}")
pl_b=$(minof "${FULL_PL[@]}") mb_b=$(minof "${FULL_MB[@]}") mbnf_b=$(minof "${FULL_MBNF[@]}") cp_b=$(minof "${COPY[@]}")
spread() { echo "$(calc %.2f "$(minof "$@")")–$(calc %.2f "$(maxof "$@")")"; }
mbps() { calc %.0f "$BYTES / 1e6 / $1"; }
ms() { calc %.1f "$1 * 1000"; }
np50=$(pct 50 "${NOOP_PL[@]}") np90=$(pct 90 "${NOOP_PL[@]}")
nm50=$(pct 50 "${NOOP_MB[@]}") nm90=$(pct 90 "${NOOP_MB[@]}")
ipl=$(med "${INC_PL[@]}") imb=$(med "${INC_MB[@]}") imbnf=$(med "${INC_MBNF[@]}")
icopy=$(med "${INC_COPY[@]}")
inc_bytes=$(med "${INC_BYTES[@]}")
# Incremental target: the no-change sync (process start, connect, one round trip) plus one
# more round trip (loopback: negligible) plus moving the new bytes at the full-sync rate.
inc_target=$(calc %.6f "$np50 + $inc_bytes / ($BYTES / $pl)")
RTT_ROWS=""
if ((RTT_DONE)); then
    RTT_ROWS="| No-change sync at $RTT_MS ms RTT (netsim proxies), p50 ms ($RTT_RUNS runs) | $(ms "$rp") ($(calc %.1f "$rp / $rtt_s") RTT) | $(ms "$rm_") ($(calc %.1f "$rm_ / $rtt_s") RTT) | | 1 RTT resumed; 2 RTT from a new process (PROTOCOL.md §11) | mbsync/postlog $(calc %.1fx "$rm_ / $rp") | |
| Incremental $INC_N msgs at $RTT_MS ms RTT, ms | $(ms "$RTT_INC_PL") ($(calc %.1f "$RTT_INC_PL / $rtt_s") RTT) | $(ms "$RTT_INC_MB") ($(calc %.1f "$RTT_INC_MB / $rtt_s") RTT) | | 2 RTT + transfer | mbsync/postlog $(calc %.1fx "$RTT_INC_MB / $RTT_INC_PL") | |"
fi
HOST_INFO="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -r)"
VERS="$VERS_PL (binary built $BUILT), $(mbsync --version), Dovecot $(dovecot --version | cut -d' ' -f1)"

TABLE=$(
    cat <<EOF
### Postlog vs mbsync, $N messages ($MB MB, seed $SEED), loopback

$HOST_INFO; $VERS.
Page cache warm for both sides (no cache dropped; before each full-sync run the data that
run reads is read once); \`sync\` and a 1.1 s pause before every timed run. Times are wall
clock including process start. Full sync: median of $REPS run(s) per tool, interleaved,
[fastest–slowest]; "best runs" compares the fastest runs. Disturbance: CPU use by other
processes during the pause before each run, highest seen (percent of all cores): full sync
$FULL_BG%, no-change $NOOP_BG%, incremental $INC_BG%, push $PUSH_BG% (above $QUIET_CPU% it
waited first: $((WAITED * 11 / 10)) s in all, at most $MAX_WAIT). Postlog full sync lost
$(med "${DROPS[@]}") UDP datagrams to full receive buffers per run (median of the
system-wide RcvbufErrors count; default receive buffer $(sysctl -n net.core.rmem_default) bytes). Before each timed
run up to $PREFAULT_MB MB of memory (no more than was free) was touched and freed (see
\`prefault\` in the script).

| Measurement | Postlog | mbsync (fsync/msg) | mbsync FSync no | Limit / target | Ratio | Target |
|---|---|---|---|---|---|---|
| Full sync, s | $(calc %.2f "$pl") [$(spread "${FULL_PL[@]}")] | $(calc %.2f "$mb") [$(spread "${FULL_MB[@]}")] | $(calc %.2f "$mbnf") [$(spread "${FULL_MBNF[@]}")] | durable copy $(calc %.2f "$cp_s") [$(spread "${COPY[@]}")]; BLAKE3 $(calc %.2f "$h_s") | | |
| Full sync, MB/s | $(mbps "$pl") | $(mbps "$mb") | $(mbps "$mbnf") | copy $(mbps "$cp_s"); hash $(mbps "$h_s") | | |
| Full sync, MB read from disk during the run (median) | $(med "${RD_PL[@]}") | $(med "${RD_MB[@]}") | $(med "${RD_MBNF[@]}") | copy $(med "${RD_COPY[@]}") | | |
| Full sync vs mbsync (fsync) | | | | ≥ 3.5x faster | $(calc %.2fx "$mb / $pl") (best runs: $(calc %.2fx "$mb_b / $pl_b")) | $(ok "$mb / $pl >= 3.5") |
| Full sync vs mbsync FSync no | | | | faster (> 1x) | $(calc %.2fx "$mbnf / $pl") (best runs: $(calc %.2fx "$mbnf_b / $pl_b")) | $(ok "$mbnf / $pl > 1") |
| Full sync vs durable copy | | | | within 1.3x | $(calc %.2fx "$pl / $cp_s") (best runs: $(calc %.2fx "$pl_b / $cp_b"); vs copy + hash: $(calc %.2fx "$pl / ($cp_s + $h_s)")) | $(ok "$pl / $cp_s <= 1.3") |
| No-change sync p50 / p90, ms ($NOOP_RUNS runs) | $(ms "$np50") / $(ms "$np90") | $(ms "$nm50") / $(ms "$nm90") | | < 20 ms, flat 10k→100k | mbsync/postlog $(calc %.1fx "$nm50 / $np50") | $(ok "$np50 < 0.020") (p50) |
| Incremental, $INC_N new msgs ($(calc %.1f "$inc_bytes / 1e6") MB), ms ($INC_ROUNDS rounds) | $(ms "$ipl") [$(ms "$(minof "${INC_PL[@]}")")–$(ms "$(maxof "${INC_PL[@]}")")] | $(ms "$imb") | $(ms "$imbnf") | 2 RTT + transfer ≈ $(ms "$inc_target"); durable copy of the same files $(ms "$icopy") | $(calc %.2fx "$ipl / $inc_target") of target ($(calc %.2fx "$ipl / ($inc_target + $icopy)") of target + copy); mbsync/postlog $(calc %.1fx "$imb / $ipl") | $(ok "$ipl <= $inc_target * 1.1") |
$PUSH_ROWS
$RTT_ROWS
| Import (postlog import maildir), not compared | $(calc %.2f "$IMPORT_S") s, $(calc %.0f "$N / $IMPORT_S") msg/s, $(mbps "$IMPORT_S") MB/s (background CPU $IMPORT_BG%) | | | | | |

Incremental target = no-change p50 (process start + connect + 1 RTT) + 1 RTT (loopback, ~0)
+ the new bytes at Postlog's full-sync rate; "met" allows 10%. It has no room for a
durability barrier: the durable copy of the same new files (one barrier, as in the full
sync) is given for scale. Flatness 10k→100k: compare the no-change row of a
\`--messages 100000\` run.
EOF
)
echo
echo "$TABLE"
[[ -n $OUT ]] && echo "$TABLE" >"$OUT"
log "done"
