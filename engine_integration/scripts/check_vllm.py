"""A short generation with vLLM on vmkv, to check an installation: prints the output and
what vmkv did; exits non-zero when vmkv was not active or nothing was generated.

  VMKV=1 python engine_integration/scripts/check_vllm.py MODEL_DIR
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    os.environ.setdefault("VMKV", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # scheduler and worker in one process
    from vllm import LLM, SamplingParams

    from vmkv.integration.vllm.worker import current_worker

    llm = LLM(
        model=sys.argv[1],
        max_model_len=512,
        enforce_eager=True,
        block_size=32,
        kv_cache_memory_bytes=64 << 20,
        distributed_executor_backend="uni",
    )
    text = llm.generate(["vmkv check:"], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    stack = current_worker().stack
    print(f"output: {text.outputs[0].text!r}")
    created = stack.pool.stats().created
    print(f"vmkv: {stack.vmm.kind} backend, instance {stack.settings.name!r}, {created} pages created")
    return 0 if text.outputs[0].text and stack.pool.stats().created > 0 else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip vLLM's slow teardown
