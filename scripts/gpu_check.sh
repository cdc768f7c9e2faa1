#!/usr/bin/env bash
# Everything vmkv runs on the GPU machine, in one call: build the extension with that
# machine's own compiler, run every GPU test (and the rest of the suite), run the CUDA
# benchmarks, and print a short table. Logs and JSON go to $OUT (default /tmp/vmkv-out).
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vmkv-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
# Wheels the device image lacks (posix_ipc), carried in .whl/ (see README, GPU runs).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

# The spill tier lives in /dev/shm; containers often give it little room.
shm_free=$(df --output=avail -B1 /dev/shm | tail -1)
if [ "$shm_free" -lt $((24 << 30)) ]; then
  export VMKV_SPILL_DIR=/tmp
  echo "/dev/shm has $((shm_free >> 20)) MiB free: spill tiers go to $VMKV_SPILL_DIR" | tee "$OUT/spill_dir.txt"
fi

python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -m vmkv info | tee "$OUT/info.txt"

python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1
python3 -m pytest -q -m "not gpu" -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-rest.log" | tail -3
[ "${PIPESTATUS[0]}" = 0 ] || status=1

(cd benchmarks && python3 bench_vmm.py --backend cuda --json) 2>&1 | tee "$OUT/bench_vmm_cuda.txt"
(cd benchmarks && python3 bench_vmm.py --backend cuda --page-mib 32 --json) 2>&1 | tee "$OUT/bench_vmm_cuda_32m.txt"
# Where the driver's per-handle time goes (raw driver calls, no vmkv): see the source.
g++ -O2 -std=c++17 -I/usr/local/cuda/include benchmarks/cuda_vmm_probe.cpp -L/usr/local/cuda/lib64/stubs \
  -lcuda -lpthread -o /tmp/cuda_vmm_probe && /tmp/cuda_vmm_probe 64 15 2>&1 | tee "$OUT/cuda_vmm_probe.txt"
(cd benchmarks && python3 bench_alloc.py --backend cuda --json) 2>&1 | tee "$OUT/bench_alloc_cuda.txt"
(cd benchmarks && python3 bench_spill.py --backend cuda --json) 2>&1 | tee "$OUT/bench_spill_cuda.txt"

echo "== summary =="
grep -E "passed|failed" "$OUT/pytest-gpu.log" | tail -1 | sed 's/^/gpu tests:  /'
grep -E "passed|failed" "$OUT/pytest-rest.log" | tail -1 | sed 's/^/cpu tests:  /'
python3 - "$OUT/bench_vmm_cuda.txt" "$OUT/bench_vmm_cuda_32m.txt" <<'PY'
import json, sys
for path in sys.argv[1:]:
    result = json.loads(open(path).read().strip().splitlines()[-1])
    for r in result["rows"]:
        print(f"{result['page_size'] >> 20:3} MiB pages, batch {r['batch']:4}: map {r['vmkv_map_us']:.2f} us/page, "
              f"{r['map_vs_floor']:.2f}x pooled floor, naive {r['naive_vs_map']:.2f}x slower")
PY
python3 - "$OUT/bench_spill_cuda.txt" <<'PY'
import json, sys
result = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"spill tier pinned: {result['tier_pinned']}, staging chunk {result['staging_chunk_blocks']} blocks")
for r in result["rows"]:
    print(f"spill {r['blocks']:5} blocks: {r['spill_gbps']:.1f} GB/s ({r['spill_vs_floor']:.2f}x floor), "
          f"restore {r['restore_gbps']:.1f} GB/s ({r['restore_vs_floor']:.2f}x floor)")
PY
exit $status
