"""Shared by the subcommands: a progress line, the quiet console of long commands, the help formatter."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from typing import IO, Iterator

_terminal: IO[str] | None = None  # the real stderr while a quiet console holds descriptor 2
_open: list["Progress"] = []  # progress lines not finished yet (a stage header finishes them)
_workers: "WorkerProgress | None" = None  # the active quiet console's display of training step lines


class Progress:
    """A one-line progress display on stderr (no dependency; works in CI logs too): count,
    elapsed time, rate and ETA. The ETA comes from `total`, or from `budget_s` (a stage that
    runs for a fixed time), whichever ends first.

    On a terminal the line redraws itself a few times a second; elsewhere (CI logs, a pipe)
    a fresh line every few seconds when the count moved, and the final state once."""

    def __init__(self, total: int | None, label: str, stream: IO[str] | None = None, budget_s: float | None = None):
        self.total, self.label, self.stream, self.budget_s = total, label, stream, budget_s
        self.done, self.base, self.start = 0, 0, time.monotonic()
        self._last, self._shown_done, self._finished, self.note = 0.0, None, False, ""
        _open.append(self)

    def __call__(self, n: int = 1, note: str = "") -> None:
        self.update(self.done + n, note=note)

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        """Set the count (and the total, when it becomes known) and show it if due."""
        self.done = done
        if total is not None:
            self.total = total
        self.note = note
        now = time.monotonic()
        final = self.total is not None and self.done >= self.total
        due = self._shown_done is None or now - self._last >= (0.25 if self._tty() else 5.0)
        if self._finished or not (final or due):
            return
        if not final and not self._tty() and self.done == self._shown_done:
            return  # nothing new to say in a log
        self._show(now, final)

    def finish(self) -> None:
        """Show the last state (once) and end the line."""
        if self._finished:
            return
        if self._shown_done is not None and self._shown_done == self.done:  # already on screen
            self._finished = True
            if self._tty():
                self._stream().write("\n")
        elif self._shown_done is not None or self.done:
            self._show(time.monotonic(), True)
        if self in _open:
            _open.remove(self)

    def _tty(self) -> bool:
        return getattr(self._stream(), "isatty", lambda: False)()

    def _stream(self) -> IO[str]:
        return self.stream or _terminal or sys.stderr

    def _show(self, now: float, final: bool) -> None:
        if self._finished:
            return
        self._last, self._shown_done, self._finished = now, self.done, final
        elapsed = now - self.start
        rate = (self.done - self.base) / elapsed if elapsed > 0 and self.done > self.base else None
        etas = []
        if self.total is not None and rate:
            etas.append(max(0.0, (self.total - self.done) / rate))
        if self.budget_s is not None:
            etas.append(max(0.0, self.budget_s - elapsed))
        of = f"/{self.total}" if self.total else ""
        speed = f"{rate:.2f}/s" if rate is not None and rate < 10 else f"{rate:.0f}/s" if rate else "-/s"
        eta = f", eta {min(etas):.0f}s" if etas and not final else ""
        line = f"{self.label}: {self.done}{of} [{elapsed:.0f}s] ({speed}{eta}) {self.note}".rstrip()
        stream = self._stream()
        if self._tty():
            stream.write("\r" + line.ljust(78) + ("\n" if final else ""))
        else:
            stream.write(line + "\n")
        stream.flush()
        if final and self in _open:
            _open.remove(self)


def finish_progress() -> None:
    """End every progress line still open (before a new stage's header line)."""
    for bar in list(_open):
        bar.finish()
        if bar in _open:
            _open.remove(bar)


class WorkerProgress:
    """One `Progress` per training loop from its workers' "[tag] step N[/M] ... loss X" lines
    (handed over by `pipelines.ray_utils.RayLog`); `budget(tag, seconds)` gives a
    time-budgeted stage its ETA."""

    LABELS = {"train": "DiT training steps", "train-vae": "VAE training steps",
              "train-captioner": "captioner training steps"}
    LOSS = re.compile(r"\bloss\s+([-+\d.eE]+)")

    def __init__(self):
        self.bars: dict[str, Progress] = {}
        self.budgets: dict[str, float] = {}

    def budget(self, tag: str, seconds: float | None) -> None:
        self.bars.pop(tag, None)
        if seconds is not None:
            self.budgets[tag] = seconds

    def __call__(self, tag: str, step: int, total: int | None, rest: str) -> None:
        bar = self.bars.get(tag)
        if bar is None or step < bar.done:  # the first line of a run (or of a new run)
            bar = self.bars[tag] = Progress(total, self.LABELS.get(tag, f"{tag} steps"), budget_s=self.budgets.get(tag))
            bar.base = bar.done = step  # the rate counts from here
        loss = self.LOSS.search(rest)
        bar.update(step, total, f"loss {loss[1]}" if loss else "")


def stage_budget(tag: str, seconds: float | None) -> None:
    """Tell the console that the training loop printing "[tag] step ..." lines runs for about
    `seconds` (its ETA); nothing without a quiet console."""
    if _workers is not None:
        _workers.budget(tag, seconds)


@contextlib.contextmanager
def quiet_console(log_dir: str, verbose: bool = False) -> Iterator[WorkerProgress]:
    """The console of a long command: its own lines, progress lines and real warnings on the
    terminal; Ray's output (`pipelines.ray_utils.RayLog`), the INFO chatter of Prefect's
    engine and Hugging Face download/load bars go to LOG_DIR/ray.log instead (`verbose`
    shows them too). Import Prefect before entering (it adds its console handler then).
    Yields the `WorkerProgress` that shows the training loops' step lines."""
    global _terminal, _workers
    from pipelines.ray_utils import RayLog

    bars = _workers = WorkerProgress()
    hf_bars = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    transformers_before = "transformers" in sys.modules  # else it reads the variable below when imported
    if not verbose:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read at import, here and by Ray workers and spawned ranks
        if transformers_before:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        with RayLog(os.path.join(log_dir, "ray.log"), verbose=verbose, on_progress=bars) as log:
            root = logging.getLogger()
            root.addHandler(log.handler)
            prefect_dir = _package_dir("prefect")

            def gate(record: logging.LogRecord) -> bool:
                engine = prefect_dir is not None and record.pathname.startswith(prefect_dir)
                return verbose or record.levelno >= logging.WARNING or not engine

            gated = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                     and not isinstance(h, logging.FileHandler) and h is not log.handler]
            for h in gated:
                h.addFilter(gate)
            native = getattr(log, "_native", None)
            if native is not None:
                _terminal = open(os.dup(native.real), "w", buffering=1, encoding="utf-8", errors="replace")
            try:
                yield bars
            finally:
                finish_progress()
                for h in gated:
                    h.removeFilter(gate)
                root.removeHandler(log.handler)
                if _terminal is not None:
                    _terminal.close()
                    _terminal = None
    finally:
        _workers = None
        if not verbose:
            if hf_bars is None:
                os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
            else:
                os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = hf_bars
            if transformers_before and hf_bars in (None, "0", ""):
                sys.modules["transformers"].utils.logging.enable_progress_bar()


def _package_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    return os.path.dirname(module.__file__) + os.sep if module is not None and module.__file__ else None


def add_verbose_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray's and Prefect's own output (it always goes to the run's logs/ray.log)")


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)
