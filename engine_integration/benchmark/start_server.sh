#!/usr/bin/env bash
# Starts N co-located serving instances for the co-location benchmark and returns once
# they all serve; the run directory's servers.json tells start_client.sh where they are.
#
#   start_server.sh vllm --run-dir DIR --mode vmkv|static [--instances N] [--budget 16M]
#                        [--model DIR] [--max-model-len N] [--page-bytes B] ...
#   start_server.sh stop --run-dir DIR
#
# vmkv: every instance may grow to the whole budget; one coordinator holds them to it.
# static: vanilla vLLM, each instance fixed at budget / N (the baseline).
# PYTHON picks the interpreter (default: this checkout's .venv, else python3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3 )}
case "${1:-}" in
vllm) shift; exec "$PYTHON" "$here/launch.py" start "$@" ;;
stop) shift; exec "$PYTHON" "$here/launch.py" stop "$@" ;;
sgl)
  echo "start_server.sh: SGLang serving is not wired into this benchmark yet: SGLang's server" >&2
  echo "needs a GPU, and the GPU machine has no SGLang wheels (see issue #6)." >&2
  exit 2 ;;
*) echo "usage: start_server.sh vllm --run-dir DIR --mode vmkv|static [...] | stop --run-dir DIR" >&2; exit 2 ;;
esac
