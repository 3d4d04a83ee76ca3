#!/usr/bin/env bash
# State throughput (issue 13): `state_incr` and `once` through the server at c=32, in memory and
# with --state-file, beside W1 (a request that touches no state) of this build and, if given, of
# an earlier build; plus the cost of one durable write (O_DSYNC 4 KiB writes) on this disk.
#
#   bench/state.sh [BASE_BINARY]      # needs target/release/{command-trigger,ct-bench}
#   BENCH_DURATION=3s W1_PAIRS=3 bench/state.sh /tmp/command-trigger-before
#
# Prints Markdown rows; raw generator lines go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-3s}
TOKEN=bench-token-0123456789abcdef
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export RUST_LOG=warn
CT=$CARGO_TARGET_DIR/release/command-trigger
GEN=$CARGO_TARGET_DIR/release/ct-bench
[ -x "$GEN" ] || GEN=$PWD/bench/target/release/ct-bench
BASE=${1:-}
WORK=$(mktemp -d /tmp/ct-state-bench.XXXXXX)
trap 'kill "$PID" 2>/dev/null || true; [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"' EXIT
PID=
# Every `once` adds a key; the default limit (100000) would end a long run early.
KEYS="--state-max-keys 10000000"

echo 'fn handle(req) { "ok\n" }' >"$WORK/w1.rhai"
echo 'fn handle(req) { state_incr("hits"); "ok\n" }' >"$WORK/incr.rhai"
# A new key per request, as webhook delivery ids are.
echo 'fn handle(req) { once(`d-${req.id}`, "1h"); "ok\n" }' >"$WORK/once.rhai"

# row BINARY LABEL SCRIPT WORKERS NOTE [SERVE-ARGS...]: starts a server, drives it, stops it.
row() {
    local bin=$1 label=$2 script=$3 workers=$4 note=$5 addr line
    shift 5
    rm -f "$WORK/state.redb"
    TOKEN_VALUE=$TOKEN "$bin" serve --script "$WORK/$script" --token-env TOKEN_VALUE \
        --listen 127.0.0.1:0 --print-addr --workers "$workers" "$@" \
        >"$WORK/addr" 2>"$WORK/log" &
    PID=$!
    for _ in $(seq 300); do [ -s "$WORK/addr" ] && break; sleep 0.05; done
    addr=$(head -n1 "$WORK/addr")
    if [ -z "$addr" ]; then
        echo "$label: the server printed no address within 15 s; its log:" >&2
        sed 's/^/  server: /' "$WORK/log" >&2
        kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true
        printf '| %s | 32 | - | - | - | - | did not start |\n' "$label"
        return
    fi
    line=$("$GEN" --addr "$addr" -c "${C:-32}" --duration "$DURATION" --send "$TOKEN x\n" --expect 'ok\n')
    echo "$label: $line" >&2
    kill "$PID"; wait "$PID" 2>/dev/null || true
    case $line in *" errors=0 "*) ;; *) sed 's/^/  server: /' "$WORK/log" >&2 ;; esac
    local rps p50 p99 errors
    for kv in $line; do
        case ${kv%%=*} in rps) rps=${kv#*=} ;; p50_us) p50=${kv#*=} ;; p99_us) p99=${kv#*=} ;;
            errors) errors=${kv#*=} ;; esac
    done
    printf '| %s | %s | %s | %.2f | %.2f | %s | %s |\n' "$label" "${C:-32}" "$rps" \
        "$(awk -v u="$p50" 'BEGIN{print u/1000}')" "$(awk -v u="$p99" 'BEGIN{print u/1000}')" \
        "$errors" "$note"
}

echo '| workload | c | req/s | p50 ms | p99 ms | errors | note |'
echo '|---|---:|---:|---:|---:|---:|---|'
# W1 before and after, alternating, so that a drift in the machine's load hits both alike.
for pair in $(seq "${W1_PAIRS:-3}"); do
    [ -n "$BASE" ] && row "$BASE" "W1, before ($pair)" w1.rhai 2 "--workers 2, build 37f81e4"
    row "$CT" "W1, this build ($pair)" w1.rhai 2 "--workers 2"
done
row "$CT" "state_incr, memory" incr.rhai 2 "--workers 2" $KEYS
row "$CT" "once, memory" once.rhai 2 "--workers 2" $KEYS
row "$CT" "state_incr, --state-file" incr.rhai 8 "--workers 8" $KEYS --state-file "$WORK/state.redb"
row "$CT" "once, --state-file" once.rhai 8 "--workers 8" $KEYS --state-file "$WORK/state.redb"
# One client: the latency of one request whose call commits, beside one that commits nothing.
C=1 row "$CT" "state_incr, memory" incr.rhai 2 "--workers 2" $KEYS
C=1 row "$CT" "state_incr, --state-file" incr.rhai 2 "--workers 2" $KEYS --state-file "$WORK/state.redb"

# One durable write: 4 KiB with O_DSYNC, 500 times, on the same file system as the state file.
start=$(date +%s%N)
dd if=/dev/zero of="$WORK/dsync" bs=4k count=500 oflag=dsync status=none
end=$(date +%s%N)
echo
echo "durable 4 KiB write (dd oflag=dsync, 500 writes in $WORK): $(( (end - start) / 500000 )) us each"
