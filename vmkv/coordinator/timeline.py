"""Each instance's held memory over time, sampled from the coordinator's table: what a
co-location run shows (memory moving to the busy instance) and what its plots draw."""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

from vmkv.coordinator.segment import Segment


class Timeline:
    """Samples (seconds since start, instance name, held bytes) every ``period_s``."""

    def __init__(self, segment: str, period_s: float = 0.2) -> None:
        self.segment = Segment.attach(segment)
        self.period_s = period_s
        self.rows: list[tuple[float, str, int]] = []
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.monotonic() - self.start

    def _run(self) -> None:
        page = self.segment.table.page_size
        while not self._stop.wait(self.period_s):
            now = self.now()
            for row in self.segment.table.snapshot():
                self.rows.append((now, row["name"], row["held"] * page))

    def peak(self, name: str, since: float, until: float) -> int:
        """The most ``name`` held between two sample times (0 if never sampled)."""
        return max((b for t, n, b in self.rows if n == name and since <= t <= until), default=0)

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([("seconds", "instance", "held_bytes"), *self.rows])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
