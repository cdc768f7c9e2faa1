#!/usr/bin/env bash
# vmkv with real vLLM 0.26 on the GPU machine, once ../shared/gpu-vllm's pieces are
# installed into /tmp/site (see README, GPU runs). Logs and JSON go to $OUT.
#   bash scripts/gpu_vllm.sh setup   only what the others do first (build, plugin entry points)
#   bash scripts/gpu_vllm.sh tests   the GPU vLLM tests (tiny model, vanilla vs vmkv)
#   bash scripts/gpu_vllm.sh bench   throughput on vmkv / vanilla, 886M model in /tmp/model (ROUNDS,
#                                    REPEATS, WARMUP, KV_BYTES: see benchmarks/bench_vllm_overhead.py;
#                                    BENCH_ARGS=--cuda-graphs: vLLM's default, not eager;
#                                    BENCH_ARGS="--cuda-graphs --control": an A/A control as well;
#                                    --variant page32m:VMKV_PAGE_BYTES=33554432: another vmkv side)
#   bash scripts/gpu_vllm.sh coloc   the co-location benchmark, static split vs vmkv, 886M model
#                                    (ENGINES=vllm,sgl: SGLang instances too, after
#                                    `bash scripts/gpu_sglang.sh install`; MODES=static, then
#                                    MODES=vmkv: one mode per call, the report after both)
# MODEL=8b (bench, coloc): a random model of Llama-3-8B's geometry in /tmp/model8b instead,
# made here on the GPU (16 GB); decoding it is bound by the GPU, not by the engine's Python.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vmkv-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/sgl-site/sglang ] && export VMKV_SGLANG_PATH=/tmp/sgl-site  # see gpu_sglang.sh
if ls .whl/*.whl >/dev/null 2>&1; then  # posix_ipc, which the image lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1
fi
# vLLM finds plugins by entry point: give this checkout's vmkv one without installing it.
mkdir -p /tmp/site/vmkv-0.dev0.dist-info
printf 'Metadata-Version: 2.1\nName: vmkv\nVersion: 0.dev0\n' > /tmp/site/vmkv-0.dev0.dist-info/METADATA
printf '[vllm.general_plugins]\nvmkv = vmkv.integration.vllm.plugin:register\n\n[sglang.srt.plugins]\nvmkv = vmkv.integration.sglang.plugin:register\n' \
  > /tmp/site/vmkv-0.dev0.dist-info/entry_points.txt
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
model_dir() {  # the benchmark model, made on first use
  if [ "${MODEL:-}" = 8b ]; then
    [ -f /tmp/model8b/config.json ] || python3 scripts/make_tiny_model.py /tmp/model8b --preset llama3-8b > "$OUT/model.log" 2>&1
    echo /tmp/model8b
  else
    [ -f /tmp/model/config.json ] || bash /tmp/gpu-vllm/device.sh model /tmp/model > "$OUT/model.log" 2>&1
    echo /tmp/model
  fi
}
case "${1:-tests}" in
setup) ;;
tests)
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu_vllm.py tests/test_vllm.py 2>&1 | tee "$OUT/pytest-gpu-vllm.log" | tail -15
  exit "${PIPESTATUS[0]}" ;;
bench)
  model=$(model_dir)
  rm -rf /tmp/vmkv-overhead
  (cd benchmarks && python3 bench_vllm_overhead.py "$model" --kv-bytes "${KV_BYTES:-$((4 << 30))}" --prompts 256 \
     --max-tokens 128 --rounds "${ROUNDS:-2}" --repeats "${REPEATS:-8}" --warmup "${WARMUP:-0}" ${BENCH_ARGS:-} \
     --log-dir /tmp/vmkv-overhead --json) 2>&1 | tee "$OUT/bench_vllm_overhead_gpu.txt" | tail -8
  tar -czf "$OUT/overhead-logs.tar.gz" -C /tmp vmkv-overhead ;;
coloc)  # the run stays in /tmp/vmkv-coloc; $OUT gets what fits its 8-file limit
  model=$(model_dir)
  run=/tmp/vmkv-coloc
  PYTHON=python3 INSTANCES=${INSTANCES:-2} BUDGET=${BUDGET:-1G} \
    SERVER_ARGS="--model $model --max-model-len 2048 ${SERVER_ARGS:-}" \
    bash engine_integration/benchmark/run_colocation.sh "$run" --duration "${DURATION:-60}" --phase "${PHASE:-15}" \
    --rate-on "${RATE_ON:-3.5}" --rate-off 0.5 --prompt-len 512 --output-len 256 --shared-prefix 128 \
    2>&1 | tee "$OUT/coloc.txt" | grep -v '^{"date'
  for file in ttft_cdf.png vmkv/memory.png static/summary.json vmkv/summary.json vmkv/memory.csv; do
    [ -f "$run/$file" ] && cp "$run/$file" "$OUT/coloc-${file//\//-}"
  done ;;
*) echo "usage: gpu_vllm.sh setup|tests|bench|coloc"; exit 2 ;;
esac
