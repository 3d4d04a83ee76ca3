#!/usr/bin/env bash
# The integration tests with every server they start running under valgrind memcheck.
# Prints the tests' summary and every memory error valgrind logged (none expected).
#
#   hardening/valgrind.sh [TEST FILTERS...]     (default: a representative set)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || apt-get install -y -qq valgrind >/dev/null
target=${VALGRIND_TARGET_DIR:-/tmp/command-trigger-valgrind}
logs=$target/logs
bin=$target/debug/command-trigger
# The tests start CARGO_BIN_EXE_command-trigger: put valgrind in front of the real binary.
# Without the file, cargo puts the real binary back.
rm -f "$bin" "$bin.real"
CARGO_TARGET_DIR=$target cargo build --tests --quiet
mv "$bin" "$bin.real"
cat >"$bin" <<WRAP
#!/bin/sh
exec valgrind -q --trace-children=no --log-file=$logs/%p.log "$bin.real" "\$@"
WRAP
chmod +x "$bin"
rm -rf "$logs" && mkdir -p "$logs"
filters=("$@")
[ ${#filters[@]} = 0 ] && filters=(core:: http:: live:: hardening::no_payload hardening::runaway
    hardening::commands_that hardening::every_wrong hardening::a_line hardening::a_chunked
    hardening::a_reply hardening::a_command)
tests=$(ls "$target"/debug/deps/integration-* | grep -v '\.d$' | head -1)
"$tests" --test-threads=2 "${filters[@]}" 2>&1 | grep -E "^test result|^    [a-z_]+::" || true
echo "server processes under memcheck: $(ls "$logs" | wc -l)"
if grep -lE "Invalid (read|write|free)|uninitialised|Conditional jump|Mismatched|overlap" "$logs"/*.log; then
    echo "FAIL: memory errors, see the logs above"
    exit 1
fi
echo "no memory errors"
