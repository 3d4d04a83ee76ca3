#!/usr/bin/env bash
# Real network faults: the server and its clients on two "hosts" (network namespaces joined by a
# veth pair), with loss, delay and reordering from netem, and the link cut mid-request.
# Passes when every reply is complete or its client saw a clean failure, and the server serves
# again (and holds no connection) once the link is back.
#
#   hardening/netem.sh [BINARY]      (root; BINARY defaults to a fresh debug build)
#
# Skips (exit 0, with the reason) only when network namespaces cannot be made here.
set -euo pipefail
cd "$(dirname "$0")/.."
here=hardening

if [ "$(id -u)" != 0 ]; then
    echo "SKIP netem: needs root for ip netns"
    exit 0
fi
if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    if command -v apt-get >/dev/null; then
        apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
    fi
fi

binary=${1:-}
if [ -z "$binary" ]; then
    cargo build --quiet
    binary="${CARGO_TARGET_DIR:-target}/debug/command-trigger"
fi
binary=$(realpath "$binary")

id=$$
srv=ct-hz-s-$id
cli=ct-hz-c-$id
work=$(mktemp -d)
server_pid=
tunem_pid=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    [ -n "$tunem_pid" ] && kill "$tunem_pid" 2>/dev/null && wait "$tunem_pid" 2>/dev/null
    ip netns del "$srv" 2>/dev/null || true
    ip netns del "$cli" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

if ! reason=$(ip netns add "$srv" 2>&1); then
    echo "SKIP netem: network namespaces are unavailable: $reason"
    exit 0
fi
ip netns add "$cli"
srv_if=hzs$id cli_if=hzc$id
for ns in "$srv" "$cli"; do ip -n "$ns" link set lo up; done

# The "hosts": a veth pair with netem on both ends, or, on a kernel without sch_netem, two TUN
# devices bridged by hardening/tunem.py, which drops, delays and reorders the same way.
if ip netns exec "$srv" tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
    ip netns exec "$srv" tc qdisc del dev lo root
    mode=netem

    ip link add "$srv_if" type veth peer name "$cli_if"
    ip link set "$srv_if" netns "$srv"
    ip link set "$cli_if" netns "$cli"
    ip -n "$srv" addr add 10.200.0.1/24 dev "$srv_if"
    ip -n "$cli" addr add 10.200.0.2/24 dev "$cli_if"
else
    mode=tunem

    echo "0 0 0" >"$work/faults"
    python3 "$here/tunem.py" "$srv_if" "$cli_if" "$work/faults" >"$work/tunem.out" &
    tunem_pid=$!
    for _ in $(seq 50); do grep -q ready "$work/tunem.out" 2>/dev/null && break; sleep 0.1; done
    ip link set "$srv_if" netns "$srv"
    ip link set "$cli_if" netns "$cli"
    ip -n "$srv" addr add 10.200.0.1 peer 10.200.0.2 dev "$srv_if"
    ip -n "$cli" addr add 10.200.0.2 peer 10.200.0.1 dev "$cli_if"
fi
ip -n "$srv" link set "$srv_if" up
ip -n "$cli" link set "$cli_if" up
echo "-- two namespaces joined by $mode ($srv_if <-> $cli_if)"

faults() { # LOSS% DELAY_MS REORDER%, or "off"
    if [ "$mode" = tunem ]; then
        if [ "$1" = off ]; then echo "0 0 0"; else echo "$1 $2 $3"; fi >"$work/faults.new"
        mv "$work/faults.new" "$work/faults"
        sleep 1.2 # tunem.py re-reads the file every second
        return
    fi
    local pair ns dev
    for pair in "$srv:$srv_if" "$cli:$cli_if"; do
        ns=${pair%%:*} dev=${pair#*:}
        if [ "$1" = off ]; then
            ip netns exec "$ns" tc qdisc del dev "$dev" root
        else
            ip netns exec "$ns" tc qdisc add dev "$dev" root netem loss "$1%" delay "$2ms" \
                reorder "$3%"
        fi
    done
}

# Each reply is N bytes of x then END, so the client can tell complete from cut.
cat >"$work/handler.rhai" <<'EOF'
fn handle(req) {
    let n = parse_int(req.payload);
    let body = "";
    body.pad(n, 'x');
    body + "\nEND\n"
}
EOF
token=netem-token-0123456789abcdef
TOKEN=$token RUST_LOG=info ip netns exec "$srv" "$binary" serve --script "$work/handler.rhai" \
    --token-env TOKEN --listen 10.200.0.1:9000 --print-addr --read-timeout 3s \
    --max-connections 200 >"$work/addr" 2>"$work/log" &
server_pid=$!
for _ in $(seq 100); do [ -s "$work/addr" ] && break; sleep 0.1; done
[ -s "$work/addr" ] || { echo "FAIL netem: the server did not start"; cat "$work/log"; exit 1; }
addr=$(head -1 "$work/addr")

client() { ip netns exec "$cli" python3 "$here/netclient.py" "$@"; }
fail() {
    echo "FAIL netem: $1"
    tail -20 "$work/log"
    exit 1
}

client probe "$addr" "$token" >/dev/null || fail "no reply over a clean link"

echo "-- loss 5%, delay 50ms, reorder 10% both ways: 40 requests of 64 KiB, 8 at a time"
faults 5 50 10
started=$SECONDS
client lossy "$addr" "$token" 40 8 65536 || fail "a reply was cut short without an error"
echo "   took $((SECONDS - started)) s"
if [ "$mode" = tunem ]; then
    kill -USR1 "$tunem_pid"
    sleep 0.2
    echo "   tunem.py $(grep stats "$work/tunem.out" | tail -1)"
fi
faults off

echo "-- the link cut for 4 s mid-reply, and for 6 s mid-request (read timeout 3 s)"
client cut "$addr" "$token" "$cli_if" || fail "a reply was cut short without an error"

echo "-- after the faults: the server serves again and holds no connection"
client probe "$addr" "$token" || fail "the server does not serve after the faults"
kill -0 "$server_pid" 2>/dev/null || fail "the server died"
held=
for _ in $(seq 100); do
    held=$(ip netns exec "$srv" ss -Htn state established '( sport = :9000 )' | wc -l)
    [ "$held" = 0 ] && break
    sleep 0.2
done
[ "$held" = 0 ] || fail "the server still holds $held connection(s) 20 s after the faults"
rss=$(awk '/VmHWM/ {print $2}' "/proc/$server_pid/status")
echo "PASS netem: no silent truncation, the server recovered; peak RSS ${rss} kB"
