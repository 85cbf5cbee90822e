#!/bin/sh
# Seeds the corpora (if not yet) and runs every fuzz target in turn for
# SECS seconds each (default 600) on one core; crashes land in artifacts/.
#   ./run-all.sh [SECS]
set -eu
cd "$(dirname "$0")"
secs=${1:-600}
cargo +nightly fuzz build
[ -f corpus/keys/root.der ] || cargo +nightly run --release --bin seed
for t in envelope receipt checkpoint config transfer bundle; do
    echo "== $t ($secs s)"
    cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 |
        grep -E '^(stat::|#[0-9]+.*DONE|==[0-9]+==|SUMMARY|.*panicked|artifact_prefix|Test unit)' || true
done
if find artifacts -type f | grep -q .; then
    find artifacts -type f
    echo "artifacts above: crashes, leaks, timeouts or slow units to look at"
    exit 1
fi
echo "no crash artifacts"
