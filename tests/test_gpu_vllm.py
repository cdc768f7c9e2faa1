"""Real vLLM on a GPU (vLLM 0.26 on the GPU machine) with and without vmkv: KV tensors
in CUDA VMM memory, FlashAttention kernels reading them, the elastic block pool."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_vllm import HERE, engine_env, next_json, run_vllm, segment, tiny_model  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PAGE = 2 << 20  # the CUDA allocation granularity
BF16 = ("--dtype", "bfloat16")  # FlashAttention's dtypes


def gpu_env(vmkv: bool, segment_name: str | None = None, **extra: str) -> dict[str, str]:
    return engine_env(vmkv, segment_name, VMKV_PAGE_BYTES=str(PAGE), VMKV_BUDGET=str(64 * PAGE), **extra)


RUNNERS = {  # vLLM 0.26's model runners: V2, its default (here with CUDA graphs), and V1
    "v2-cuda-graphs": ({"VLLM_USE_V2_MODEL_RUNNER": "1"}, ("--cuda-graphs",)),
    "v1-eager": ({"VLLM_USE_V2_MODEL_RUNNER": "0"}, ()),
}


@pytest.mark.parametrize("runner", RUNNERS)
def test_greedy_outputs_on_the_gpu_are_identical_with_vmkv(tiny_model, segment, runner):  # noqa: F811
    """V2's warmup writes KV blocks no scheduler handed out (vmkv maps them for it), and
    CUDA graphs replay kernels whose KV addresses were fixed at capture."""
    env, flags = RUNNERS[runner]
    kv = ("--kv-bytes", str(16 << 20), *flags)
    vanilla = run_vllm(tiny_model, "basic", gpu_env(False, **env), *BF16, *kv)
    elastic = run_vllm(tiny_model, "basic", gpu_env(True, segment, **env), *BF16, *kv)
    assert all(vanilla["texts"])
    assert elastic["texts"] == vanilla["texts"]
    stats = elastic["vmkv"]
    assert stats["mapped_pages"] >= 1 and stats["created_pages"] >= 1, stats


def test_preemption_on_the_gpu_gives_the_same_outputs(tiny_model, segment):  # noqa: F811
    kv = ("--kv-bytes", str(1 << 20))  # 32 blocks of 32 tokens for sixteen ~100-token prompts
    vanilla = run_vllm(tiny_model, "pressure", gpu_env(False), *BF16, *kv)
    elastic = run_vllm(tiny_model, "pressure", gpu_env(True, segment), *BF16, *kv)
    assert elastic["preemptions"] > 0
    assert elastic["texts"] == vanilla["texts"]


def test_prefix_hits_on_the_gpu_give_the_same_outputs(tiny_model, segment):  # noqa: F811
    kv = ("--kv-bytes", str(16 << 20))
    vanilla = run_vllm(tiny_model, "prefix", gpu_env(False), *BF16, *kv)
    elastic = run_vllm(tiny_model, "prefix", gpu_env(True, segment), *BF16, *kv)
    assert elastic["texts"] == vanilla["texts"] == elastic["texts_again"] == vanilla["texts_again"]


def test_a_second_instance_starts_beside_a_busy_one_sized_to_its_capacity(tiny_model, segment):  # noqa: F811
    """Neither instance is given a KV size: each is sized to the budget, not to a profile
    of free memory, and the second starts while the first holds KV pages and its weights."""
    budget = 64 * PAGE
    first = subprocess.Popen(
        [sys.executable, str(HERE / "vllm_runner.py"), str(tiny_model), "prefix", *BF16, "--kv-bytes", "0",
         "--hold", "600"],
        env=gpu_env(True, segment, VMKV_NAME="first"), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        cached = next_json(first)
        assert cached["after_first_run"]["held_pages"] > 0, cached
        assert budget - (64 << 10) < cached["after_first_run"]["kv_bytes"] <= budget, cached
        second = run_vllm(
            tiny_model, "basic", gpu_env(True, segment, VMKV_NAME="second"), *BF16, "--kv-bytes", "0"
        )
        vanilla = run_vllm(tiny_model, "basic", gpu_env(False), *BF16, "--kv-bytes", str(16 << 20))
        assert second["texts"] == vanilla["texts"] and all(vanilla["texts"])
        assert budget - (64 << 10) < second["vmkv"]["kv_bytes"] <= budget, second["vmkv"]
    finally:
        first.kill()
        first.wait()
