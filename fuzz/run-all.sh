#!/usr/bin/env bash
# Runs every fuzz target for SECONDS_PER_TARGET on stable Rust (--sanitizer none) and prints
# a table of targets, executions and findings. Exits non-zero if any target found something
# (a file in fuzz/artifacts/<target>/, including ones left from earlier runs: triage them,
# commit the input to fuzz/corpus/<target>/ with a regression test, then delete them).
#
#   fuzz/run-all.sh [SECONDS_PER_TARGET]      (default 60)
#
# The committed corpus fuzz/corpus/<target>/ is only read. New inputs the fuzzer finds go to
# fuzz/target/corpus-new/<target>/ (ignored by git) and carry over to the next run. To keep
# the ones that add coverage:
#   cargo fuzz run TARGET --sanitizer none corpus/TARGET target/corpus-new/TARGET -- -merge=1
#
# Set CARGO_LOCK=/path/to/lockfile to run every cargo command under flock(1), on machines
# where builds must not run concurrently.
set -euo pipefail

secs=${1:-60}
if ! [[ $secs =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi

cd "$(dirname "$0")"

cargo_locked() {
    if [[ -n ${CARGO_LOCK:-} ]]; then
        flock "$CARGO_LOCK" cargo "$@"
    else
        cargo "$@"
    fi
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo_locked install cargo-fuzz --locked
fi

mapfile -t targets < <(cargo fuzz list)
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "no fuzz targets found" >&2
    exit 1
fi

# One build for all targets, so the per-target runs below only fuzz.
cargo_locked fuzz build --sanitizer none

logs=target/fuzz-logs
mkdir -p "$logs"
rows=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "target/corpus-new/$t" "artifacts/$t"
    echo "fuzzing $t for ${secs}s (log: fuzz/$logs/$t.log)" >&2
    status=ok
    cargo_locked fuzz run "$t" --sanitizer none "target/corpus-new/$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$logs/$t.log" 2>&1 || status=failed
    # libFuzzer's final stats; after a crash there are none, so fall back to the last
    # status line ("#N  DONE ..." or "#N  NEW ...").
    execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$logs/$t.log" | tail -n 1)
    if [[ -z $execs ]]; then
        execs=$(sed -n 's/^#\([0-9][0-9]*\)[[:space:]].*/\1/p' "$logs/$t.log" | tail -n 1)
    fi
    findings=$(find "artifacts/$t" -type f | wc -l)
    if [[ $findings -gt 0 || $status != ok ]]; then
        failed=1
    fi
    rows+=("$(printf '%-16s %14s %9s  %s' "$t" "${execs:-?}" "$findings" "$status")")
done

printf '\n%-16s %14s %9s  %s\n' target executions findings run
for row in "${rows[@]}"; do
    echo "$row"
done
if [[ $failed -ne 0 ]]; then
    echo
    echo "findings or failed runs: see fuzz/artifacts/<target>/ and fuzz/$logs/<target>.log" >&2
    exit 1
fi
