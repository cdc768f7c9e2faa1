#!/usr/bin/env bash
# SGLang 0.5.15 with vmkv on the GPU machine: installs the staged wheels (/tmp/sgl.tar,
# made of engine_integration/scripts/stage_sglang_gpu.sh's pieces) into /tmp/sgl-site, then
# runs tests/test_gpu_sglang.py (identical greedy outputs; SGLang beside vLLM under one
# coordinator). Needs scripts/gpu_vllm.sh's setting: vLLM in /tmp/site, the model in /tmp/model.
#   bash scripts/gpu_sglang.sh           servers' logs: $OUT/sglang-logs.tar.gz
#   bash scripts/gpu_sglang.sh install   only the install (for ENGINES=vllm,sgl gpu_vllm.sh coloc)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vmkv-out}
mkdir -p "$OUT"
if [ ! -d /tmp/sgl-site/sglang ]; then
  { tar -xf /tmp/sgl.tar -C /tmp && python3 -m pip install -q --no-index --no-deps --no-compile \
      --target /tmp/sgl-site /tmp/sgl-wheels/*.whl; } > "$OUT/sglang-install.log" 2>&1 \
    || { tail -20 "$OUT/sglang-install.log"; exit 1; }
fi
[ "${1:-}" = install ] && exit 0
bash scripts/gpu_vllm.sh setup || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONPATH=$PWD:/tmp/site VMKV_SGLANG_PATH=/tmp/sgl-site
export VMKV_REQUIRE_SGLANG=1 VMKV_GPU_MODEL=${VMKV_GPU_MODEL:-/tmp/model}
rm -rf /tmp/sgl-pytest
timeout "${PYTEST_TIMEOUT:-500}" python3 -m pytest -q -p no:cacheprovider --basetemp=/tmp/sgl-pytest \
  tests/test_gpu_sglang.py ${PYTEST_ARGS:-} 2>&1 \
  | tee "$OUT/pytest-gpu-sglang.log" | tail -25
status=${PIPESTATUS[0]}
find /tmp/sgl-pytest -name '*.log' -print0 | tar -czf "$OUT/sglang-logs.tar.gz" --null -T - 2>/dev/null
exit "$status"
