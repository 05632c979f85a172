#!/usr/bin/env bash
# Runs every fuzz target for $FUZZ_SECONDS seconds each (default 60), one
# after the other, single process. Needs a nightly toolchain and cargo-fuzz:
#
#   rustup toolchain install nightly
#   cargo install cargo-fuzz --locked
#   FUZZ_SECONDS=240 fuzz/run.sh            # all targets
#   FUZZ_SECONDS=240 fuzz/run.sh config     # only the named targets
#
# New inputs go to a scratch corpus ($FUZZ_WORK/<target>, default
# fuzz/target/corpus-work), never into the committed seeds in fuzz/corpus/;
# crashes go to fuzz/artifacts/<target>/. The last libFuzzer stats line of
# each target (executions, exec/s, cov, ft) is printed in a summary at the end
# and the full logs are kept in $FUZZ_WORK/<target>.log.
set -euo pipefail

cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-60}"
rss="${FUZZ_RSS_MB:-2048}"
work="${FUZZ_WORK:-$PWD/target/corpus-work}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(otlp_protobuf otlp_json http_gzip classifier_rules config)
fi

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz --locked" >&2; exit 2; }
cargo "+$toolchain" fuzz build

status=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "$work/$t"
    log="$work/$t.log"
    echo "== $t: ${seconds}s (log: $log)"
    if cargo "+$toolchain" fuzz run "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb="$rss" -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result="FAILED (see $log and artifacts/$t/)"
        status=1
    fi
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    summary+=("$t: $result | $last")
done

echo
echo "== summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
exit $status
