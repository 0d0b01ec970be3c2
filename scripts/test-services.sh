#!/usr/bin/env bash
# Services for the tests of the PostgreSQL + S3 storage backend (issue #9): a throwaway
# PostgreSQL cluster and a single-node Garage (S3-compatible object store), both on loopback.
#
#   scripts/test-services.sh start   install what is missing, start both, write $DIR/env
#   scripts/test-services.sh env     print the `export` lines the tests read
#   scripts/test-services.sh stop    stop both and remove $DIR
#
# Settings (environment):
#   POSTLOG_SERVICES_DIR   where both keep everything         /tmp/postlog-services
#   POSTLOG_PG_PORT        PostgreSQL on 127.0.0.1            55432
#   POSTLOG_S3_PORT        Garage's S3 API on 127.0.0.1       53900 (RPC: +1, admin API: +3)
#   POSTLOG_TOOLS_DIR      cache of built tools (kept across CI runs on one machine)
#                                                              /var/cache/postlog-tools
#
# `start` on a running set reuses it if both answer, else stops it and starts afresh.
# Every wait is bounded; on failure the service's log tail is printed.
set -euo pipefail

DIR=${POSTLOG_SERVICES_DIR:-/tmp/postlog-services}
PG_PORT=${POSTLOG_PG_PORT:-55432}
S3_PORT=${POSTLOG_S3_PORT:-53900}
RPC_PORT=$((S3_PORT + 1))
ADMIN_PORT=$((S3_PORT + 3))
TOOLS=${POSTLOG_TOOLS_DIR:-/var/cache/postlog-tools}
GARAGE_VERSION=2.5.0
GARAGE_ROOT=$TOOLS/garage-$GARAGE_VERSION
GARAGE=$GARAGE_ROOT/bin/garage
CARGO_LOCK=/tmp/postlog-cargo.lock
BUCKET=postlog-test
KEY_NAME=postlog-test
REGION=garage
MARKER=.postlog-test-services
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

PG=$DIR/pg
GA=$DIR/garage
GARAGE_CONF=$GA/garage.toml

say() { echo "test-services: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}
# die, with the last lines of a log file.
die_log() {
  local log=$1
  shift
  say "error: $*"
  if [ -f "$log" ]; then
    say "last lines of $log:"
    tail -n 40 "$log" >&2
  fi
  exit 1
}

apt_install() {
  say "installing $*"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The default ports lie in Linux's ephemeral range (32768-60999): an outgoing connection
# could take one as its source port just before a service binds it. As root, reserve them
# (the kernel then never hands them out as source ports; explicit binds still work).
reserve_ports() {
  local f=/proc/sys/net/ipv4/ip_local_reserved_ports cur
  [ -w "$f" ] || return 0
  cur=$(cat "$f" 2>/dev/null) || return 0
  echo "${cur:+$cur,}$PG_PORT,$S3_PORT-$ADMIN_PORT" >"$f" 2>/dev/null || true
}

random_hex() { head -c "$1" /dev/urandom | od -An -tx1 -v | tr -d ' \n'; }

# ---------------------------------------------------------------- PostgreSQL

pg_bindir() {
  local d
  d=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

# Runs a command as the `postgres` OS user (initdb and postgres refuse to run as root),
# from a directory that user can read.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd "$PG" && runuser -u postgres -- "$@")
  else
    (cd "$PG" && "$@")
  fi
}

pg_start() {
  local bin
  bin=$(pg_bindir) || true
  if [ -z "$bin" ]; then
    apt_install postgresql
    bin=$(pg_bindir) || die "postgresql installed, but no initdb under /usr/lib/postgresql/*/bin"
  fi
  port_open "$PG_PORT" && die "port $PG_PORT is in use (another test-services set? stop it, or set POSTLOG_PG_PORT)"

  mkdir -p "$PG/socket"
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "no 'postgres' OS user (the postgresql package creates it)"
    chown -R postgres:postgres "$PG"
    as_pg test -w "$PG" || die "the postgres user cannot write $PG (is a parent directory private?)"
  fi
  as_pg "$bin/initdb" -D "$PG/data" -U postgres -A trust -E UTF8 --no-locale >"$PG/initdb.log" 2>&1 ||
    die_log "$PG/initdb.log" "initdb failed"
  # Later settings win over initdb's defaults. Durability as in production: the tests
  # check what an acknowledgement means.
  cat >>"$PG/data/postgresql.conf" <<EOF

# scripts/test-services.sh
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG/socket'
max_connections = 300
fsync = on
synchronous_commit = on
full_page_writes = on
logging_collector = off
EOF
  as_pg "$bin/pg_ctl" -D "$PG/data" -l "$PG/postgres.log" -w -t 60 start >/dev/null 2>&1 ||
    die_log "$PG/postgres.log" "PostgreSQL did not start on 127.0.0.1:$PG_PORT within 60 s"
  for _ in $(seq 1 60); do
    if "$bin/psql" "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" -Atqc 'select 1' >/dev/null 2>&1; then
      say "PostgreSQL $("$bin/postgres" -V | awk '{print $3}') on 127.0.0.1:$PG_PORT ($PG/data)"
      return 0
    fi
    sleep 0.5
  done
  die_log "$PG/postgres.log" "PostgreSQL started but does not answer on 127.0.0.1:$PG_PORT"
}

pg_stop() {
  [ -f "$PG/data/postmaster.pid" ] || return 0
  local bin pid
  bin=$(pg_bindir) || true
  if [ -n "$bin" ] && as_pg "$bin/pg_ctl" -D "$PG/data" -m fast -w -t 30 stop >/dev/null 2>&1; then
    return 0
  fi
  pid=$(head -n 1 "$PG/data/postmaster.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    say "PostgreSQL did not stop within 30 s; killing postmaster $pid"
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

pg_alive() {
  local bin
  bin=$(pg_bindir) || return 1
  [ -f "$PG/data/postmaster.pid" ] &&
    "$bin/psql" "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" -Atqc 'select 1' >/dev/null 2>&1
}

# ---------------------------------------------------------------- Garage

garage_runs() { [ -x "$GARAGE" ] && "$GARAGE" --version >/dev/null 2>&1; }

# The binary comes from a cache that outlives CI's clones; built once per machine. Garage
# 2.5.0 refuses to compile without one of bundled-libs/system-libs: bundled-libs builds
# SQLite into the binary (no shared library needed at run time). No LMDB, no K2V, no metrics.
garage_install() {
  garage_runs && return 0
  [ ! -e "$GARAGE" ] || say "$GARAGE does not run ($("$GARAGE" --version 2>&1 | tail -n 1)); rebuilding"
  command -v cargo >/dev/null || die "cargo is needed to build Garage $GARAGE_VERSION"
  local need=()
  command -v cc >/dev/null || need+=(gcc)
  command -v make >/dev/null || need+=(make)
  [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
  mkdir -p "$TOOLS"
  say "building Garage $GARAGE_VERSION into $GARAGE_ROOT: this takes several minutes (about 10-15 on 2 cores), once per machine"
  local t0=$SECONDS
  (
    flock -w 1800 9 || die "waited 30 min for $CARGO_LOCK (another cargo build holds it)"
    # Another run may have built it while this one waited for the lock.
    if ! garage_runs; then
      cargo install garage --version "$GARAGE_VERSION" --no-default-features \
        --features sqlite,bundled-libs --locked --force --root "$GARAGE_ROOT"
    fi
  ) 9>"$CARGO_LOCK"
  garage_runs || die "the Garage build did not produce a working $GARAGE"
  say "Garage built in $((SECONDS - t0)) s"
}

garage() { "$GARAGE" -c "$GARAGE_CONF" "$@"; }

garage_pid() { cat "$GA/garage.pid" 2>/dev/null || true; }

# Our Garage process runs (checked by its command line: the pid may have been reused).
garage_alive() {
  local pid
  pid=$(garage_pid)
  [ -n "$pid" ] && grep -qaF "$GARAGE_CONF" "/proc/$pid/cmdline" 2>/dev/null
}

garage_launch() {
  NO_COLOR=1 RUST_LOG=garage=info "$GARAGE" -c "$GARAGE_CONF" server \
    </dev/null >>"$GA/garage.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$GA/garage.pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || die_log "$GA/garage.log" "Garage exited during start"
    if garage status >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  die_log "$GA/garage.log" "Garage's RPC did not answer on 127.0.0.1:$RPC_PORT within 30 s"
}

garage_start() {
  local p
  for p in "$S3_PORT" "$RPC_PORT" "$ADMIN_PORT"; do
    port_open "$p" && die "port $p is in use (another test-services set? stop it, or set POSTLOG_S3_PORT)"
  done
  mkdir -p "$GA/meta" "$GA/data"
  (
    umask 077
    cat >"$GARAGE_CONF" <<EOF
# scripts/test-services.sh: single-node Garage for tests, loopback only.
metadata_dir = "$GA/meta"
data_dir = "$GA/data"
db_engine = "sqlite"
# Durability as in production (both default to false in Garage).
metadata_fsync = true
data_fsync = true
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$S3_PORT"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
admin_token = "$(random_hex 32)"
metrics_token = "$(random_hex 32)"
EOF
  )
  garage_launch

  local node
  node=$(garage node id -q 2>>"$GA/garage.log") || die_log "$GA/garage.log" "garage node id failed"
  node=${node%%@*}
  {
    garage layout assign -z dc1 -c 10G "$node" &&
      garage layout apply --version 1
  } >>"$GA/setup.log" 2>&1 || die_log "$GA/setup.log" "garage layout assign/apply failed"
  local ok=
  for _ in $(seq 1 60); do
    if garage health 2>/dev/null | grep -q 'HEALTHY'; then
      ok=1
      break
    fi
    sleep 0.5
  done
  [ -n "$ok" ] || die_log "$GA/garage.log" "Garage did not become healthy within 30 s after the layout"
  {
    garage key create "$KEY_NAME" &&
      garage bucket create "$BUCKET" &&
      garage bucket allow --read --write --owner "$BUCKET" --key "$KEY_NAME"
  } >>"$GA/setup.log" 2>&1 || die_log "$GA/setup.log" "creating the key or the bucket failed"
  if ! ACCESS_KEY=$(garage key info "$KEY_NAME" --key-id 2>>"$GA/setup.log") ||
    ! SECRET_KEY=$(garage key info "$KEY_NAME" --secret-key 2>>"$GA/setup.log"); then
    die_log "$GA/setup.log" "reading the key failed"
  fi
  case "$ACCESS_KEY:$SECRET_KEY" in
    GK*:[0-9a-f]*) ;;
    *) die_log "$GA/setup.log" "unexpected key from garage key info: '$ACCESS_KEY'" ;;
  esac
  s3_check 20 || die_log "$GA/garage.log" "a signed ListObjectsV2 on $BUCKET failed"
  say "Garage $GARAGE_VERSION: S3 on http://127.0.0.1:$S3_PORT, bucket $BUCKET, region $REGION ($GA)"
}

# A signed (SigV4) ListObjectsV2 on the bucket: the key, its permission and the S3 API work.
# Tries $1 times, 0.5 s apart.
s3_check() {
  command -v curl >/dev/null || apt_install curl
  for _ in $(seq 1 "$1"); do
    # Garage requires x-amz-content-sha256, which curl does not add by itself: here the
    # SHA-256 of the empty body.
    if curl -fsS -o /dev/null --max-time 5 --aws-sigv4 "aws:amz:$REGION:s3" \
      --user "$ACCESS_KEY:$SECRET_KEY" -H "x-amz-content-sha256: $EMPTY_SHA256" \
      "http://127.0.0.1:$S3_PORT/$BUCKET?list-type=2" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}

garage_stop() {
  local pid
  garage_alive || return 0
  pid=$(garage_pid)
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  say "Garage did not stop within 10 s; killing $pid"
  kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- commands

write_env() {
  cat >"$DIR/env.tmp" <<EOF
export POSTLOG_TEST_POSTGRES='host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres'
export POSTLOG_TEST_S3_ENDPOINT='http://127.0.0.1:$S3_PORT'
export POSTLOG_TEST_S3_BUCKET='$BUCKET'
export POSTLOG_TEST_S3_REGION='$REGION'
export POSTLOG_TEST_S3_ACCESS_KEY='$ACCESS_KEY'
export POSTLOG_TEST_S3_SECRET_KEY='$SECRET_KEY'
EOF
  mv "$DIR/env.tmp" "$DIR/env"
}

# Both services of an earlier `start` still answer.
running() {
  [ -f "$DIR/env" ] && pg_alive && garage_alive || return 1
  ACCESS_KEY=$(sed -n "s/^export POSTLOG_TEST_S3_ACCESS_KEY='\(.*\)'$/\1/p" "$DIR/env")
  SECRET_KEY=$(sed -n "s/^export POSTLOG_TEST_S3_SECRET_KEY='\(.*\)'$/\1/p" "$DIR/env")
  s3_check 1
}

cmd_stop() {
  [ -e "$DIR" ] || return 0
  [ -f "$DIR/$MARKER" ] || die "$DIR was not made by this script; not touching it"
  garage_stop
  pg_stop
  rm -rf "$DIR"
}

cmd_start() {
  local t0=$SECONDS
  if running; then
    say "already running in $DIR; reusing it"
    return 0
  fi
  if [ -e "$DIR" ]; then
    say "$DIR holds a stopped or partial set; starting afresh"
    cmd_stop
  fi
  garage_install
  reserve_ports
  mkdir -p "$DIR"
  chmod 755 "$DIR"
  touch "$DIR/$MARKER"
  pg_start
  garage_start
  write_env
  say "up in $((SECONDS - t0)) s; environment: $DIR/env"
}

cmd_env() {
  [ -f "$DIR/env" ] || die "not started: run '$0 start' (POSTLOG_SERVICES_DIR=$DIR)"
  cat "$DIR/env"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  *)
    echo "usage: $0 start|stop|env" >&2
    exit 2
    ;;
esac
