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

python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -m vmkv info | tee "$OUT/info.txt"

python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1
python3 -m pytest -q -m "not gpu" -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-rest.log" | tail -3
[ "${PIPESTATUS[0]}" = 0 ] || status=1

(cd benchmarks && python3 bench_vmm.py --backend cuda --json) 2>&1 | tee "$OUT/bench_vmm_cuda.txt"
(cd benchmarks && python3 bench_alloc.py --backend cuda --json) 2>&1 | tee "$OUT/bench_alloc_cuda.txt"

echo "== summary =="
grep -E "passed|failed" "$OUT/pytest-gpu.log" | tail -1 | sed 's/^/gpu tests:  /'
grep -E "passed|failed" "$OUT/pytest-rest.log" | tail -1 | sed 's/^/cpu tests:  /'
python3 - "$OUT/bench_vmm_cuda.txt" <<'PY'
import json, sys
rows = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["rows"]
for r in rows:
    print(f"batch {r['batch']:4}: map {r['vmkv_map_us']:.2f} us/page, {r['map_vs_floor']:.2f}x pooled floor, "
          f"naive path {r['naive_vs_map']:.1f}x slower")
PY
exit $status
