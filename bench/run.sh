#!/usr/bin/env bash
# Benchmark command-trigger side by side with the tools it replaces, in one run on this machine,
# and print the results as Markdown (the tables and target ratios of BENCHMARKS.md).
#
#   bench/run.sh                 # every cell runs BENCH_DURATION (default 5s)
#   BENCH_DURATION=2s bench/run.sh
#
# Installs the peers from Debian packages (as root), builds command-trigger and the load generator
# with `cargo build --release`, starts each peer on 127.0.0.1 (the busybox netcat loop cannot bind
# one address: it listens on every interface), drives it with bench/ct-bench, stops it by PID.
# Beside the peers it measures the physical limits in the same run: the spawn ceiling
# (`ct-bench spawn`: posix_spawn + waitpid of /bin/true, nothing else) for W2, with free and
# with CPU-bound threads (the limit of `--pin-workers`, a W2 row of its own), the same spawns
# behind TCP (`ct-bench spawn-server`: accept, read, spawn, wait, answer; no script, no
# output captured), and redis PING keep-alive for keep-alive; W2 and keep-alive are printed as
# ratios to them.
# Raw generator lines go to stderr, so `bench/run.sh > table.md` keeps only the Markdown.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-5s}
# Both at the default (SPEC: --workers 8). W1 ran with 2 (one per core) until issue 16's fourth
# session: since the pool wakes its workers last-in-first-out, 8 are as fast for one connection
# per request and faster for keep-alive (BENCHMARKS.md).
WORKERS_W1=${BENCH_WORKERS_W1:-8}
WORKERS_W2=${BENCH_WORKERS_W2:-8}
TOKEN=bench-token-0123456789abcdef
BASE_PORT=${BENCH_BASE_PORT:-7300}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export RUST_LOG=warn

install_peers() {
    local missing=()
    local tool pkg
    for pair in busybox:busybox socat:socat ncat:ncat tcpserver:ucspi-tcp webhook:webhook \
        redis-server:redis-server redis-benchmark:redis-tools valgrind:valgrind; do
        tool=${pair%%:*} pkg=${pair#*:}
        command -v "$tool" >/dev/null || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" = 0 ] || { echo "run as root to install: ${missing[*]}" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

build() {
    cargo build --release --quiet
    cargo build --release --quiet --manifest-path bench/Cargo.toml
    CT=$CARGO_TARGET_DIR/release/command-trigger
    GEN=$CARGO_TARGET_DIR/release/ct-bench
    # The container image ships a static musl build: measure its footprint too, when the
    # target is installed.
    CT_MUSL=
    if rustup target list --installed 2>/dev/null | grep -qx "$MUSL"; then
        cargo build --release --quiet --target "$MUSL"
        CT_MUSL=$CARGO_TARGET_DIR/$MUSL/release/command-trigger
    fi
}

MUSL=x86_64-unknown-linux-musl

# The handlers every peer runs. The shell ones are what people write around a netcat: read the
# line, compare the token in the shell, answer.
write_handlers() {
    WORK=$(mktemp -d /tmp/ct-bench.XXXXXX)
    echo "$TOKEN" >"$WORK/token"
    echo 'fn handle(req) { "ok\n" }' >"$WORK/w1.rhai"
    echo 'fn handle(req) { exec(["/bin/true"]); "ok\n" }' >"$WORK/w2.rhai"
    write_certs
    cat >"$WORK/w1.sh" <<EOF
read -r tok rest
if [ "\$tok" = "$TOKEN" ]; then echo ok; else echo 'ERR unauthorized'; fi
EOF
    cat >"$WORK/w2.sh" <<EOF
read -r tok rest
if [ "\$tok" = "$TOKEN" ]; then /bin/true && echo ok; else echo 'ERR unauthorized'; fi
EOF
    # webhook always runs a command: W1 fires /bin/true and answers at once (the command runs
    # after the reply); W2 waits for /bin/true and answers with its (empty) output.
    local rule='"trigger-rule": {"match": {"type": "value", "value": "'$TOKEN'",
        "parameter": {"source": "header", "name": "X-Token"}}}'
    cat >"$WORK/hooks.json" <<EOF
[
  {"id": "w1", "execute-command": "/bin/true", "response-message": "ok\n", $rule},
  {"id": "w2", "execute-command": "/bin/true", "include-command-output-in-response": true, $rule}
]
EOF
}

# A CA and a server certificate for localhost, for the TLS rows (every TLS peer serves it).
write_certs() {
    local ssl="openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
    $ssl -x509 -days 2 -keyout "$WORK/ca.key" -out "$WORK/ca.crt" -subj /CN=bench-ca 2>/dev/null
    $ssl -keyout "$WORK/server.key" -out "$WORK/server.csr" -subj /CN=localhost 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$WORK/server.ext"
    openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" \
        -CAcreateserial -days 2 -extfile "$WORK/server.ext" -out "$WORK/server.crt" 2>/dev/null
}

PEER_PID=
PORT=$BASE_PORT

# Starts a peer in a session of its own, so its PID names its whole process group (the netcat
# loop's current nc, socat's forks); waits until the port is listening.
start_peer() {
    PORT=$((PORT + 1))
    local cmd=${1//@PORT@/$PORT}
    setsid bash -c "$cmd" </dev/null >"$WORK/peer.out" 2>"$WORK/peer.err" &
    PEER_PID=$!
    local hexport
    hexport=$(printf '%04X' "$PORT")
    for _ in $(seq 200); do
        grep -q ":$hexport 0\{8,32\}:0000 0A" /proc/net/tcp /proc/net/tcp6 && return
        sleep 0.02
    done
    echo "peer did not listen on $PORT: $cmd" >&2
    cat "$WORK/peer.err" >&2
    exit 1
}

stop_peer() {
    # The group may not exist yet if the peer is stopped right after start (before setsid).
    kill -TERM -- "-$PEER_PID" 2>/dev/null || kill -TERM "$PEER_PID" 2>/dev/null || true
    wait "$PEER_PID" 2>/dev/null || true
    kill -KILL -- "-$PEER_PID" 2>/dev/null || true
    PEER_PID=
}

cleanup() {
    [ -n "$PEER_PID" ] && stop_peer
    [ -n "${WORK:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT

# Starts command-trigger in the background and sets CT_PID and CT_ADDR from --print-addr.
start_ct() {
    start_ct_at 127.0.0.1:0 "$@"
}

# start_ct with another listener (tls://IP:PORT); CT_ADDR is its IP:PORT.
start_ct_at() {
    local listen=$1
    shift
    # Removed here, not only truncated by the redirection below: that happens in the child,
    # which a loaded machine may run after this shell has read the last server's address.
    rm -f "$WORK/ct.addr"
    setsid "$CT" serve --listen "$listen" --print-addr --token-file "$WORK/token" "$@" \
        </dev/null >"$WORK/ct.addr" 2>"$WORK/ct.err" &
    PEER_PID=$!
    for _ in $(seq 200); do
        CT_ADDR=$(head -n1 "$WORK/ct.addr" 2>/dev/null || true)
        CT_ADDR=${CT_ADDR#tls://}
        [ -n "$CT_ADDR" ] && return
        sleep 0.01
    done
    echo "command-trigger did not start:" >&2
    cat "$WORK/ct.err" >&2
    exit 1
}

ROWS=()
declare -A RESULT

# cell KEY PEER WORKLOAD C MODE NOTE -- GENERATOR-ARGS: runs one cell, keeps its line for the
# table and its figures in RESULT[KEY.rps] etc. for the ratios.
cell() {
    local key=$1 peer=$2 workload=$3 c=$4 mode=$5 note=$6
    shift 7
    local line
    line=$("$GEN" -c "$c" --duration "$DURATION" --mode "$mode" "$@")
    echo "$key: $line" >&2
    local kv
    for kv in $line; do RESULT[$key.${kv%%=*}]=${kv#*=}; done
    local ok=${RESULT[$key.ok]} errors=${RESULT[$key.errors]}
    local pct
    pct=$(awk -v e="$errors" -v o="$ok" 'BEGIN { printf "%.1f", (e + o) ? 100 * e / (e + o) : 0 }')
    # A cell of ours that failed whole: whether the server was still there, and what it said.
    if [ "$ok" = 0 ] && [ "$peer" = command-trigger ]; then
        local state=gone
        kill -0 "$PEER_PID" 2>/dev/null && state=alive
        echo "$key: every request failed; server $PEER_PID $state, listening:" \
            "$(ss -Hltn src "$CT_ADDR" 2>/dev/null | wc -l); its log:" >&2
        tail -n 20 "$WORK/ct.err" >&2
    fi
    ROWS+=("$(printf '| %s | %s | %s | %s | %s | %s | %s | %s (%s%%) | %s |' "$peer" "$workload" \
        "$c" "$mode" "${RESULT[$key.rps]}" "$(ms "${RESULT[$key.p50_us]}")" \
        "$(ms "${RESULT[$key.p99_us]}")" "$errors" "$pct" "$note")")
}

ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }

LINE_ARGS=(--send "$TOKEN ok\n" --expect 'ok\n')

# The four one-connection-per-request cells of a line-protocol peer started by CMD with @W@
# standing for the workload's handler; further arguments go to the generator.
line_peer() {
    local name=$1 cmd=$2 note=$3 w c
    shift 3
    for w in w1 w2; do
        start_peer "${cmd//@W@/$WORK/$w.sh}"
        for c in 1 32; do
            cell "$name.$w.c$c" "$name" "${w^^}" "$c" close "$note" -- \
                --addr "127.0.0.1:$PORT" "${LINE_ARGS[@]}" "$@"
        done
        stop_peer
    done
}

bench_shell_peers() {
    line_peer "netcat loop" \
        "while :; do busybox nc -l -p @PORT@ -e sh @W@; done" "listens on 0.0.0.0"
    line_peer socat "socat TCP-LISTEN:@PORT@,bind=127.0.0.1,reuseaddr,fork SYSTEM:'sh @W@'" ""
    # ncat closes the connection as soon as the client half-closes, before the handler answers:
    # its rows are driven without the half-close, plus one cell that shows the loss.
    line_peer ncat "ncat -l 127.0.0.1 @PORT@ --keep-open --sh-exec 'sh @W@'" \
        "client does not half-close" --no-half-close
    start_peer "ncat -l 127.0.0.1 @PORT@ --keep-open --sh-exec 'sh $WORK/w1.sh'"
    cell ncat.w1.c32.hc ncat W1 32 close "client half-closes (nc -N)" -- \
        --addr "127.0.0.1:$PORT" "${LINE_ARGS[@]}"
    stop_peer
    line_peer tcpserver "tcpserver -HRl0 127.0.0.1 @PORT@ sh @W@" "-HR: no DNS/ident lookups"
}

bench_webhook() {
    local w c
    for w in w1 w2; do
        start_peer "webhook -hooks $WORK/hooks.json -ip 127.0.0.1 -port @PORT@"
        local expect='ok\n'
        [ "$w" = w2 ] && expect=''
        for c in 1 32; do
            cell "webhook.$w.c$c" webhook "${w^^}" "$c" close "HTTP/1.0" -- \
                --addr "127.0.0.1:$PORT" --http --expect "$expect" \
                --send "POST /hooks/$w HTTP/1.0\r\nX-Token: $TOKEN\r\nContent-Length: 0\r\n\r\n"
        done
        stop_peer
    done
}

bench_command_trigger() {
    local w c workers
    for w in w1 w2; do
        workers=$WORKERS_W1
        [ "$w" = w2 ] && workers=$WORKERS_W2
        start_ct --script "$WORK/$w.rhai" --workers "$workers"
        for c in 1 32; do
            # Right before the cell compared with it: the machine is shared, and what else
            # runs on it drifts from minute to minute.
            if [ "$w.c$c" = w2.c32 ]; then
                bench_spawn_ceiling free
                bench_spawn_server
            fi
            cell "ct.$w.c$c" command-trigger "${w^^}" "$c" close "--workers $workers" -- \
                --addr "$CT_ADDR" "${LINE_ARGS[@]}"
        done
        stop_peer
        if [ "$w" = w2 ]; then
            start_ct --script "$WORK/w2.rhai" --workers "$workers" --pin-workers
            bench_spawn_ceiling pinned
            cell ct.w2pin.c32 command-trigger W2 32 close "--workers $workers --pin-workers" -- \
                --addr "$CT_ADDR" "${LINE_ARGS[@]}"
            stop_peer
        fi
        start_ct --script "$WORK/$w.rhai" --workers "$workers" --framing http
        cell "cthttp.$w.c32" "command-trigger" "${w^^}" 32 close \
            "--framing http, HTTP/1.0, --workers $workers" -- --addr "$CT_ADDR" --http \
            --expect 'ok\n' --send "POST /$w HTTP/1.0\r\nX-Token: $TOKEN\r\nContent-Length: 0\r\n\r\n"
        stop_peer
    done
    start_ct --script "$WORK/w1.rhai" --workers "$WORKERS_W1" --keep-alive
    cell ct.ka.c32 command-trigger W1 32 keep-alive "--keep-alive --workers $WORKERS_W1" -- \
        --addr "$CT_ADDR" "${LINE_ARGS[@]}"
    stop_peer
    # Right after the cell compared with it (as the spawn ceiling before W2): this VM's speed
    # moves by ~20% from minute to minute, redis's and ours together.
    bench_redis
}

bench_redis() {
    # Protected mode refuses clients from 127.0.0.2 and up (the generator's source addresses);
    # the server is bound to 127.0.0.1 only.
    start_peer "redis-server --bind 127.0.0.1 --port @PORT@ --save '' --appendonly no \
        --protected-mode no"
    local before after
    before=$(cpu_ticks "$PEER_PID")
    cell redis.ka.c32 redis-server PING 32 keep-alive "the ceiling" -- \
        --addr "127.0.0.1:$PORT" --send 'PING\r\n' --expect '+PONG\r\n'
    after=$(cpu_ticks "$PEER_PID")
    REDIS_CPU=$(awk -v t=$((after - before)) 'BEGIN { printf "%.2f", t / 100 }')
    REDIS_BENCHMARK=$(redis-benchmark -p "$PORT" -c 32 -n 300000 -t ping_inline -q 2>/dev/null |
        tr '\r' '\n' | awk '/requests per second/ { print $2 }' | tail -n1)
    stop_peer
}

# The spawn ceiling: `ct-bench spawn` posix_spawns /bin/true and waits for it, back to back,
# from N threads, and does nothing else: the most processes per second this machine starts,
# the limit of W2 (one /bin/true per request). Taken with as many threads as cores and as W2
# has workers; the higher is the ceiling W2 is compared with. Run right before W2 c=32.
# `pinned`: each thread bound to one CPU, as `--pin-workers` binds the workers, the ceiling
# of that row; SPAWN_CEILING_ANY is the highest of all four, free or bound.
bench_spawn_ceiling() {
    local how=$1 threads line kv key pin=() note="posix_spawn + waitpid only: the W2 limit"
    [ "$how" = pinned ] && pin=(--pin) note="each thread bound to a CPU: the --pin-workers limit"
    local ceiling=0
    for threads in $(nproc) "$WORKERS_W2"; do
        key=spawn.$how.t$threads
        line=$("$GEN" spawn "$threads" "$DURATION" /bin/true "${pin[@]}" </dev/null)
        echo "$key: $line" >&2
        for kv in $line; do RESULT[$key.${kv%%=*}]=${kv#*=}; done
        local rate=${RESULT[$key.spawns_per_s]}
        ROWS+=("$(printf '| spawn ceiling | /bin/true | %s | %s threads%s | %s | | | | %s |' \
            "$threads" "$threads" "${pin[*]:+, bound}" "$rate" "$note")")
        if [ "$rate" -gt "$ceiling" ]; then ceiling=$rate; fi
    done
    case $how in
        free) SPAWN_CEILING=$ceiling ;;
        pinned) SPAWN_CEILING_PINNED=$ceiling ;;
    esac
    SPAWN_CEILING_ANY=$(( ${SPAWN_CEILING:-0} > ${SPAWN_CEILING_PINNED:-0} ?
        ${SPAWN_CEILING:-0} : ${SPAWN_CEILING_PINNED:-0} ))
}

# The spawn ceiling with the network in it: `ct-bench spawn-server` accepts, reads the line,
# posix_spawns /bin/true, waits, answers and closes, from as many threads as cores and as W2
# has workers; the higher is SPAWN_SERVER. What W2 costs beyond the ceiling and this reference
# does not is command-trigger's own (the script, the captured output, the event loop). Run
# while the W2 server waits idle, whose PEER_PID is kept.
bench_spawn_server() {
    local ct_pid=$PEER_PID threads key rate best=0
    for threads in $(nproc) "$WORKERS_W2"; do
        key=spawnsrv.t$threads
        start_peer "'$GEN' spawn-server $threads @PORT@ /bin/true"
        cell "$key" "ct-bench spawn-server" W2 32 close \
            "$threads threads: TCP + posix_spawn + waitpid only" -- \
            --addr "127.0.0.1:$PORT" "${LINE_ARGS[@]}"
        stop_peer
        rate=${RESULT[$key.rps]}
        if [ "$rate" -gt "$best" ]; then best=$rate; fi
    done
    SPAWN_SERVER=$best
    PEER_PID=$ct_pid
}

# TLS 1.3, ECDSA P-256 certificate; the generator runs a rustls client on each of its sockets.
bench_tls() {
    local TLS_GEN=(--tls "$WORK/ca.crt" --servername localhost)
    local tls=(--tls-cert "$WORK/server.crt" --tls-key "$WORK/server.key")
    start_ct_at "tls://127.0.0.1:0" --script "$WORK/w1.rhai" --workers "$WORKERS_W1" "${tls[@]}"
    cell ct.tls.c32 command-trigger W1 32 close "TLS, a full handshake per request" -- \
        --addr "$CT_ADDR" "${LINE_ARGS[@]}" "${TLS_GEN[@]}"
    stop_peer
    start_ct_at "tls://127.0.0.1:0" --script "$WORK/w1.rhai" --workers "$WORKERS_W1" \
        --keep-alive "${tls[@]}"
    cell ct.tlska.c32 command-trigger W1 32 keep-alive "TLS --keep-alive" -- \
        --addr "$CT_ADDR" "${LINE_ARGS[@]}" "${TLS_GEN[@]}"
    stop_peer
    start_peer "socat OPENSSL-LISTEN:@PORT@,bind=127.0.0.1,reuseaddr,fork,cert=$WORK/server.crt,\
key=$WORK/server.key,verify=0 SYSTEM:'sh $WORK/w1.sh'"
    cell socat.tls.c32 "socat OPENSSL-LISTEN" W1 32 close "fork" -- \
        --addr "127.0.0.1:$PORT" "${LINE_ARGS[@]}" "${TLS_GEN[@]}"
    stop_peer
    start_peer "ncat -l 127.0.0.1 @PORT@ --keep-open --ssl --ssl-cert $WORK/server.crt \
--ssl-key $WORK/server.key --sh-exec 'sh $WORK/w1.sh'"
    cell ncat.tls.c32 "ncat --ssl" W1 32 close "client does not half-close" -- \
        --addr "127.0.0.1:$PORT" "${LINE_ARGS[@]}" "${TLS_GEN[@]}" --no-half-close
    stop_peer
    start_peer "webhook -hooks $WORK/hooks.json -ip 127.0.0.1 -port @PORT@ -secure \
-cert $WORK/server.crt -key $WORK/server.key"
    cell webhook.tls.c32 "webhook -secure" W1 32 close "HTTPS, HTTP/1.0" -- \
        --addr "127.0.0.1:$PORT" --http --expect 'ok\n' "${TLS_GEN[@]}" \
        --send "POST /hooks/w1 HTTP/1.0\r\nX-Token: $TOKEN\r\nContent-Length: 0\r\n\r\n"
    stop_peer
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# "anon N + file N": private memory, and pages of the binary and libraries (shared, page cache).
rss_split() {
    awk '/^Rss(Anon|File):/ { printf "%s%s %s", sep, tolower(substr($1, 4, 4)), $2; sep = " + " }' \
        "/proc/$1/status"
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# Idle RSS just after start, and with 10,000 idle connections open: the growth divided by the
# connections the server holds (its open descriptors beyond the idle ones).
bench_memory() {
    local ct=$1 tag=$2
    ulimit -n "$(ulimit -Hn)"
    CT=$ct start_ct --script "$WORK/w1.rhai" --workers "$WORKERS_W1" --max-connections 20000 \
        --read-timeout 300s
    # Read once the server has been idle for a whole second: it unmaps its code after the first
    # quiet second (src/footprint.rs), about 1 s after the address is printed, and a reading at
    # 1 s fell either side of that.
    sleep 2
    IDLE_RSS[$tag]=$(rss_kib "$PEER_PID")
    IDLE_SPLIT[$tag]=$(rss_split "$PEER_PID")
    local idle_fds held=10000 fds=0 last=-1
    idle_fds=$(fd_count "$PEER_PID")
    "$GEN" --addr "$CT_ADDR" --mode hold -c "$held" --duration 300s >"$WORK/hold.out" &
    local hold_pid=$!
    for _ in $(seq 600); do
        grep -q held= "$WORK/hold.out" && break
        sleep 0.1
    done
    # Settled once two looks a second apart agree.
    for _ in $(seq 30); do
        fds=$(fd_count "$PEER_PID")
        [ "$fds" = "$last" ] && break
        last=$fds
        sleep 1
    done
    HELD_RSS[$tag]=$(rss_kib "$PEER_PID")
    HELD_CONNS[$tag]=$((fds - idle_fds))
    echo "hold $tag: $(cat "$WORK/hold.out"), server holds ${HELD_CONNS[$tag]}" >&2
    kill "$hold_pid"
    wait "$hold_pid" 2>/dev/null || true
    stop_peer
    PER_CONN[$tag]=$(awk -v a="${IDLE_RSS[$tag]}" -v b="${HELD_RSS[$tag]}" \
        -v n="${HELD_CONNS[$tag]}" \
        'BEGIN { printf "%.2f", n ? (b - a) / n : 0 }')
}

fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 | wc -l; }

bench_binary() {
    local ct=$1 tag=$2
    cp "$ct" "$WORK/ct-stripped"
    strip "$WORK/ct-stripped"
    BINARY_SIZE[$tag]=$(stat -c %s "$WORK/ct-stripped")
    STARTUP[$tag]=$("$GEN" startup 21 "$ct" serve --listen 127.0.0.1:0 --print-addr \
        --token-file "$WORK/token" --script "$WORK/w1.rhai" 2>/dev/null)
    STARTUP_MS[$tag]=$(echo "${STARTUP[$tag]}" | sed 's/.*median=\([0-9.]*\).*/\1/')
}

declare -A IDLE_RSS IDLE_SPLIT HELD_RSS HELD_CONNS PER_CONN BINARY_SIZE STARTUP STARTUP_MS

bench_footprint() {
    bench_binary "$CT" glibc
    bench_memory "$CT" glibc
    if [ -n "$CT_MUSL" ]; then
        bench_binary "$CT_MUSL" musl
        bench_memory "$CT_MUSL" musl
    fi
}

footprint_tags() { echo glibc; [ -n "$CT_MUSL" ] && echo musl; true; }
footprint_header() {
    local out="" tag
    for tag in $(footprint_tags); do out+="${out:+ | }$tag"; done
    echo "$out"
}
footprint_row() {
    local -n values=$2
    local out="" tag
    for tag in $(footprint_tags); do out+="${out:+ | }${values[$tag]}"; done
    echo "| $1 | $out |"
}

# Cut (not rounded) to three decimals: every ratio is held to a "≥" target, and a rounded 0.845
# printed as 0.85 passed one.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b ? int(1000 * a / b) / 1000 : 0 }'; }
verdict() { awk -v v="$1" -v t="$2" -v dir="$3" \
    'BEGIN { print ((dir == "ge" ? v >= t : v <= t) ? "met" : "**missed**") }'; }

print_tables() {
    echo "| peer | workload | c | mode | req/s | p50 ms | p99 ms | errors | note |"
    echo "|---|---|---|---|---:|---:|---:|---:|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "| command-trigger footprint | $(footprint_header) |"
    echo "|---|$(footprint_header | sed 's/[^|]*/---:/g')|"
    footprint_row "idle RSS 2 s after start (KiB)" IDLE_RSS
    footprint_row "RSS split (KiB)" IDLE_SPLIT
    footprint_row "idle connections held" HELD_CONNS
    footprint_row "RSS with them (KiB)" HELD_RSS
    footprint_row "KiB per idle connection" PER_CONN
    footprint_row "stripped binary (bytes)" BINARY_SIZE
    footprint_row "start to listening, median of 21 (ms)" STARTUP_MS
    echo
    echo "Generator check: redis PING keep-alive c=32 driven by ct-bench at" \
        "${RESULT[redis.ka.c32.rps]} req/s using ${RESULT[redis.ka.c32.cpu_s]} CPU-s in" \
        "${RESULT[redis.ka.c32.elapsed_s]} s (redis-server used $REDIS_CPU CPU-s);" \
        "redis-benchmark -c 32 -t ping_inline: $REDIS_BENCHMARK req/s."
    echo
    echo "Limits in the same run: W2 c=32 is $(ratio "${RESULT[ct.w2.c32.rps]}" "$SPAWN_CEILING")×" \
        "the spawn ceiling ($SPAWN_CEILING spawns/s); W2 --pin-workers is" \
        "$(ratio "${RESULT[ct.w2pin.c32.rps]}" "$SPAWN_CEILING_PINNED")× the ceiling with bound" \
        "threads ($SPAWN_CEILING_PINNED/s) and $(ratio "${RESULT[ct.w2pin.c32.rps]}" \
        "$SPAWN_CEILING_ANY")× the highest of the four ($SPAWN_CEILING_ANY/s); the spawns" \
        "behind TCP (ct-bench spawn-server, $SPAWN_SERVER/s) reach" \
        "$(ratio "$SPAWN_SERVER" "$SPAWN_CEILING")× the ceiling, and W2 is" \
        "$(ratio "${RESULT[ct.w2.c32.rps]}" "$SPAWN_SERVER")× them; W1 keep-alive" \
        "c=32 is $(ratio "${RESULT[ct.ka.c32.rps]}" "${RESULT[redis.ka.c32.rps]}")× redis PING" \
        "keep-alive."
    echo
    print_targets
}

print_targets() {
    local r1 rka r2t r2pt r2w r2s r2p e1 p99ka
    r1=$(ratio "${RESULT[ct.w1.c32.rps]}" "${RESULT[webhook.w1.c32.rps]}")
    e1=${RESULT[ct.w1.c32.errors]}
    rka=$(ratio "${RESULT[ct.ka.c32.rps]}" "${RESULT[redis.ka.c32.rps]}")
    p99ka=$(ms "${RESULT[ct.ka.c32.p99_us]}")
    r2s=$(ratio "${RESULT[ct.w2.c32.rps]}" "$SPAWN_CEILING")
    r2p=$(ratio "${RESULT[ct.w2pin.c32.rps]}" "$SPAWN_CEILING_PINNED")
    r2t=$(ratio "${RESULT[ct.w2.c32.rps]}" "${RESULT[tcpserver.w2.c32.rps]}")
    r2pt=$(ratio "${RESULT[ct.w2pin.c32.rps]}" "${RESULT[tcpserver.w2.c32.rps]}")
    r2w=$(ratio "${RESULT[ct.w2.c32.rps]}" "${RESULT[webhook.w2.c32.rps]}")
    local tag
    echo "| target (c=32) | measured | verdict |"
    echo "|---|---:|---|"
    echo "| W1 per-request ≥ 2× webhook HTTP/1.0, 0 errors | ${r1}×, $e1 errors |" \
        "$( [ "$e1" = 0 ] && verdict "$r1" 2 ge || echo '**missed**') |"
    echo "| W1 keep-alive ≥ 0.6× redis PING keep-alive | ${rka}× | $(verdict "$rka" 0.6 ge) |"
    echo "| W1 keep-alive p99 ≤ 1 ms | $p99ka ms | $(verdict "$p99ka" 1 le) |"
    echo "| W2 ≥ 0.85× the spawn ceiling ($SPAWN_CEILING/s) | ${r2s}× |" \
        "$(verdict "$r2s" 0.85 ge) |"
    echo "| (reference) W2 against the spawns behind TCP (spawn-server $SPAWN_SERVER/s," \
        "$(ratio "$SPAWN_SERVER" "$SPAWN_CEILING")× the ceiling) |" \
        "$(ratio "${RESULT[ct.w2.c32.rps]}" "$SPAWN_SERVER")× | no target |"
    echo "| W2 --pin-workers ≥ 0.85× the ceiling with bound threads ($SPAWN_CEILING_PINNED/s)" \
        "| ${r2p}× | $(verdict "$r2p" 0.85 ge) |"
    echo "| W2 ≥ 2.2× tcpserver | ${r2t}× | $(verdict "$r2t" 2.2 ge) |"
    echo "| W2 --pin-workers ≥ 2.2× tcpserver | ${r2pt}× | $(verdict "$r2pt" 2.2 ge) |"
    echo "| W2 ≥ 1.2× webhook (include-command-output-in-response) | ${r2w}× |" \
        "$(verdict "$r2w" 1.2 ge) |"
    for tag in $(footprint_tags); do
        footprint_targets "$tag"
    done
    print_tls_targets
    echo
    echo "Same protocol as webhook (command-trigger --framing http, HTTP/1.0, c=32):" \
        "W1 $(ratio "${RESULT[cthttp.w1.c32.rps]}" "${RESULT[webhook.w1.c32.rps]}")×," \
        "W2 $(ratio "${RESULT[cthttp.w2.c32.rps]}" "${RESULT[webhook.w2.c32.rps]}")× webhook."
}

print_tls_targets() {
    local rw rs rn rka
    rw=$(ratio "${RESULT[ct.tls.c32.rps]}" "${RESULT[webhook.tls.c32.rps]}")
    rs=$(ratio "${RESULT[ct.tls.c32.rps]}" "${RESULT[socat.tls.c32.rps]}")
    rn=$(ratio "${RESULT[ct.tls.c32.rps]}" "${RESULT[ncat.tls.c32.rps]}")
    rka=$(ratio "${RESULT[ct.tlska.c32.rps]}" "${RESULT[ct.ka.c32.rps]}")
    echo "| TLS 1.3 per-request ≥ 1.5× webhook -secure (HTTPS) | ${rw}× | $(verdict "$rw" 1.5 ge) |"
    echo "| TLS 1.3 per-request ≥ 5× socat OPENSSL-LISTEN | ${rs}× | $(verdict "$rs" 5 ge) |"
    echo "| TLS 1.3 per-request ≥ 5× ncat --ssl | ${rn}× | $(verdict "$rn" 5 ge) |"
    echo "| TLS keep-alive ≥ 0.7× plain keep-alive | ${rka}× | $(verdict "$rka" 0.7 ge) |"
}

footprint_targets() {
    # The static musl build (the image) has no shared libraries to map: ≤ 1 MiB.
    local tag=$1 mib=3 held_ok=met
    [ "$tag" = musl ] && mib=1
    local rss=${IDLE_RSS[$tag]} per=${PER_CONN[$tag]} held=${HELD_CONNS[$tag]}
    echo "| idle RSS ≤ $mib MiB ($tag) | $rss KiB | $(verdict "$rss" $((mib * 1024)) le) |"
    [ "$held" -ge 10000 ] || held_ok="**missed** (held $held)"
    echo "| 10,000 idle connections at ≤ 4 KiB each ($tag) | $held held, $per KiB each |" \
        "$( [ "$held_ok" = met ] && verdict "$per" 4 le || echo "$held_ok") |"
    # The target is the image's binary (the glibc size is in the footprint table).
    if [ "$tag" = musl ]; then
        echo "| stripped static binary ≤ 5 MB (issue 12) | ${BINARY_SIZE[$tag]} B |" \
            "$(verdict "${BINARY_SIZE[$tag]}" 5000000 le) |"
    fi
    echo "| start to listening ≤ 5 ms ($tag) | ${STARTUP_MS[$tag]} ms |" \
        "$(verdict "${STARTUP_MS[$tag]}" 5 le) |"
}

main() {
    install_peers
    build
    write_handlers
    echo "bench: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)," \
        "kernel $(uname -r), each cell $DURATION, RUST_LOG=$RUST_LOG, load before:" \
        "$(cut -d' ' -f1-3 /proc/loadavg)" >&2
    bench_footprint
    bench_command_trigger
    bench_tls
    bench_webhook
    bench_shell_peers
    echo "bench: load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    print_tables
}

main "$@"
