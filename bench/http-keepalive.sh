#!/usr/bin/env bash
# HTTP keep-alive rows (issue 7): command-trigger --framing http against adnanh's webhook, both
# driven by wrk with 32 keep-alive connections on 127.0.0.1, W1 and W2 as in run.sh.
#   bench/http-keepalive.sh            # needs wrk and webhook (apt-get install wrk webhook)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${BENCH_DURATION:-5s}
TOKEN=bench-token-0123456789abcdef
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/command-trigger

echo 'fn handle(req) { "ok\n" }' >"$WORK/w1.rhai"
echo 'fn handle(req) { exec(["/bin/true"]); "ok\n" }' >"$WORK/w2.rhai"
rule='"trigger-rule": {"match": {"type": "value", "value": "'$TOKEN'", "parameter": {"source": "header", "name": "X-Token"}}}'
cat >"$WORK/hooks.json" <<JSON
[
  {"id": "w1", "execute-command": "/bin/true", "response-message": "ok\n", $rule},
  {"id": "w2", "execute-command": "/bin/true", "include-command-output-in-response": true, $rule}
]
JSON
cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
LUA

# Prints "req/s errors" for one wrk run against URL.
drive() {
    local out
    out=$(wrk -t1 -c32 -d"$DURATION" -s "$WORK/post.lua" -H "X-Token: $TOKEN" "$1")
    local rps errors
    rps=$(awk '/Requests\/sec/ {print int($2)}' <<<"$out")
    errors=$(awk '/Non-2xx|Socket errors/ {n += $NF} END {print n + 0}' <<<"$out")
    echo "$rps $errors"
}

wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
        sleep 0.02
    done
}

echo "| server | workload | req/s (wrk -c32 keep-alive) | errors |"
echo "|---|---|---:|---:|"
for w in w1 w2; do
    workers=2; [ "$w" = w2 ] && workers=8
    RUST_LOG=warn TOKEN=$TOKEN "$BIN" serve --script "$WORK/$w.rhai" --token-env TOKEN \
        --listen 127.0.0.1:7401 --framing http --workers "$workers" 2>/dev/null &
    ct=$!
    wait_port 7401
    read -r ct_rps ct_err < <(drive "http://127.0.0.1:7401/")
    kill "$ct"; wait "$ct" 2>/dev/null || true
    webhook -hooks "$WORK/hooks.json" -ip 127.0.0.1 -port 7402 >/dev/null 2>&1 &
    wh=$!
    wait_port 7402
    read -r wh_rps wh_err < <(drive "http://127.0.0.1:7402/hooks/$w")
    kill "$wh"; wait "$wh" 2>/dev/null || true
    echo "| command-trigger --framing http | ${w^^} | $ct_rps | $ct_err |"
    echo "| webhook | ${w^^} | $wh_rps | $wh_err |"
    echo "| ratio | ${w^^} | $(awk -v a="$ct_rps" -v b="$wh_rps" 'BEGIN {printf "%.2f×", a / b}') | |"
done
