"""Traffic and listings for the tests that run `vllm serve` and SGLang servers on vmkv."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "engine_integration" / "benchmark"))
from servers import Server, SglangServer, VllmServer, kv_bytes_per_token, server_env, sglang_env, tiny_model

__all__ = [
    "PROMPT", "SglangServer", "VllmServer", "burst", "kv_bytes_per_token", "peak_held", "server_env",
    "sglang_env", "tiny_model", "vmkv_ls",
]  # fmt: skip

PROMPT = "once upon a time there was a tiny model that wrote stories " * 6


def vmkv_ls(segment: str) -> dict[str, dict]:
    out = subprocess.run(
        [sys.executable, "-m", "vmkv", "ls", "--json", "--segment", segment],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
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
    """The most pages ``name`` held while ``while_running`` ran, read every 20 ms from the
    coordinator's table (the rows `vmkv ls --json` prints; a process per sample would
    take longer than a short burst on a loaded machine and miss its peak)."""
    from vmkv.coordinator import Segment

    table = Segment.attach(segment).table
    peak = 0
    while while_running.is_alive():
        peak = max([peak, *(row["held"] for row in table.snapshot() if row["name"] == name)])
        time.sleep(0.02)
    return peak
