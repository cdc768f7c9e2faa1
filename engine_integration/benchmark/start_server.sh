#!/usr/bin/env bash
# Starts N co-located serving instances for the co-location benchmark and returns once
# they all serve; the run directory's servers.json tells start_client.sh where they are.
#
#   start_server.sh vllm|sgl|vllm,sgl --run-dir DIR --mode vmkv|static [--instances N]
#                        [--budget 16M] [--model DIR] [--max-model-len N] [--page-bytes B] ...
#   start_server.sh stop --run-dir DIR
#
# vmkv: every instance may grow to the whole budget; one coordinator holds them to it.
# static: vanilla engines, each instance fixed at budget / N (the baseline).
# The engines take turns over the instances (vllm,sgl: m0 vLLM, m1 SGLang, ...). SGLang
# serves only on a GPU; VMKV_SGLANG_PATH puts a site directory holding it first on its path.
# PYTHON picks the interpreter (default: this checkout's .venv, else python3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3 )}
case "${1:-}" in
vllm|sgl|vllm,sgl|sgl,vllm) engines=$1; shift; exec "$PYTHON" "$here/launch.py" start --engines "$engines" "$@" ;;
stop) shift; exec "$PYTHON" "$here/launch.py" stop "$@" ;;
*) echo "usage: start_server.sh vllm|sgl|vllm,sgl --run-dir DIR --mode vmkv|static [...] | stop --run-dir DIR" >&2
   exit 2 ;;
esac
