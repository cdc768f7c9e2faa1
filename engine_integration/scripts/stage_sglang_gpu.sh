#!/usr/bin/env bash
# Stage SGLang 0.5.15 (the release that pins the GPU machine's torch 2.11) for that offline
# machine, as ../shared/gpu-vllm/stage.sh stages vLLM: wheels for Python 3.12, one tar cut
# into pieces of 60 MiB or less, each brought over by one device call. Runs here; needs
# the package registry. scripts/gpu_sglang.sh installs and tests it on the device.
#   bash engine_integration/scripts/stage_sglang_gpu.sh .stage/sglang    (DEST must be git-ignored)
# On the device, after vLLM's pieces are installed into /tmp/site, and with every piece
# appended to /tmp/sgl.tar (the first call: cat DEST/s00 > /tmp/sgl.tar):
#   mkdir -p /tmp/sgl-site && tar -xf /tmp/sgl.tar -C /tmp && python3 -m pip install -q \
#     --no-index --no-deps --no-compile --target /tmp/sgl-site /tmp/sgl-wheels/*.whl
#   PYTHONPATH=/tmp/sgl-site:/tmp/site python3 -m sglang.launch_server --model-path /tmp/model \
#     --attention-backend triton --sampling-backend pytorch
set -euo pipefail
DEST=${1:?usage: stage_sglang_gpu.sh DEST}
CACHE=${VMKV_STAGE_CACHE:-/tmp/sglang-gpu-cache}
mkdir -p "$CACHE/wheels" "$DEST"
PLAT=(--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         --abi cp312 --abi abi3 --abi none "${PLAT[@]}" -d "$1" "$2"; }
# What SGLang's server, scheduler and Llama path import (found by importing them on the CPU)
# and neither the device image nor vLLM's stage has, at the versions SGLang 0.5.15 pins.
# Left out on purpose: flashinfer's cubins (447 MB) and sgl-kernel's FA3, FlashMLA and
# sm100 kernels (1.8 GB unpacked): the server runs with the triton attention backend and
# PyTorch sampling, as the launch line above asks.
REQS=(sglang==0.5.15 sglang-kernel==0.4.4 flashinfer-python==0.6.12 apache-tvm-ffi==0.1.11
      transformers==5.12.1 tokenizers==0.22.2 "huggingface-hub>=1.5,<2" torch-memory-saver==0.0.10
      uvloop orjson gguf sentencepiece einops soundfile ipython traitlets decorator jedi parso
      matplotlib-inline pexpect ptyprocess prompt-toolkit wcwidth stack-data asttokens executing pure-eval)
for req in "${REQS[@]}"; do
  name=${req%%[=<>]*}; norm=$(echo "$name" | tr 'A-Z-' 'a-z_')
  ls "$CACHE/wheels" | tr 'A-Z-' 'a-z_' | grep -q "^${norm}-" || dl "$CACHE/wheels" "$req"
done
# sgl-kernel without the kernels the triton backend does not use (and their RECORD lines).
kernel=$(ls "$CACHE"/wheels/sglang_kernel-0.4.4-*.whl)
if unzip -l "$kernel" | grep -q 'sgl_kernel/flash_ops.abi3.so'; then
  drop=(sgl_kernel/flash_ops.abi3.so sgl_kernel/flashmla_ops.abi3.so 'sgl_kernel/sm100/*')
  zip -q -d "$kernel" "${drop[@]}"
  t=$(mktemp -d); record=sglang_kernel-0.4.4.dist-info/RECORD
  (cd "$t" && unzip -q "$kernel" "$record" \
    && grep -v -e '^sgl_kernel/flash_ops\.abi3\.so,' -e '^sgl_kernel/flashmla_ops\.abi3\.so,' \
         -e '^sgl_kernel/sm100/' "$record" > r && mv r "$record" && zip -q "$kernel" "$record")
  rm -rf "$t"
fi
t=$(mktemp -d); mkdir "$t/sgl-wheels"; cp "$CACHE"/wheels/*.whl "$t/sgl-wheels/"
tar -cf "$t/sgl.tar" -C "$t" sgl-wheels
rm -f "$DEST"/s[0-9][0-9]; split -b 60M -d -a 2 "$t/sgl.tar" "$DEST/s"; rm -rf "$t"
ls -la "$DEST"
