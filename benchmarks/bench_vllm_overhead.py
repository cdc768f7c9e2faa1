"""vLLM throughput on vmkv divided by vanilla vLLM's: same model, same load, same run.

Each side runs in its own process (vLLM configures itself once per process): offline
generation of a fixed batch of prompts, greedy, prefix caching on. The floor is vanilla
vLLM itself; the goal is a ratio >= 0.99.

The sides are compared batch by batch. Every side of a round is alive at once, and the
parent has them run the batch in turns, one at a time, each batch in a rotated order (A B
C, B C A, C A B, ...), so each vmkv batch is paired with the vanilla batch next to it in
time and every side takes every place in the order equally often. A machine drifts by several
percent over minutes (clocks, other tenants); sides measured minutes apart, as earlier
versions of this bench did, could not resolve 1%. The result is the median of the paired
ratios; their quartiles are printed with it. ``--rounds`` repeats this with fresh
processes, for what differs from one process to the next. ``--control`` adds a second
vanilla side, printed the same way: the measurement's own spread, which the vmkv ratio
must be read against. ``--variant NAME:VMKV_KEY=VALUE`` adds another vmkv side with other
settings (a page size, say), compared the same way in the same round.

What is measured is a server's steady state: ``--warmup`` batches run first on every side
and are reported apart ("filling"). Each batch leaves its blocks in the prefix cache, so
the cache fills over the first batches; vanilla vLLM allocated all of it at startup, vmkv
maps it as it fills. Set ``--warmup`` to the batches that fill ``--kv-bytes`` and the
timed batches are those of a server whose cache is full, as it is in a deployment after
its first minutes; the mapping cost is shown as the filling ratio, not hidden.

Eager decoding of a small model is bound by the CPU, so every side is pinned to the same
cores. ``--cuda-graphs`` runs vLLM's default GPU configuration (torch.compile and CUDA
graphs) instead. By default each side's engine runs in the process that times it, so
that the StepProbe counts of where its scheduler's time goes can be printed; its engine
then also shares that thread with detokenizing every output, which makes a large batch
bound by the CPU. ``--engine-process`` runs vLLM's engine core in its own process
instead, as ``vllm serve`` and vLLM's default do (no StepProbe counts then). All sides
hold their weights and KV cache on the device at once: size ``--kv-bytes`` for that.

  python benchmarks/bench_vllm_overhead.py MODEL_DIR [--prompts 64] [--max-tokens 64]
      [--rounds 2] [--repeats 6] [--warmup 0] [--cuda-graphs] [--engine-process] [--control]
      [--variant NAME:VMKV_KEY=VALUE] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from common import emit

CORES = 4  # pinned per side: the same cores for vanilla and vmkv
MARK = "VMKV-BENCH "  # starts the lines a side writes for the parent
SEGMENT = f"/vmkv-{os.getuid()}-overhead{os.getpid()}"  # + "-" + side: each vmkv side's coordinator


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


def serve_side(args: argparse.Namespace) -> None:
    """One side, in its own process: load the model, compile and capture, say ready, then
    run the batch each time the parent asks and reply with its rate and StepProbe counts.
    Protocol lines start with MARK; vLLM's own logging shares stdout."""
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, available[-CORES:])
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        max_model_len=1024,
        enforce_eager=not args.cuda_graphs,
        block_size=32,
        kv_cache_memory_bytes=args.kv_bytes,
        gpu_memory_utilization=args.gpu_share,
        distributed_executor_backend="uni",
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    batch = [f"request {i}: " + "tell me a long story about a tiny model " * 4 for i in range(args.prompts)]
    counts = dict if args.engine_process else StepProbe(llm).take  # no probe in another process
    llm.generate(batch[:8], params, use_tqdm=False)  # compiles and captures before timing
    counts()
    print(MARK + json.dumps({"ready": True}), flush=True)
    for command in sys.stdin:
        if command.strip() != "batch":
            break
        gc.collect()  # every batch starts from the same heap, so no batch pays another's garbage
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(MARK + json.dumps({"tokens_per_s": tokens / seconds, "probe": counts()}), flush=True)


class Side:
    """A side's process, started and driven by the parent: one batch per ``run_batch``."""

    def __init__(self, name: str, args: argparse.Namespace, log_dir: str) -> None:
        engine_process = "1" if args.engine_process else "0"
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": engine_process, "HF_HUB_OFFLINE": "1"}
        env.pop("VMKV", None)
        if name == "vmkv" or name in args.variants:
            env.update({"VMKV": "1", "VMKV_SEGMENT": f"{SEGMENT}-{name}"})
            env.setdefault("VMKV_CPU_BYTES", "256M")
            env.update(args.variants.get(name, {}))
        command = [sys.executable, __file__, args.model, "--side", "--prompts", str(args.prompts)]
        command += ["--max-tokens", str(args.max_tokens), "--kv-bytes", str(args.kv_bytes)]
        command += ["--gpu-share", str(args.gpu_share)]
        command += ["--cuda-graphs"] if args.cuda_graphs else []
        command += ["--engine-process"] if args.engine_process else []
        self.name = name
        self.log_path = os.path.join(log_dir, f"{name}.log")
        open(self.log_path, "w").close()
        with open(self.log_path, "a") as log:  # appended to by the child and by _read
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,
            )
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._reply(timeout=1800)  # ready

    def _read(self) -> None:
        assert self.process.stdout is not None
        with open(self.log_path, "a") as log:
            for line in self.process.stdout:
                if line.startswith(MARK):
                    self.replies.put(json.loads(line[len(MARK) :]))
                else:
                    log.write(line)
        self.replies.put(None)  # the process ended

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            reply = None
        if reply is None:
            self.close()
            with open(self.log_path) as log:
                tail = log.read()[-3000:]
            raise RuntimeError(f"the {self.name} side stopped or hung; the end of its log:\n{tail}")
        return reply

    def run_batch(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("batch\n")
        self.process.stdin.flush()
        return self._reply(timeout=900)

    def close(self) -> None:
        """Kill the side and its engine core process (its own process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def run_round(args: argparse.Namespace, names: list[str], log_dir: str) -> dict[str, list[dict[str, Any]]]:
    """Every side alive at once, started one after another (so that no side's memory
    profile sees another's startup), then ``warmup + repeats`` batches each, taken in
    turns in a rotated order (see above), so that a batch is compared with its neighbour
    in time and a drift of the machine hits every side alike."""
    sides: list[Side] = []
    try:
        for name in names:
            sides.append(Side(name, args, log_dir))
        batches: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for index in range(args.warmup + args.repeats):
            for side in sides[index % len(sides) :] + sides[: index % len(sides)]:
                batches[side.name].append(side.run_batch())
        return batches
    finally:
        for side in sides:
            side.close()


def remove_segments(names: list[str]) -> None:
    """The vmkv sides' coordinator segments: their instances were killed, so nobody else
    removes them."""
    import posix_ipc

    from vmkv.coordinator.segment import remove_segment

    for name in names:
        with contextlib.suppress(posix_ipc.ExistentialError):
            remove_segment(f"{SEGMENT}-{name}")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:VMKV_KEY=VALUE[,VMKV_KEY=VALUE...]``: another vmkv side, with those settings."""
    name, _, settings = text.partition(":")
    pairs = [item.partition("=") for item in settings.split(",") if item]
    if not name.isalnum() or name in ("vanilla", "vmkv", "control"):
        raise argparse.ArgumentTypeError(f"variant name {name!r}: letters and digits, not a side's name")
    if not pairs or any(not key.startswith("VMKV_") or not sep or not value for key, sep, value in pairs):
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME:VMKV_KEY=VALUE[,...]")
    return name, {key: value for key, _, value in pairs}


def paired_ratios(batches: dict[str, list[dict[str, Any]]], name: str, first: int) -> list[float]:
    """``name``'s rate over vanilla's, batch by batch, from batch ``first`` on."""
    return [
        mine["tokens_per_s"] / theirs["tokens_per_s"]
        for mine, theirs in zip(batches[name][first:], batches["vanilla"][first:], strict=True)
    ]


def quartiles(values: list[float]) -> str:
    low, median, high = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"{median:.3f} (quartiles {low:.3f}..{high:.3f}, {len(values)} pairs)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-bytes", type=int, default=64 << 20)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes, this many times")
    parser.add_argument("--repeats", type=int, default=6, help="timed batches per side and round")
    parser.add_argument("--warmup", type=int, default=0, help="untimed full batches first (see above)")
    parser.add_argument("--cuda-graphs", action="store_true", help="vLLM's default (compiled, CUDA graphs)")
    parser.add_argument("--control", action="store_true", help="an A/A vanilla side (see above)")
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        help="another vmkv side with other settings, e.g. page32m:VMKV_PAGE_BYTES=33554432",
    )
    parser.add_argument(
        "--engine-process", action="store_true", help="vLLM's engine core in its own process (see above)"
    )
    parser.add_argument("--log-dir", default=None, help="the sides' logs (default: a temporary folder)")
    parser.add_argument("--gpu-share", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.side:
        serve_side(args)
        os._exit(0)  # skip vLLM's slow teardown
    args.variants = dict(args.variant)
    names = ["vanilla", "vmkv", *args.variants] + (["control"] if args.control else [])
    args.gpu_share = round(0.9 / len(names), 3)  # vLLM's startup check of free memory, per side
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="vmkv-overhead-")
    os.makedirs(log_dir, exist_ok=True)
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    filling: list[float] = []
    rows = []
    try:
        for round_ in range(args.rounds):
            batches = run_round(args, names if round_ % 2 == 0 else names[::-1], log_dir)
            for name in ratios:
                ratios[name] += paired_ratios(batches, name, args.warmup)
            filling += paired_ratios(batches, "vmkv", 0)[: args.warmup]
            rows.append({name: [round(b["tokens_per_s"], 1) for b in batches[name]] for name in names})
            print(f"round {round_} tok/s per batch ({args.warmup} warm-up first): {rows[-1]}", flush=True)
            for name in names:
                for index, batch in enumerate(batches[name]):
                    if batch["probe"]:
                        print(f"  {name} batch {index}: {batch['probe']}", flush=True)
    finally:
        remove_segments(["vmkv", *args.variants])
    ratio = statistics.median(ratios["vmkv"])
    print(f"vmkv / vanilla throughput, batch by batch: {quartiles(ratios['vmkv'])} (goal >= 0.99)")
    if filling:
        print(f"  while the cache fills (warm-up): {quartiles(filling)}")
    for name in args.variants:
        print(f"  {name} (vmkv with {args.variants[name]}) / vanilla: {quartiles(ratios[name])}")
    if args.control:
        print(f"  vanilla / vanilla (control: the machine's own spread): {quartiles(ratios['control'])}")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    mode = "cuda_graphs" if args.cuda_graphs else "eager"
    summary = {"bench": "vllm_overhead", "device": device, "mode": mode, "warmup": args.warmup}
    summary["engine_process"] = args.engine_process
    summary.update(rounds=rows, ratio=ratio, pairs=len(ratios["vmkv"]))
    summary["side_ratios"] = {name: statistics.median(values) for name, values in ratios.items()}
    if args.control:
        summary["control_ratio"] = statistics.median(ratios["control"])
    emit(summary, args.json)


if __name__ == "__main__":
    main()
