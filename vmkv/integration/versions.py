"""The one place that says whether vmkv is on, which engine versions it supports, and
how an engine layer's hooks go in.

An engine layer asks ``require(engine)`` before touching anything, then ``install``s
its hooks: an unsupported version, or one that lacks a hook point, is refused with a
clear message, never half-patched.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("vmkv")

# (owner, attribute, original -> replacement): one name an engine layer replaces,
# looked up by attribute, never by reading source.
Hook = tuple[Any, str, Callable[[Any], Any]]

# engine -> supported release lines: "major.minor" takes every patch release of it,
# "major.minor.patch" that release alone (SGLang moves its internals between patches).
# Each line names the hooks that exist in it (see the engine layer); add a line only
# with a test that runs it.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "vllm": ("0.26", "0.32"),
    "sglang": ("0.5.15", "0.5.23"),
}
# engine -> the release lines on which vmkv runs tensor-parallel ranks (vmkv.ranks).
TENSOR_PARALLEL: dict[str, tuple[str, ...]] = {"vllm": ("0.32",)}


def enabled() -> bool:
    """VMKV=1 turns vmkv on in the engines' plugins; unset or 0, they do nothing."""
    return os.environ.get("VMKV", "0").strip().lower() not in ("", "0", "false", "no", "off")


class UnsupportedVersion(RuntimeError):
    pass


class UnsupportedParallelism(RuntimeError):
    """An engine of several ranks in a layout that vmkv cannot carry its page decisions to."""

    def __init__(self, engine: str, parallelism: str) -> None:
        lines = ", ".join(line + ".x" for line in tensor_parallel_lines(engine.lower()))
        ranks = f" (or tensor-parallel ranks of the multiprocessing executor, on {engine} {lines})"
        super().__init__(
            f"vmkv supports one worker per {engine} engine{ranks if lines else ''} so far; "
            f"this one has {parallelism}. Unset VMKV to run {engine} without vmkv."
        )


def tensor_parallel_lines(engine: str) -> tuple[str, ...]:
    """The release lines of ``engine`` on which vmkv runs tensor-parallel ranks."""
    return TENSOR_PARALLEL.get(engine, ())


def release_line(version: str, supported: tuple[str, ...] = ()) -> str:
    """The entry of ``supported`` that ``version`` falls under, else its major.minor."""
    match = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise UnsupportedVersion(f"cannot read a version from {version!r}")
    minor = f"{match.group(1)}.{match.group(2)}"
    patch = f"{minor}.{match.group(3)}" if match.group(3) is not None else None
    return patch if patch in supported else minor


def require(engine: str, version: str) -> str:
    """The supported line of ``version``, or UnsupportedVersion naming what is supported."""
    supported = SUPPORTED.get(engine, ())
    line = release_line(version, supported)
    if line not in supported:
        listed = ", ".join(s if s.count(".") == 2 else s + ".x" for s in supported)
        raise UnsupportedVersion(
            f"vmkv supports {engine} {listed or '(none yet)'}; "
            f"this is {engine} {version}. Unset VMKV to run {engine} without vmkv."
        )
    return line


def install(engine: str, version: str, line: str, hooks: Sequence[Hook]) -> None:
    """Replace every hook's name, once all of them are known to exist and every
    replacement is built; RuntimeError naming those that do not exist, and any error of
    a replacement's making, leave nothing changed."""
    missing = [f"{getattr(o, '__name__', o)}.{name}" for o, name, _ in hooks if not hasattr(o, name)]
    if missing:
        raise RuntimeError(f"{engine} {version} lacks vmkv's hook points {missing}; nothing was changed")
    replacements = [(owner, name, replace(getattr(owner, name))) for owner, name, replace in hooks]
    for owner, name, replacement in replacements:  # only once every replacement is built
        setattr(owner, name, replacement)
    log.info("vmkv %s hooks installed (%s %s, pid %d)", line, engine, version, os.getpid())
