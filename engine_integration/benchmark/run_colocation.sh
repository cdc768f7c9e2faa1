#!/usr/bin/env bash
# The whole co-location comparison in one command: the same traffic against N instances
# under a static equal split of the budget, then on vmkv, then the report (TTFT CDFs,
# throughput, memory timeline, one JSON line last).
#
#   run_colocation.sh OUT_DIR [client args...]
#   env: INSTANCES (2), BUDGET (16M), ENGINES (vllm; or sgl, vllm,sgl on a GPU),
#        SERVER_ARGS (more start_server.sh arguments),
#        MODES (static vmkv; one mode alone reruns it, and the report needs both runs)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export PYTHON=${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3 )}
[ $# -ge 1 ] || { echo "usage: run_colocation.sh OUT_DIR [client args...]" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
running=""
trap '[ -z "$running" ] || bash "$here/start_server.sh" stop --run-dir "$running"' EXIT
for mode in ${MODES:-static vmkv}; do
  # shellcheck disable=SC2086  # SERVER_ARGS is a list of arguments
  bash "$here/start_server.sh" "${ENGINES:-vllm}" --run-dir "$out/$mode" --mode "$mode" \
    --instances "${INSTANCES:-2}" --budget "${BUDGET:-16M}" ${SERVER_ARGS:-}
  running="$out/$mode"
  bash "$here/start_client.sh" "$out/$mode" "$@" --json | tee "$out/$mode/client.txt"
  bash "$here/start_server.sh" stop --run-dir "$out/$mode"
  running=""
done
[ -f "$out/static/summary.json" ] && [ -f "$out/vmkv/summary.json" ] || exit 0
(cd "$root/benchmarks" && "$PYTHON" colocation_report.py "$out/static/summary.json" "$out/vmkv/summary.json" \
  --out "$out" --json) | tee "$out/report.txt"
