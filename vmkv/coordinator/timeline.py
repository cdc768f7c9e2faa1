"""Each instance's held memory over time, sampled from the coordinator's table: what a
co-location run shows (memory moving to the busy instance) and what its plots draw."""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from vmkv.coordinator.segment import Segment

# The lease state sampled with each row, for telling why memory did or did not move.
LEASE_COLUMNS = ("leased", "reclaim_request", "reclaimable", "awaiting", "misses")


class Timeline:
    """Samples (seconds since start, instance name, held bytes) every ``period_s``, and
    with each row the instance's lease state (LEASE_COLUMNS, in pages) for the CSV."""

    def __init__(self, segment: str, period_s: float = 0.2) -> None:
        self.segment = Segment.attach(segment)
        self.period_s = period_s
        self.rows: list[tuple[float, str, int]] = []
        self.lease_rows: list[tuple[int, ...]] = []  # one per row of ``rows``
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
                self.lease_rows.append(tuple(row[column] for column in LEASE_COLUMNS))

    def peak(self, name: str, since: float, until: float) -> int:
        """The most ``name`` held between two sample times (0 if never sampled)."""
        return max((b for t, n, b in self.rows if n == name and since <= t <= until), default=0)

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            header = ("seconds", "instance", "held_bytes", *(f"{c}_pages" for c in LEASE_COLUMNS))
            rows = [(*row, *lease) for row, lease in zip(self.rows, self.lease_rows, strict=True)]
            csv.writer(f).writerows([header, *rows])

    def plot(self, path: Path, budget_bytes: int, busy: Sequence[tuple[str, float, float]] = ()) -> str:
        """Held memory per instance over time as a PNG, with the shared budget, a static
        equal split of it, and ``busy`` windows (instance, start, end) shaded. Returns the
        path, or why there is no plot (matplotlib is optional)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "(matplotlib not installed: no plot)"
        names = sorted({n for _, n, _ in self.rows} | {n for n, _, _ in busy})
        color = {name: f"C{i}" for i, name in enumerate(names)}
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for name in names:
            rows = [(t, b / 2**20) for t, n, b in self.rows if n == name]
            ax.plot([t for t, _ in rows], [b for _, b in rows], color=color[name], label=name)
        for name, start, end in busy:
            ax.axvspan(start, end, alpha=0.08, color=color[name])
        ax.axhline(budget_bytes / 2**20, color="k", linestyle="--", linewidth=0.8, label="shared budget")
        split = budget_bytes / max(1, len(names)) / 2**20
        ax.axhline(split, color="gray", linestyle=":", linewidth=0.8, label="static equal split")
        ax.set_xlabel("seconds")
        ax.set_ylabel("KV memory held (MiB)")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return str(path)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
