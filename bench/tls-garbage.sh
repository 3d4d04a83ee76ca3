#!/usr/bin/env bash
# What a client sending garbage costs the server, on a plain port and on a TLS port (issue 12:
# garbage to a TLS port must cost no more than to a plain one). The same flood
# (hardening/flood.py garbage: clients sending random bytes and over-long lines, reconnecting)
# runs against each; the server's CPU time (/proc, user + system) is divided by the connections
# the flood made, whether they ended in a reply or a reset.
#
#   bench/tls-garbage.sh [SECONDS] [CLIENTS]     # needs target/release/command-trigger, openssl
#
# Prints one line per port.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${1:-5}
CLIENTS=${2:-50}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export RUST_LOG=warn
CT=$CARGO_TARGET_DIR/release/command-trigger
WORK=$(mktemp -d /tmp/ct-tls-garbage.XXXXXX)
PID=
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT

echo bench-token-0123456789abcdef >"$WORK/token"
echo 'fn handle(req) { "ok\n" }' >"$WORK/w1.rhai"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$WORK/server.key" -out "$WORK/server.crt" -subj /CN=localhost 2>/dev/null

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# flood.py's stats line: connections that ended normally plus those cut by a reset.
attempts() { tr ' ' '\n' | awk -F= '$1 == "connections" || $1 == "errors" { n += $2 } END { print n + 0 }'; }

for kind in plain tls; do
    listen=127.0.0.1:0
    tls=()
    if [ "$kind" = tls ]; then
        listen=tls://127.0.0.1:0
        tls=(--tls-cert "$WORK/server.crt" --tls-key "$WORK/server.key")
    fi
    "$CT" serve --listen "$listen" --print-addr --token-file "$WORK/token" \
        --script "$WORK/w1.rhai" "${tls[@]}" </dev/null >"$WORK/addr" 2>"$WORK/err" &
    PID=$!
    addr=
    for _ in $(seq 200); do
        addr=$(head -n1 "$WORK/addr" 2>/dev/null || true)
        [ -n "$addr" ] && break
        sleep 0.02
    done
    [ -n "$addr" ] || { cat "$WORK/err" >&2; exit 1; }
    before=$(cpu_ticks "$PID")
    stats=$(python3 hardening/flood.py garbage "${addr#tls://}" "$SECONDS_EACH" "$CLIENTS" | grep '^stats')
    after=$(cpu_ticks "$PID")
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
    n=$(echo "$stats" | attempts)
    awk -v kind="$kind" -v t=$((after - before)) -v n="$n" -v stats="$stats" 'BEGIN {
        printf "%s: %d connections in %s s, server CPU %.2f s, %.1f µs per connection (%s)\n",
            kind, n, '"$SECONDS_EACH"', t / 100, n ? t * 1e4 / n : 0, stats }'
done
