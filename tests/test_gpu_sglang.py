"""Real SGLang serving on a GPU (SGLang 0.5.15 on the GPU machine, staged by
engine_integration/scripts/stage_sglang_gpu.sh and installed by scripts/gpu_sglang.sh):
greedy outputs with and without vmkv, and an SGLang server beside a `vllm serve` under one
coordinator, memory moving to whichever is busy.

VMKV_SGLANG_PATH names a site directory that goes first on the SGLang servers' path (the
GPU machine keeps SGLang's transformers apart from vLLM's). VMKV_GPU_MODEL names the
model (default: the tiny one); the co-location test needs one whose KV fills a budget of
a few pages with a few requests (the 886M Llama of ../shared/gpu-vllm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from serving import (
    PROMPT,
    SglangServer,
    VllmServer,
    burst,
    kv_bytes_per_token,
    server_env,
    sglang_env,
    tiny_model,
    vmkv_ls,
)  # fmt: skip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PAGE = 2 << 20  # the CUDA allocation granularity
SMALL_GRAPHS = ("--cuda-graph-max-bs", "16")  # capturing SGLang's default sizes takes a minute


def sgl_env(vmkv: bool, **settings: str) -> dict[str, str]:
    return sglang_env(server_env(vmkv, VMKV_PAGE_BYTES=str(PAGE), PYTHONFAULTHANDLER="1", **settings))


@pytest.fixture(scope="module", autouse=True)
def sglang_installed() -> None:
    probe = [sys.executable, "-c", "import sglang"]
    found = subprocess.run(probe, env=sgl_env(False), capture_output=True)
    if found.returncode != 0:
        if os.environ.get("VMKV_REQUIRE_SGLANG") == "1":
            pytest.fail(f"SGLang does not import: {found.stderr.decode()[-2000:]}")
        pytest.skip("SGLang is not installed (see scripts/gpu_sglang.sh)")


@pytest.fixture
def segment() -> str:
    return f"/vmkv-{os.getuid()}-gpusgl{os.getpid()}-{os.urandom(3).hex()}"


def model() -> Path:
    return Path(os.environ["VMKV_GPU_MODEL"]) if os.environ.get("VMKV_GPU_MODEL") else tiny_model()


def test_sglang_greedy_outputs_on_the_gpu_are_identical_with_vmkv(tmp_path: Path, segment: str):
    """SGLang's own kernels (triton attention, CUDA graphs) read and write KV slots in
    CUDA VMM memory mapped a page at a time as its allocator grows. SGLang's
    release_memory_occupation (KV cache) gives the pages back to the coordinator, and
    after resume_memory_occupation the server serves the same outputs again."""
    prompts = [f"request {i}: " + PROMPT * 4 for i in range(6)]  # 3+ KV pages in all
    elastic = sgl_env(
        True, VMKV_SEGMENT=segment, VMKV_NAME="sgl", VMKV_BUDGET=str(512 * PAGE), VMKV_KEEP_FREE_PAGES="0"
    )
    texts: dict[str, list[str]] = {}
    held: dict[str, int] = {}
    for label, env in (("vanilla", sgl_env(False)), ("vmkv", elastic)):
        log = tmp_path / f"{label}.log"
        server = SglangServer(model(), env, log, 16384, max_model_len=2048, extra_args=SMALL_GRAPHS)
        try:
            server.wait_ready(600)
            texts[label] = [server.complete(p, 32) for p in prompts]  # one at a time: same batches
            if label == "vmkv":
                held["served"] = vmkv_ls(segment)["sgl"]["held"]
                server.post("/release_memory_occupation", {"tags": ["kv_cache"]})
                held["released"] = vmkv_ls(segment)["sgl"]["held"]
                server.post("/resume_memory_occupation", {"tags": ["kv_cache"]})
                texts["resumed"] = [server.complete(p, 32) for p in prompts]
        finally:
            server.stop()
        assert "memory leak" not in server.log.read_text()
    assert all(texts["vanilla"])
    assert texts["vmkv"] == texts["vanilla"]
    assert 0 < held["released"] < held["served"], held  # the padding slot's page stays
    assert texts["resumed"] == texts["vanilla"]


def test_sglang_and_vllm_share_one_budget_on_the_gpu(tmp_path: Path, segment: str):
    """An SGLang server and a `vllm serve` on one coordinator, with a budget that either
    alone can fill: SGLang's burst takes it, vLLM's burst then takes most of it back (SGLang
    evicts cold radix entries when asked), and SGLang gets it back once vLLM is idle."""
    if not os.environ.get("VMKV_GPU_MODEL"):
        pytest.skip("VMKV_GPU_MODEL is not set: the tiny model's KV cannot fill even a 2 MiB page per layer")
    path = model()
    per_token = kv_bytes_per_token(path)
    layer_buffers = 2 * json.loads((path / "config.json").read_text())["num_hidden_layers"]
    kv_page_tokens = PAGE * layer_buffers // per_token  # tokens of one page in every buffer
    budget_pages = 12 * layer_buffers  # 12 KV pages
    shared = {"VMKV_SEGMENT": segment, "VMKV_BUDGET": str(budget_pages * PAGE), "VMKV_SPILL": "0"}
    long_prompt = PROMPT * 3
    vllm_env = server_env(True, VMKV_NAME="vllm", VMKV_PAGE_BYTES=str(PAGE), **shared)
    vllm = VllmServer(
        path, vllm_env, tmp_path / "vllm.log", budget_pages * PAGE, max_model_len=2048, dtype="bfloat16",
        extra_args=["--gpu-memory-utilization", "0.3"],
    )  # fmt: skip
    sgl = None
    try:
        vllm.wait_ready(600)
        sgl = SglangServer(
            path, sgl_env(True, VMKV_NAME="sgl", **shared), tmp_path / "sgl.log", 12 * kv_page_tokens,
            max_model_len=2048, extra_args=["--mem-fraction-static", "0.5", *SMALL_GRAPHS],
        )  # fmt: skip
        sgl.wait_ready(600)

        def sgl_burst(tag: str) -> list[str]:
            with ThreadPoolExecutor(16) as pool:
                prompts = [f"{tag} {i}: " + long_prompt for i in range(24)]
                texts = pool.map(lambda prompt: sgl.complete(prompt, 64), prompts, timeout=120)
                try:
                    return list(texts)
                except TimeoutError:
                    sgl.dump_stacks()
                    raise

        assert all(sgl_burst("first"))  # SGLang busy first: its radix cache keeps the KV
        before = vmkv_ls(segment)
        assert before["sgl"]["held"] > budget_pages // 2, before

        errors: list[str] = []
        running = burst(vllm, 24, errors)  # then vLLM: its burst needs what SGLang holds
        vllm_peak = 0
        while running.is_alive():
            vllm_peak = max(vllm_peak, vmkv_ls(segment)["vllm"]["held"])
            time.sleep(0.05)
        assert not errors, errors
        after_burst = vmkv_ls(segment)
        assert vllm_peak > budget_pages - before["sgl"]["held"], (before, vllm_peak)
        assert after_burst["sgl"]["held"] < before["sgl"]["held"], (before, after_burst)

        assert all(sgl_burst("second"))  # SGLang busy again; vLLM, idle, gives back
        final = vmkv_ls(segment)
        assert final["sgl"]["held"] > after_burst["sgl"]["held"], (after_burst, final)
        assert sum(i["leased"] for i in final.values()) <= budget_pages
        assert "memory leak" not in sgl.log.read_text()
    finally:
        if sgl is not None:
            sgl.stop()
        vllm.stop()
