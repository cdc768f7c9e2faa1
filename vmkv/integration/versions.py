"""The one place that says which engine versions vmkv supports.

An engine layer asks ``require(engine)`` before touching anything: an unsupported
version is refused with a clear message, never half-patched.
"""

from __future__ import annotations

import re

# engine -> supported release lines (major.minor). Each line names the hooks that exist
# in it (see the engine layer); add a line only with a test that runs it.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "vllm": ("0.26", "0.32"),
    "sglang": (),
}


class UnsupportedVersion(RuntimeError):
    pass


def release_line(version: str) -> str:
    match = re.match(r"^(\d+)\.(\d+)", version)
    if match is None:
        raise UnsupportedVersion(f"cannot read a version from {version!r}")
    return f"{match.group(1)}.{match.group(2)}"


def require(engine: str, version: str) -> str:
    """The release line of ``version``, or UnsupportedVersion naming what is supported."""
    line = release_line(version)
    supported = SUPPORTED.get(engine, ())
    if line not in supported:
        raise UnsupportedVersion(
            f"vmkv supports {engine} {', '.join(s + '.x' for s in supported) or '(none yet)'}; "
            f"this is {engine} {version}. Unset VMKV to run {engine} without vmkv."
        )
    return line
