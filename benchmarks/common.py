"""Helpers shared by the benchmark scripts: timing and the one-JSON-line-last contract."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date


def elapsed(run: Callable[[], object]) -> float:
    """Wall time of one call of ``run``."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median_seconds(
    run: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None
) -> float:
    """Median wall time of ``run`` over ``repeats`` runs; ``setup`` runs untimed before each."""
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        samples.append(elapsed(run))
    return statistics.median(samples)


def emit(result: dict[str, object], as_json: bool) -> None:
    """Print the result as the last line: JSON when asked, else a compact key=value line."""
    result = {"date": date.today().isoformat(), "host": platform.node(), **result}
    print(json.dumps(result) if as_json else " ".join(f"{k}={v}" for k, v in result.items()))
