"""A one-line progress display on stderr: the core may not depend on rich or tqdm."""

from __future__ import annotations

import sys
import time


class Progress:
    """``Progress(total, "label", enabled)``; call :meth:`update` per step, :meth:`close` at the end."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.start, self.shown = 0, time.perf_counter(), 0.0

    def update(self, steps: int = 1, note: str = "") -> None:
        self.done += steps
        now = time.perf_counter()
        if self.enabled and (now - self.shown > 0.5 or self.done == self.total):  # redraw at most twice a second
            self.shown = now
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} ({now - self.start:.0f} s) {note}   ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
