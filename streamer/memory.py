"""Memory handed back to the system after large frees.

glibc keeps freed memory in its arenas (one per thread) for reuse, so a daemon's resident memory stays at its
peak after a large word list is freed or a large upload answered. :class:`MemoryReturn` calls glibc's
``malloc_trim(0)`` once enough was freed, a while after, in a thread of its own: it takes up to half a second
with the model loaded, and must not stall the event loop or the engine thread. Elsewhere than glibc it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable

__all__ = ["MemoryReturn"]


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None  # glibc only


class MemoryReturn:
    """Trims the allocator's arenas ``delay_s`` after ``after`` units (letters, bytes: the caller's) were freed,
    and again after that while more came meanwhile. Thread-safe; :meth:`freed` never blocks."""

    def __init__(self, after: int, delay_s: float = 1.0) -> None:
        self.after = after
        """units freed before a trim: less is simply reused"""
        self.delay_s = delay_s
        """how long after the frees the trim runs (the last references may go a little after the free is said)"""
        self.trim = _malloc_trim()
        """glibc's ``malloc_trim`` (None elsewhere: nothing to do)"""
        self._lock = threading.Lock()
        self._freed = 0  # units freed since the last trim began
        self._trimming = False

    def freed(self, amount: int) -> None:
        """``amount`` units were freed."""
        with self._lock:
            self._freed += amount
            start = self.trim is not None and self._freed >= self.after and not self._trimming
            if start:
                self._freed, self._trimming = 0, True
        if start:
            threading.Thread(target=self._return, name="malloc-trim", daemon=True).start()

    def _return(self) -> None:
        assert self.trim is not None
        while True:  # again if as much was freed meanwhile
            time.sleep(self.delay_s)
            try:
                self.trim(0)
            finally:
                with self._lock:
                    again = self._freed >= self.after
                    self._freed = 0 if again else self._freed
                    self._trimming = again
            if not again:
                return
