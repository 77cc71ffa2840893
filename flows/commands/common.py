"""Shared by the subcommands: a progress line and the help formatter."""

from __future__ import annotations

import argparse
import sys
import time


class Progress:
    """A one-line progress display on stderr (no dependency; works in CI logs too).

    Prints at most a few times per second, and always the final state."""

    def __init__(self, total: int | None, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.done, self.start, self._last = 0, time.monotonic(), 0.0

    def __call__(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        tty = getattr(self.stream, "isatty", lambda: False)()
        # a live line on a terminal; in logs (CI, Ray jobs) a fresh line every few seconds
        if now - self._last < (0.25 if tty else 5.0) and (self.total is None or self.done < self.total):
            return
        self._last = now
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        eta = f" eta {(self.total - self.done) / rate:.0f}s" if self.total and rate > 0 else ""
        line = f"{self.label}: {self.done}{of} ({rate:.1f}/s{eta}) {note}"
        if tty:
            self.stream.write("\r" + line.ljust(78))
            if self.total is not None and self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)
