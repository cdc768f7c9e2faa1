"""vLLM throughput on vmkv divided by vanilla vLLM's: same model, same load, same run.

Each side runs in its own fresh process (vLLM configures itself once per process):
offline generation of a fixed batch of prompts, greedy, prefix caching on. The floor is
vanilla vLLM itself; the goal is a ratio >= 0.99.

What is measured is a server's steady state: ``--warmup`` full batches run untimed on both
sides first. Each batch leaves its blocks in the prefix cache, so the cache fills over the
first batches; vanilla vLLM allocated all of it at startup, vmkv maps it as it fills. Set
``--warmup`` to the batches that fill ``--kv-bytes`` and the timed batches are those of a
server whose cache is full, as it is in a deployment after its first minutes; the warm-up
batches are timed as well and reported apart ("filling"), so the mapping cost is shown,
not hidden.

Eager decoding of a small model is bound by the CPU, and on a shared machine one process
can run a third slower than the next for reasons of its own. So both sides are pinned to
the same cores, each process times the batch ``--repeats`` times and keeps its best, the
sides alternate in order, and the result is the median of the per-round ratios; the
spread between rounds is printed with it. ``--cuda-graphs`` runs vLLM's default GPU
configuration (torch.compile and CUDA graphs) instead of eager mode: decoding is then
bound by the GPU, which is what a deployment sees and a quieter measurement.
``--control`` runs a second vanilla process in each round and prints vanilla ÷ vanilla
the same way: the spread of the machine itself, which a vmkv ratio must be read against.

  python benchmarks/bench_vllm_overhead.py MODEL_DIR [--prompts 64] [--max-tokens 64]
      [--warmup 0] [--cuda-graphs] [--control] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from common import emit

CORES = 4  # pinned per side: the same cores for vanilla and vmkv


class StepProbe:
    """Where a batch's engine-thread time goes, to tell vmkv's costs apart: the
    scheduler's ``schedule`` and ``update_from_output`` per step, and (with vmkv) the KV
    pages mapped and unmapped, on the engine's thread and on vmkv's own threads."""

    def __init__(self, llm: Any) -> None:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        self.engine_thread = threading.get_ident()
        self.counts: dict[str, float] = {}
        for name in ("schedule", "update_from_output"):
            setattr(scheduler, name, self._timed(name, getattr(scheduler, name)))
        if os.environ.get("VMKV") == "1":
            from vmkv.allocator.kv_space import KVSpace

            for name in ("map_pages", "unmap_pages"):
                setattr(KVSpace, name, self._timed_pages(name, getattr(KVSpace, name)))

    def _add(self, key: str, seconds: float, count: int = 1) -> None:
        self.counts[key + "_ms"] = self.counts.get(key + "_ms", 0.0) + 1e3 * seconds
        self.counts[key + "_n"] = self.counts.get(key + "_n", 0) + count

    def _timed(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._add(name, time.perf_counter() - start)

        return timed

    def _timed_pages(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(space: Any, pages: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(space, pages)
            finally:
                where = "engine" if threading.get_ident() == self.engine_thread else "vmkv_thread"
                self._add(f"{name}_{where}", time.perf_counter() - start, len(pages))

        return timed

    def take(self) -> dict[str, float]:
        """What was counted since the last call, rounded for printing."""
        counts, self.counts = self.counts, {}
        return {key: round(value, 1) for key, value in sorted(counts.items())}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """In this process: the best tokens per second of ``repeats`` runs of ``prompts``
    requests after ``warmup`` more, the warm-up runs' rates, and each run's StepProbe
    counts."""
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, available[-CORES:])
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        max_model_len=1024,
        enforce_eager=not args.cuda_graphs,
        block_size=32,
        kv_cache_memory_bytes=args.kv_bytes,
        distributed_executor_backend="uni",
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    batch = [f"request {i}: " + "tell me a long story about a tiny model " * 4 for i in range(args.prompts)]
    probe = StepProbe(llm)
    llm.generate(batch[:8], params, use_tqdm=False)  # compiles and captures before timing
    probe.take()
    rates, probes = [], []
    for _ in range(args.warmup + args.repeats):
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        rates.append(sum(len(o.outputs[0].token_ids) for o in outputs) / seconds)
        probes.append(probe.take())
    filling, timed = rates[: args.warmup], rates[args.warmup :]
    return {
        "tokens_per_s": max(timed),
        "mean_tokens_per_s": statistics.fmean(timed),
        "filling_tokens_per_s": statistics.fmean(filling) if filling else None,
        "all_tokens_per_s": rates,
        "probes": probes,
    }


def run_side(args: argparse.Namespace, vmkv: bool) -> dict[str, Any]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("VMKV", None)
    if vmkv:
        env.update({"VMKV": "1", "VMKV_SEGMENT": f"/vmkv-{os.getuid()}-overhead{os.getpid()}"})
        env.setdefault("VMKV_CPU_BYTES", "256M")
    command = [sys.executable, __file__, args.model, "--side", "--prompts", str(args.prompts)]
    command += ["--max-tokens", str(args.max_tokens), "--kv-bytes", str(args.kv_bytes)]
    command += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    command += ["--cuda-graphs"] if args.cuda_graphs else []
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-bytes", type=int, default=64 << 20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per process; the best counts")
    parser.add_argument("--warmup", type=int, default=0, help="untimed full batches first (see above)")
    parser.add_argument("--cuda-graphs", action="store_true", help="vLLM's default (compiled, CUDA graphs)")
    parser.add_argument("--control", action="store_true", help="an A/A vanilla side (see above)")
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.side:
        result = measure(args)
        print(json.dumps(result), flush=True)
        os._exit(0)  # skip vLLM's slow teardown
    rows = []
    names = ["vanilla", "vmkv"] + (["control"] if args.control else [])
    for round_ in range(args.rounds):  # alternate the order so drift hits both sides alike
        order = names if round_ % 2 == 0 else names[::-1]
        sides = {name: run_side(args, name == "vmkv") for name in order}
        vanilla, vmkv = sides["vanilla"], sides["vmkv"]
        ratio = vmkv["tokens_per_s"] / vanilla["tokens_per_s"]
        row = {"vanilla_tok_s": vanilla["tokens_per_s"], "vmkv_tok_s": vmkv["tokens_per_s"], "ratio": ratio}
        row["mean_ratio"] = vmkv["mean_tokens_per_s"] / vanilla["mean_tokens_per_s"]
        if args.warmup:
            row["filling_ratio"] = vmkv["filling_tokens_per_s"] / vanilla["filling_tokens_per_s"]
        if args.control:
            row["control_ratio"] = sides["control"]["tokens_per_s"] / vanilla["tokens_per_s"]
        rows.append(row)
        batches = ", ".join(
            name + " " + " ".join(f"{r:.0f}" for r in sides[name]["all_tokens_per_s"]) for name in order
        )
        print(
            f"round {round_}: vanilla {vanilla['tokens_per_s']:.0f} tok/s, "
            f"vmkv {vmkv['tokens_per_s']:.0f} tok/s (every batch: {batches})",
            flush=True,
        )
        for name in order:
            for batch_, counts in enumerate(sides[name]["probes"]):
                print(f"  {name} batch {batch_}: {counts}", flush=True)
    ratios = sorted(r["ratio"] for r in rows)
    ratio = statistics.median(ratios)
    print(f"vmkv / vanilla throughput: {ratio:.3f}, rounds {ratios[0]:.3f}..{ratios[-1]:.3f} (goal >= 0.99)")
    others = {
        "mean of the timed batches": "mean_ratio",
        "while the cache fills (warm-up)": "filling_ratio",
        "vanilla / vanilla (control: the machine's own spread)": "control_ratio",
    }
    for label, key in others.items():
        if key in rows[0]:
            values = sorted(r[key] for r in rows)
            print(f"  {label}: {statistics.median(values):.3f}, rounds {values[0]:.3f}..{values[-1]:.3f}")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    mode = "cuda_graphs" if args.cuda_graphs else "eager"
    summary = {"bench": "vllm_overhead", "device": device, "mode": mode, "warmup": args.warmup}
    summary.update(rounds=rows, ratio=ratio)
    emit(summary, args.json)


if __name__ == "__main__":
    main()
