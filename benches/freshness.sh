#!/usr/bin/env bash
# Freshness: how long after a business signal is sent it can be read in the
# REST API, while `bizsignal loadgen` keeps a steady load of business signals
# on the same server. See docs/benchmarks.md.
#
# A probe sends one span (OTLP/HTTP JSON, process `freshness-probe`, a run id
# of its own) every PAUSE seconds and polls GET /api/v1/runs/freshness-probe/<id>
# until it answers 200; it prints each probe's send-to-visible time and the
# percentiles. The probe's own costs (a curl per request, polling every
# POLL seconds) count against bizsignal, so the figures are upper bounds.
#
# Environment (defaults in brackets):
#   RATE [20000] business signals/s of background load   BATCH [200]
#   CONCURRENCY [8]   PROBES [100]   PAUSE [0.1]   POLL [0.005]
#   SKIP_BUILD [unset]   OUT [target/bench-freshness]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RATE=${RATE:-20000}
BATCH=${BATCH:-200}
CONCURRENCY=${CONCURRENCY:-8}
PROBES=${PROBES:-100}
PAUSE=${PAUSE:-0.1}
POLL=${POLL:-0.005}
OUT=${OUT:-$ROOT/target/bench-freshness}
BIN=$ROOT/target/release/bizsignal
mkdir -p "$OUT"
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_METRICS_ENDPOINT || true
if [ -z "${SKIP_BUILD:-}" ]; then cargo build --release --bin bizsignal; fi

wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

DATA=$(mktemp -d "$OUT/data.XXXXXX")
RUST_LOG=warn "$BIN" serve --otlp-grpc 127.0.0.1:15317 --otlp-http 127.0.0.1:15318 --http 127.0.0.1:19080 --data-dir "$DATA" 2>>"$OUT/bizsignal.log" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT
wait_port 15317; wait_port 15318; wait_port 19080

# Background load for longer than the probes take.
RPS=$((RATE / BATCH))
LOAD_S=$(awk -v n="$PROBES" -v p="$PAUSE" 'BEGIN { printf "%d", n * (p + 0.2) + 10 }')
"$BIN" loadgen --endpoint http://127.0.0.1:15317 --protocol grpc --concurrency "$CONCURRENCY" --batch "$BATCH" \
  --rps "$RPS" --duration "${LOAD_S}s" --business-ratio 1.0 --server-pid "$SERVER" >"$OUT/loadgen.txt" 2>&1 &
LOAD=$!
sleep 3 # let the load reach its rate before the first probe

tag=$(date +%s)
: >"$OUT/probes.txt"
for i in $(seq 1 "$PROBES"); do
  run="probe-$tag-$i"
  trace=$(printf '%032x' "$((tag * 1000 + i))")
  now=$(date +%s%N)
  body='{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"freshness-probe"}}]},"scopeSpans":[{"spans":[{"traceId":"'$trace'","spanId":"'$(printf '%016x' "$i")'","name":"probe","kind":1,"startTimeUnixNano":"'$now'","endTimeUnixNano":"'$now'","attributes":[{"key":"business.process.name","value":{"stringValue":"freshness-probe"}},{"key":"business.run.id","value":{"stringValue":"'$run'"}},{"key":"business.records.ok","value":{"intValue":"1"}}]}]}]}]}'
  start=$(date +%s%N)
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' --data-binary "$body" http://127.0.0.1:15318/v1/traces)
  [ "$code" = 200 ] || { echo "probe $i: export answered $code" >&2; exit 1; }
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:19080/api/v1/runs/freshness-probe/$run")" = 200 ]; do
    sleep "$POLL"
    if [ $(($(date +%s%N) - start)) -gt 30000000000 ]; then echo "probe $i: not visible after 30 s" >&2; exit 1; fi
  done
  echo $((($(date +%s%N) - start) / 1000)) >>"$OUT/probes.txt"
  sleep "$PAUSE"
done
wait "$LOAD" # the load outlasts the probes; its report covers the whole run

echo "background: $RATE business signals/s offered (loadgen --rps $RPS --batch $BATCH --concurrency $CONCURRENCY --business-ratio 1.0)"
grep -E "accepted/s|requests:|latency" "$OUT/loadgen.txt" | sed 's/^/  /'
sort -n "$OUT/probes.txt" | awk '{ v[NR] = $1 } END {
  n = NR
  printf "probes: %d, send-to-visible ms: p50=%.1f p90=%.1f p99=%.1f max=%.1f\n", n,
    v[int(n * 0.50 + 0.5)] / 1000, v[int(n * 0.90 + 0.5)] / 1000, v[int(n * 0.99 + 0.5)] / 1000, v[n] / 1000 }'
