from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def vmkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmkv", *args], capture_output=True, text=True, timeout=120)


def test_info_json_reports_every_backend_and_why():
    result = vmkv("info", "--json")
    assert result.returncode == 0, result.stderr
    report = {entry["backend"]: entry for entry in json.loads(result.stdout)["backends"]}
    assert set(report) == {"host", "cuda", "acl"}
    host = report["host"]
    assert host["available"] and host["device_count"] == 1 and host["granularity"] == 4096
    assert host["total_bytes"] > 0
    acl = report["acl"]  # through the test shim (conftest sets VMKV_ACL_LIBRARY)
    assert acl["available"] and acl["granularity"] == 2 << 20
    for entry in report.values():
        assert entry["available"] or entry["reason"]


def test_info_text_and_a_missing_acl_library():
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("VMKV_ACL_LIBRARY", "ASCEND_HOME_PATH")}
    result = subprocess.run([sys.executable, "-m", "vmkv", "info"], capture_output=True, text=True, env=env)
    assert result.returncode == 0
    acl_line = next(line for line in result.stdout.splitlines() if line.startswith("acl"))
    assert "neither VMKV_ACL_LIBRARY nor ASCEND_HOME_PATH is set" in acl_line
    env["VMKV_ACL_LIBRARY"] = "/nonexistent/libascendcl.so"
    result = subprocess.run([sys.executable, "-m", "vmkv", "info"], capture_output=True, text=True, env=env)
    assert "/nonexistent/libascendcl.so" in result.stdout


def test_unknown_verb_is_an_error_without_a_shell():
    result = vmkv("rm -rf /")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_demo_pages_grow_and_come_back():
    result = vmkv("demo", "--seconds", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert "after the run: A=0 B=0" in last
    peak_a = int(last.split("A=")[1].split()[0])
    assert peak_a > 100  # MiB mapped during A's burst


def test_listing_a_segment_that_does_not_exist_names_it():
    missing = f"/vmkv-{os.getuid()}-nobody-opened-this"
    for verb in ("ls", "reset"):
        result = vmkv(verb, "--segment", missing)
        assert result.returncode == 1
        assert f"no coordinator segment {missing!r}" in result.stderr
        assert "Traceback" not in result.stderr


def test_the_cli_touches_no_shared_memory_outside_the_users_own_names():
    """`vmkv reset --segment` on another program's shared memory, or a spill tier's
    name, is refused by name and removes nothing."""
    foreign = Path("/dev/shm") / f"not-vmkv-{os.getpid()}"
    foreign.write_bytes(b"\0" * (1 << 20))
    foreign.chmod(0o600)
    try:
        for name in (f"/{foreign.name}", f"/vmkv-{os.getuid()}-spill-x", f"/vmkv-{os.getuid()}-a/b"):
            for verb in ("reset", "ls"):
                result = vmkv(verb, "--segment", name)
                assert (
                    result.returncode == 1 and f"segment name {name!r} is not one of yours" in result.stderr
                )
                assert "Traceback" not in result.stderr
        assert foreign.exists()
    finally:
        foreign.unlink()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["limit", "x", "--weight", "0"], "a weight from 1 to 1000000, not '0'"),
        (["metrics", "--port", "99999"], "a port from 1 to 65535, not '99999'"),
        (["top", "--interval", "nan"], "seconds from 0.01 to 3600, not 'nan'"),
        (["top", "--iterations", "-1"], "a count >= 0, not '-1'"),
        (["demo", "--seconds", "-1"], "seconds from 0.5 to 3600, not '-1'"),
    ],
)
def test_out_of_range_options_are_usage_errors_naming_them(argv, message):
    result = vmkv(*argv)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
