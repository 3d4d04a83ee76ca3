#!/usr/bin/env bash
# Local triggers (SPEC §13): how late `on_tick` runs over many ticks, and how long after a file
# changes `on_change` runs. Prints Markdown tables (BENCHMARKS.md, "Local triggers").
#
#   bench/local-triggers.sh                       # 60 ticks at 1s; 20 changes per debounce
#   TICKS=10 CHANGES=5 bench/local-triggers.sh    # quicker
#   BIN=target/release/command-trigger bench/local-triggers.sh
#
# Both handlers first run `date +%s%N`, so "handler ran" is when the script's first command
# ran: it includes one fork and exec (about a millisecond here), an upper bound of the start.
set -euo pipefail
cd "$(dirname "$0")/.."

TICKS=${TICKS:-60}
CHANGES=${CHANGES:-20}
BIN=${BIN:-target/debug/command-trigger}
[ -x "$BIN" ] || cargo build -q
scratch=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$scratch"
}
trap cleanup EXIT

cat > "$scratch/bench.rhai" <<'EOF'
fn handle(req) { "ok" }
fn on_tick(tick) {
    let now = exec(["date", "+%s%N"]).stdout;
    now.trim();
    log_warn(`BENCH tick ${tick.n} ${tick.at} ${now}`);
}
fn on_change(event) {
    let now = exec(["date", "+%s%N"]).stdout;
    now.trim();
    log_warn(`BENCH change ${event.path} ${now}`);
}
EOF

# Ticks: one server, --every 1s, for TICKS ticks.
RUST_LOG=warn "$BIN" serve --script "$scratch/bench.rhai" --insecure-no-token \
    --listen 127.0.0.1:0 --every 1s 2> "$scratch/ticks.log" > /dev/null &
pids+=($!)
tick_pid=$!

# File changes: one server per debounce, each change written once the previous was handled.
changes() {
    local debounce=$1 dir="$scratch/watch-$1"
    mkdir -p "$dir"
    echo 0 > "$dir/file"
    RUST_LOG=warn "$BIN" serve --script "$scratch/bench.rhai" --insecure-no-token \
        --listen 127.0.0.1:0 --print-addr --watch "$dir/file" --watch-debounce "$debounce" \
        2> "$scratch/change-$debounce.log" > "$scratch/addr-$debounce" &
    local pid=$!
    pids+=("$pid")
    python3 - "$dir/file" "$scratch/change-$debounce.log" "$CHANGES" "$debounce" <<'EOF'
import sys, time, statistics
path, log, count, debounce = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
time.sleep(1.0)  # the watcher is set up once the address is printed; be generous
lat = []
for i in range(count):
    seen = open(log).read().count("BENCH change")
    written = time.time_ns()
    with open(path, "w") as f:
        f.write(f"version {i}\n")
    deadline = time.time() + 30
    while open(log).read().count("BENCH change") == seen:
        if time.time() > deadline:
            sys.exit(f"no on_change within 30 s (debounce {debounce})")
        time.sleep(0.002)
    line = [l for l in open(log).read().splitlines() if "BENCH change" in l][-1]
    lat.append((int(line.split()[-1]) - written) / 1e6)
    time.sleep(0.2)
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"| {debounce} | {count} | {p(0.5):.1f} | {p(0.95):.1f} | {lat[-1]:.1f} | {statistics.mean(lat):.1f} |")
EOF
    kill "$pid"
}

echo "### File change to on_change (ms, from the write to the handler's first command)"
echo
echo "| --watch-debounce | changes | p50 | p95 | max | mean |"
echo "|---|---|---|---|---|---|"
for debounce in 0s 100ms 1s; do changes "$debounce"; done
echo

# Wait for the ticks (started before the change runs, so they overlap in time).
deadline=$((SECONDS + TICKS + 30))
while [ "$(grep -c 'BENCH tick' "$scratch/ticks.log" || true)" -lt "$TICKS" ]; do
    [ $SECONDS -lt $deadline ] || { echo "too few ticks" >&2; exit 1; }
    sleep 1
done
kill "$tick_pid"
python3 - "$scratch/ticks.log" "$TICKS" <<'EOF'
import sys, statistics, datetime
rows = [l.split() for l in open(sys.argv[1]) if "BENCH tick" in l][: int(sys.argv[2])]
def ns(at):  # 2026-12-05T11:25:51.065Z
    t = datetime.datetime.strptime(at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    return int(t.timestamp() * 1e9)
due = [ns(r[-2]) for r in rows]
ran = [int(r[-1]) for r in rows]
late = sorted((r - d) / 1e6 for r, d in zip(ran, due))
gaps = [(b - a) / 1e6 for a, b in zip(ran, ran[1:])]
drift = (ran[-1] - ran[0]) / 1e6 - 1000 * (len(ran) - 1)
print(f"### on_tick over {len(rows)} ticks of --every 1s")
print()
print("| figure | ms |")
print("|---|---|")
print(f"| lateness after the due time (`tick.at`), p50 / p95 / max | {late[len(late)//2]:.2f} / {late[int(0.95*len(late))]:.2f} / {late[-1]:.2f} |")
print(f"| interval between ticks, min / max (ideal 1000) | {min(gaps):.2f} / {max(gaps):.2f} |")
print(f"| jitter: standard deviation of the interval | {statistics.pstdev(gaps):.2f} |")
print(f"| drift: last tick − first − {len(ran)-1} s | {drift:.2f} |")
EOF
