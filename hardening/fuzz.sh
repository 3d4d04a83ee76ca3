#!/usr/bin/env bash
# The long fuzz runs of HARDENING.md: each target for 10 million executions, one after the
# other on one core, with the committed corpus as seeds and a scratch corpus in /tmp.
#
#   hardening/fuzz.sh [RUNS]        (needs nightly and `cargo install cargo-fuzz`)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
runs=${1:-10000000}
for target in framing auth tls; do
    work=/tmp/command-trigger-fuzz/$target
    mkdir -p "$work"
    SECONDS=0
    cargo +nightly fuzz run -O "$target" "$work" "corpus/$target" -- \
        -runs="$runs" -print_final_stats=1 2>&1 | grep -E "^(Done|stat::)|panicked|ERROR"
    echo "$target: $runs runs in $SECONDS s"
done
