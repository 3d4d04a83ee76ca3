#!/usr/bin/env bash
# Profile command-trigger under one workload, as BENCHMARKS.md describes:
#
#   bench/profile.sh w1|w2|ka [perf|callgrind]      (default: both)
#
# Builds a release binary with symbols (not stripped) into $CARGO_TARGET_DIR/prof, then
# - callgrind: runs the server under valgrind for a fixed number of requests and prints the
#   instructions per request (start-up subtracted) and the top inclusive functions;
# - perf: samples the server at full speed (`perf record -e cpu-clock -g`; this VM has no
#   hardware counters) while ct-bench drives it, and prints the split by thread and by symbol.
# KEEP=FILE keeps the callgrind output there, for `callgrind_annotate --tree=calling FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKLOAD=${1:?usage: bench/profile.sh w1|w2|ka [perf|callgrind]}
TOOLS=${2:-perf callgrind}
TOKEN=bench-token-0123456789abcdef
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export RUST_LOG=warn
PROF=$CARGO_TARGET_DIR/prof
CARGO_TARGET_DIR=$PROF CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=1 \
    cargo build --release --quiet
cargo build --release --quiet --manifest-path bench/Cargo.toml
CT=$PROF/release/command-trigger
GEN=$CARGO_TARGET_DIR/release/ct-bench

WORK=$(mktemp -d /tmp/ct-profile.XXXXXX)
SERVER=
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null
    if [ -n "${KEEP:-}" ] && [ -f "$WORK/cg.out" ]; then cp "$WORK/cg.out" "$KEEP"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
echo "$TOKEN" >"$WORK/token"
echo 'fn handle(req) { "ok\n" }' >"$WORK/w1.rhai"
echo 'fn handle(req) { exec(["/bin/true"]); "ok\n" }' >"$WORK/w2.rhai"

SERVE=(serve --token-file "$WORK/token" --listen 127.0.0.1:0 --print-addr)
DRIVE=(-c 32 --send "$TOKEN ok\n" --expect 'ok\n' --timeout 10s)
case $WORKLOAD in
    w1) SERVE+=(--script "$WORK/w1.rhai" --workers 2); REQUESTS=3000 ;;
    w2) SERVE+=(--script "$WORK/w2.rhai" --workers 8); REQUESTS=1000 ;;
    ka) SERVE+=(--script "$WORK/w1.rhai" --workers 2 --keep-alive); REQUESTS=20000
        DRIVE+=(--mode keep-alive) ;;
    *) echo "unknown workload $WORKLOAD" >&2; exit 2 ;;
esac

# Starts "$@" in the background and waits for the address it prints.
start() {
    "$@" >"$WORK/addr" 2>"$WORK/err" &
    SERVER=$!
    for _ in $(seq 300); do
        ADDR=$(head -n1 "$WORK/addr" 2>/dev/null || true)
        [ -n "$ADDR" ] && return
        sleep 0.1
    done
    echo "server did not start" >&2
    cat "$WORK/err" >&2
    exit 1
}

stop() {
    kill -TERM "$SERVER"
    wait "$SERVER" 2>/dev/null || true
    SERVER=
}

# Instructions of a run that serves N requests, from its callgrind output.
callgrind_run() {
    local out=$1 requests=$2
    start valgrind --tool=callgrind --callgrind-out-file="$out" "$CT" "${SERVE[@]}"
    if [ "$requests" -gt 0 ]; then
        "$GEN" --addr "$ADDR" "${DRIVE[@]}" --requests "$requests" --duration 120s >&2
    fi
    stop
    callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
}

profile_callgrind() {
    local base total
    base=$(callgrind_run "$WORK/cg.base" 0)
    total=$(callgrind_run "$WORK/cg.out" "$REQUESTS")
    echo "callgrind: $(( (total - base) / REQUESTS )) instructions per request" \
        "(total $total, start-up $base, $REQUESTS requests)"
    callgrind_annotate --inclusive=yes "$WORK/cg.out" 2>/dev/null | sed -n '/file:function/,$p' | head -40 |
        cut -c1-160
}

profile_perf() {
    start "$CT" "${SERVE[@]}"
    "$GEN" --addr "$ADDR" "${DRIVE[@]}" --duration 5s &
    local gen=$!
    sleep 1
    perf record -q -e cpu-clock -F 2000 -g -p "$SERVER" -o "$WORK/perf.data" -- sleep 3 \
        >/dev/null 2>&1
    wait "$gen"
    stop
    perf report -i "$WORK/perf.data" --sort comm --stdio -g none 2>/dev/null | grep -v '^#' |
        grep -v '^$' | head -12
    perf report -i "$WORK/perf.data" --children --sort sym --stdio -g none 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -50
}

for tool in $TOOLS; do
    echo "== $WORKLOAD: $tool"
    "profile_$tool"
done
