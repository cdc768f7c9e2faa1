#!/usr/bin/env bash
# Drives bursty, skewed traffic at the instances start_server.sh started, and collects
# TTFT, TPOT, throughput, errors and (vmkv) the memory timeline into the run directory.
#
#   start_client.sh RUN_DIR [--duration 60] [--phase 10] [--rate-on 6] [--rate-off 0.3]
#                           [--prompt-len 256] [--output-len 96] [--seed 0] [--json]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3 )}
exec "$PYTHON" "$root/benchmarks/colocation_client.py" "$@"
