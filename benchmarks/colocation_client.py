"""Bursty, skewed traffic against co-located OpenAI-compatible servers (the instances
that engine_integration/benchmark/start_server.sh started), and what each instance made
of it: TTFT, TPOT, throughput, errors, and with vmkv its KV memory over time.

The traffic takes turns: time is cut into phases, and in each phase one instance is hot
(Poisson arrivals at --rate-on per second) while the others are cold (--rate-off). Prompt
and output lengths are log-normal around their means, the way chat traffic is skewed, and
each prompt opens with one of a few shared system prompts, so prefix caching (and vmkv's
spill and reload) has something to find. The schedule depends only on the arguments and
--seed, so a static run and a vmkv run see the same requests at the same times.

Requests are token ids (no tokenizer needed), streamed, with ignore_eos so that every
request makes exactly its output length: a shorter answer counts as an error.

  python colocation_client.py RUN_DIR [--duration 60] [--phase 10] [--rate-on 6] ...

Writes RUN_DIR/summary.json, requests.csv, memory.csv and memory.png (vmkv), prints a
table, and one JSON line last.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from common import emit

SYSTEM_PROMPTS = 4
# SGLang admits at most context - 2 tokens per request (it clips max_new_tokens to
# max_req_len - input_len - 1, with max_req_len = context - 1); vLLM admits context.
CONTEXT_MARGIN = 2
FIRST_TOKEN, LAST_TOKEN = 5, 1000  # ids every test model's vocabulary has


@dataclass(frozen=True)
class Arrival:
    at: float
    instance: str
    prompt: list[int]
    max_tokens: int


@dataclass
class Outcome:
    instance: str
    sent_at: float
    ttft_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    error: str | None = None


def hot_instance(names: list[str], t: float, phase_s: float) -> str:
    return names[int(t // phase_s) % len(names)]


def schedule(args: argparse.Namespace, names: list[str], max_model_len: int) -> list[Arrival]:
    """Every request of the run, by arrival time: Poisson per instance, thinned from the
    hot rate so that the rate can change at phase boundaries."""
    rng = random.Random(args.seed)
    systems = [
        [rng.randrange(FIRST_TOKEN, LAST_TOKEN) for _ in range(args.shared_prefix)]
        for _ in range(SYSTEM_PROMPTS)
    ]
    top = max(args.rate_on, args.rate_off)
    arrivals = []
    for name in names:
        t = 0.0
        while True:
            t += rng.expovariate(top)
            if t >= args.duration:
                break
            rate = args.rate_on if hot_instance(names, t, args.phase) == name else args.rate_off
            if rng.random() >= rate / top:
                continue
            output = _lognormal(rng, args.output_len, 1, max_model_len // 4)
            room = max_model_len - output - args.shared_prefix - CONTEXT_MARGIN
            question = _lognormal(rng, args.prompt_len, 1, room)
            prompt = rng.choice(systems) + [rng.randrange(FIRST_TOKEN, LAST_TOKEN) for _ in range(question)]
            arrivals.append(Arrival(t, name, prompt, output))
    return sorted(arrivals, key=lambda a: a.at)


def _lognormal(rng: random.Random, mean: int, low: int, high: int, sigma: float = 0.6) -> int:
    value = rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)
    return max(low, min(high, round(value)))


def send(port: int, arrival: Arrival, start: float, timeout: float) -> Outcome:
    """One streamed completion; TTFT is the time to the first chunk that carries text."""
    outcome = Outcome(arrival.instance, arrival.at)
    fields = {
        "model": arrival.instance, "prompt": arrival.prompt, "max_tokens": arrival.max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        json.dumps(fields).encode(),
        {"Content-Type": "application/json"},
    )
    sent = time.monotonic()
    outcome.sent_at = sent - start
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            for line in reply:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and outcome.ttft_s is None:
                    outcome.ttft_s = time.monotonic() - sent
                if chunk.get("usage"):
                    outcome.tokens = chunk["usage"]["completion_tokens"]
        outcome.latency_s = time.monotonic() - sent
    except OSError as error:
        outcome.error = f"{type(error).__name__}: {error}"
        return outcome
    if outcome.tokens != arrival.max_tokens:
        outcome.error = f"made {outcome.tokens} of {arrival.max_tokens} tokens"
    return outcome


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(outcomes: list[Outcome], makespan: float) -> dict:
    done = [o for o in outcomes if o.error is None]
    ttfts = [o.ttft_s for o in done]
    tpots = [(o.latency_s - o.ttft_s) / (o.tokens - 1) for o in done if o.tokens > 1]
    tokens = sum(o.tokens for o in done)
    summary = {"requests": len(outcomes), "errors": len(outcomes) - len(done), "output_tokens": tokens}
    summary["throughput_tok_s"] = round(tokens / makespan, 1) if makespan > 0 else 0.0
    for q in (50, 90, 99):
        summary[f"ttft_p{q}_s"] = percentile(ttfts, q)
    summary["tpot_p50_s"], summary["tpot_p99_s"] = percentile(tpots, 50), percentile(tpots, 99)
    summary["ttft_s"] = sorted(ttfts)
    return summary


def run(args: argparse.Namespace) -> dict:
    listing = args.run_dir / "servers.json"
    if not listing.is_file():
        raise SystemExit(f"{listing} not found: start the instances with start_server.sh first")
    state = json.loads(listing.read_text())
    names = [i["name"] for i in state["instances"]]
    ports = {i["name"]: i["port"] for i in state["instances"]}
    arrivals = schedule(args, names, state["max_model_len"])
    timeline = None
    if state["segment"]:
        from vmkv.coordinator.timeline import Timeline

        timeline = Timeline(state["segment"], period_s=0.25)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def record(arrival: Arrival) -> None:
        outcome = send(ports[arrival.instance], arrival, start, args.request_timeout)
        with lock:
            outcomes.append(outcome)

    start = time.monotonic()
    offset = timeline.now() if timeline else 0.0
    with ThreadPoolExecutor(max_workers=args.max_in_flight) as pool:
        for arrival in arrivals:
            time.sleep(max(0.0, start + arrival.at - time.monotonic()))
            pool.submit(record, arrival)
    makespan = time.monotonic() - start
    phases = [
        (hot_instance(names, t, args.phase), offset + t, offset + min(t + args.phase, args.duration))
        for t in [k * args.phase for k in range(math.ceil(args.duration / args.phase))]
    ]
    summary = {
        "mode": state["mode"], "engine": state["engine"], "device": state["device"], "model": state["model"],
        "budget_bytes": state["budget_bytes"], "kv_bytes_per_instance": state["kv_bytes"],
        "traffic": {k: v for k, v in vars(args).items() if k != "run_dir"}, "makespan_s": round(makespan, 2),
        "command": " ".join(sys.argv),
        "all": summarize(outcomes, makespan),
        "instances": {n: summarize([o for o in outcomes if o.instance == n], makespan) for n in names},
        "first_errors": sorted({o.error for o in outcomes if o.error})[:5],
    }  # fmt: skip
    with (args.run_dir / "requests.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(outcomes[0]))) if outcomes else None
        if writer:
            writer.writeheader()
            writer.writerows(asdict(o) for o in sorted(outcomes, key=lambda o: o.sent_at))
    if timeline is not None:
        timeline.close()
        timeline.write_csv(args.run_dir / "memory.csv")
        summary["memory_plot"] = timeline.plot(args.run_dir / "memory.png", state["budget_bytes"], phases)
        summary["peak_held_bytes"] = {n: timeline.peak(n, 0.0, math.inf) for n in names}
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def print_table(summary: dict) -> None:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    print(f"\n{summary['mode']}: {summary['makespan_s']} s")
    print(
        f"{'instance':>8} {'reqs':>5} {'errors':>6} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'tok/s':>8}"
    )
    for name, row in [*summary["instances"].items(), ("all", summary["all"])]:
        print(
            f"{name:>8} {row['requests']:>5} {row['errors']:>6} {seconds(row['ttft_p50_s']):>9} "
            f"{seconds(row['ttft_p99_s']):>8} {seconds(row['tpot_p50_s']):>9} {row['throughput_tok_s']:>8}"
        )
    for error in summary["first_errors"]:
        print(f"  error: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="the directory start_server.sh wrote servers.json to")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    parser.add_argument("--phase", type=float, default=10.0, help="seconds each instance stays hot in turn")
    parser.add_argument("--rate-on", type=float, default=6.0, help="requests/s to the hot instance")
    parser.add_argument("--rate-off", type=float, default=0.3, help="requests/s to each cold instance")
    parser.add_argument(
        "--prompt-len", type=int, default=256, help="mean prompt tokens after the shared prefix"
    )
    parser.add_argument("--output-len", type=int, default=96, help="mean output tokens")
    parser.add_argument("--shared-prefix", type=int, default=64, help="tokens of the shared system prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-in-flight", type=int, default=1024)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--json", action="store_true", help="print the last line as JSON")
    args = parser.parse_args()
    for name in ("duration", "phase", "rate_on", "prompt_len", "output_len"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    summary = run(args)
    print_table(summary)
    brief = {k: v for k, v in summary["all"].items() if k != "ttft_s"}
    emit(
        {"bench": "colocation_client", "mode": summary["mode"], "device": summary["device"], **brief},
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
