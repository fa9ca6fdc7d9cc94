#!/usr/bin/env bash
# Measure polybroker against the reference brokers in one run, with the shared load generator.
#
# usage: bench/vs_refs.sh WORKLOADS [TARGETS] [SIZES] [REPS]
#   WORKLOADS  comma-separated workload names of the harness (e.g. stomp-queue-auto,mqtt-qos0-fanin)
#   TARGETS    reference brokers to run beside ours (default: "rabbitmq")
#   SIZES      payload sizes (default: 16); REPS repetitions (default: 3)
# env: BENCH (the harness folder: run.py, summarize.py, loadgen), BENCH_STATE (its state dir).
# Prints the summary table; raw results go to $BENCH_STATE/results/ours-<stamp>.jsonl.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH:?set BENCH to the folder of the load-generator harness (run.py, summarize.py)}
export BENCH_STATE=${BENCH_STATE:-${TMPDIR:-/tmp}/polybroker-bench}
workloads=${1:?usage: vs_refs.sh WORKLOADS [TARGETS] [SIZES] [REPS]}
targets=${2:-rabbitmq}
sizes=${3:-16}
reps=${4:-3}
stamp=$(date +%Y%m%d-%H%M%S)
python=${PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3

mkdir -p "$BENCH_STATE/ours" "$BENCH_STATE/results"
data=$(mktemp -d "$BENCH_STATE/ours/data.XXXX")
"$python" -m broker serve --data-dir "$data" > "$BENCH_STATE/ours/serve-$stamp.log" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$BENCH_STATE/ours/pid"
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$data"' EXIT
for port in 1883 5672 61613; do
  for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done
cd "$BENCH"
# shellcheck disable=SC2086
./run.py --manage --restart-per-workload --target ours $targets --pid "ours=$pid" \
  --workloads "$workloads" --sizes "$sizes" --reps "$reps" --out "results/ours-$stamp.jsonl"
./summarize.py "results/ours-$stamp.jsonl" --title "polybroker vs $targets"
