"""benchmarks.common: the side-by-side runner waits for an earlier run's processes to go idle."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.common import settle, side_by_side

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_settle_waits_for_a_busy_child_then_returns():
    child = subprocess.Popen([sys.executable, "-c", BUSY.format(s=1.5)])  # an earlier run's process finishing
    try:
        waited = settle(timeout_s=20)
        assert child.poll() is not None and 1.0 <= waited < 10, waited  # returned once the child was done
    finally:
        child.kill()
    assert settle(timeout_s=20) < 1.5  # nothing busy: one window
    spinner = subprocess.Popen([sys.executable, "-c", BUSY.format(s=30)])
    try:
        assert 1.0 <= settle(timeout_s=1.0) < 2.5  # never idle: it gives up at the timeout
    finally:
        spinner.kill()


def test_side_by_side_settled_starts_each_run_after_the_last_ones_children():
    started, children = [], []

    def run():
        started.append(time.perf_counter())
        for p in children:
            assert p.poll() is not None, "a run started beside the last one's busy process"
        children.append(subprocess.Popen([sys.executable, "-c", BUSY.format(s=0.4)]))

    try:
        tb, to = side_by_side(run, run, repeats=1, warmup=1, settled=True)
        assert len(started) == 4 and len(tb) == len(to) == 1
    finally:
        for p in children:
            p.kill()
