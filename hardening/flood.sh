#!/usr/bin/env bash
# The floods of HARDENING.md at full length (10 s each, one at a time) against a release build,
# printing the figures: legitimate requests served and failed, the slowest, the server's peak
# RSS, and what the attackers did. `cargo test` runs the same tests for 3 s on the debug build.
#
#   hardening/flood.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export HARDENING_FLOOD_SECONDS=${1:-10}
cargo build --release --quiet
export HARDENING_BINARY="${CARGO_TARGET_DIR:-$PWD/target}/release/command-trigger"
cargo test --test integration -- --test-threads=1 --nocapture \
    hardening::ten_thousand hardening::garbage hardening::a_connect_reset hardening::slowloris \
    2>&1 | grep -E "^(flood|test |test result)"
