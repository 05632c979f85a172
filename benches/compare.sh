#!/usr/bin/env bash
# Runs bizsignal and rotel (blackhole exporter) one after the other under the
# same `bizsignal loadgen` load on this machine, REPS times per scenario, and
# prints each one's server CPU seconds per million accepted spans, their
# medians and the ratio. See docs/benchmarks.md.
#
# Environment (defaults in brackets):
#   REPS [3]  DURATION [10s]  CONCURRENCY [8]  BATCH [200]
#   SCENARIOS ["mixed:0.1:100 business:1.0:20"]  (name:business ratio:requests/s)
#   PROTOCOL [grpc]  SIGNAL [traces]
#   SKIP_BUILD [unset]  OUT [target/bench-compare]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REPS=${REPS:-3}
DURATION=${DURATION:-10s}
CONCURRENCY=${CONCURRENCY:-8}
BATCH=${BATCH:-200}
SCENARIOS=${SCENARIOS:-"mixed:0.1:100 business:1.0:20"}
PROTOCOL=${PROTOCOL:-grpc}
SIGNAL=${SIGNAL:-traces}
OUT=${OUT:-$ROOT/target/bench-compare}
VENV=$ROOT/target/rotel-venv
BIN=$ROOT/target/release/bizsignal
mkdir -p "$OUT"
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_METRICS_ENDPOINT || true

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet rotel
fi
ROTEL=$("$VENV/bin/python" -c 'import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')
[ -x "$ROTEL" ] || { echo "rotel-agent not found at $ROTEL" >&2; exit 1; }
if [ -z "${SKIP_BUILD:-}" ]; then cargo build --release --bin bizsignal; fi

wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
port_of() { [ "$PROTOCOL" = grpc ] && echo "$1" || echo "$2"; }

loadgen() { # $1 port  $2 pid  $3 business ratio  (RPS from the scenario)
  "$BIN" loadgen --endpoint "http://127.0.0.1:$1" --protocol "$PROTOCOL" --signal "$SIGNAL" \
    --concurrency "$CONCURRENCY" --batch "$BATCH" --rps "$RPS" --duration "$DURATION" \
    --business-ratio "$3" --server-pid "$2" --json
}

run_bizsignal() { # $1 ratio
  local dir; dir=$(mktemp -d "$OUT/data.XXXXXX")
  RUST_LOG=warn "$BIN" serve --otlp-grpc 127.0.0.1:14317 --otlp-http 127.0.0.1:14318 --http 127.0.0.1:18080 --data-dir "$dir" 2>>"$OUT/bizsignal.log" &
  local pid=$!
  wait_port 14317; wait_port 18080
  loadgen "$(port_of 14317 14318)" "$pid" "$1"
  kill -TERM "$pid"; wait "$pid" || true
  rm -rf "$dir"
}

run_rotel() { # $1 ratio
  "$ROTEL" start --exporter blackhole --otlp-grpc-endpoint 127.0.0.1:24317 --otlp-http-endpoint 127.0.0.1:24318 \
    --pid-file "$OUT/rotel.pid" 2>>"$OUT/rotel.log" >/dev/null &
  local pid=$!
  wait_port 24317
  loadgen "$(port_of 24317 24318)" "$pid" "$1"
  kill -TERM "$pid"; wait "$pid" || true
}

RESULTS=$OUT/results.jsonl
: > "$RESULTS"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "load: protocol=$PROTOCOL signal=$SIGNAL concurrency=$CONCURRENCY batch=$BATCH duration=$DURATION scenarios=$SCENARIOS"
for sc in $SCENARIOS; do
  IFS=: read -r name ratio RPS <<<"$sc"
  for rep in $(seq 1 "$REPS"); do
    for peer in bizsignal rotel; do
      line=$("run_$peer" "$ratio")
      echo "{\"scenario\":\"$name\",\"rps\":$RPS,\"peer\":\"$peer\",\"rep\":$rep,\"report\":$line}" | tee -a "$RESULTS"
    done
  done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print(f"{'scenario':10} {'peer':10} {'cpu s/M spans (runs)':40} {'median':>8} {'acc/s':>8} {'p99 ms':>7} {'peak RSS MiB':>12} {'refused':>7}")
for sc in dict.fromkeys(r["scenario"] for r in rows):
    med = {}
    for peer in ("bizsignal", "rotel"):
        rs = [r["report"] for r in rows if r["scenario"] == sc and r["peer"] == peer]
        cpu = [r["server_cpu_s_per_million"] for r in rs]
        med[peer] = statistics.median(cpu)
        print(f"{sc:10} {peer:10} {', '.join(f'{c:.2f}' for c in cpu):40} {med[peer]:8.2f} "
              f"{statistics.median(r['accepted_per_s'] for r in rs):8.0f} {statistics.median(r['latency_ms_p99'] for r in rs):7.1f} "
              f"{max(r['server_peak_rss_kib'] for r in rs)/1024:12.1f} {sum(r['requests_refused'] + r['requests_failed'] for r in rs):7d}")
    pairs = [b["report"]["server_cpu_s_per_million"] / r["report"]["server_cpu_s_per_million"]
             for b in rows for r in rows
             if b["scenario"] == r["scenario"] == sc and b["rep"] == r["rep"] and b["peer"] == "bizsignal" and r["peer"] == "rotel"]
    print(f"{sc:10} ratio bizsignal/rotel: {med['bizsignal'] / med['rotel']:.2f} (ratio of medians); "
          f"per-rep ratios {', '.join(f'{p:.2f}' for p in pairs)}, median {statistics.median(pairs):.2f}")
PY
