"""A chore that a thread of its own does whenever the engine's thread asks.

The engine's thread must not wait for driver calls (mapping pages ahead, unmapping
pages that a device may still be writing), nor start a thread for each: starting one
costs about as much as a whole scheduling step's bookkeeping. So each such chore gets
one long-lived daemon thread, and asking is setting a flag under a lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("vmkv")


class BackgroundChore:
    """Runs ``work`` on a thread named ``name`` after each :meth:`wake`; wakes that come
    while it runs make one more run, not one each. The thread starts on the first wake.
    An exception from ``work`` is logged and the thread waits for the next wake."""

    def __init__(self, name: str, work: Callable[[], object]) -> None:
        self._name = name
        self._work = work
        self._changed = threading.Condition(threading.Lock())
        self._wanted = False
        self._busy = False
        self._closing = False
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        with self._changed:
            if self._closing:
                return
            self._wanted = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Whether every wake so far has been worked off within ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: not (self._wanted or self._busy), timeout)

    def close(self) -> None:
        """Stop after the run in progress, if any; later wakes do nothing."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._wanted or self._closing)
                if self._closing:
                    return
                self._wanted, self._busy = False, True
            try:
                self._work()
            except Exception:
                log.exception("vmkv background chore %s failed; it runs again at the next wake", self._name)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
