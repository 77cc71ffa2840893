"""pipelines.worker_cpu: a worker and its decode child share one CPU that no other worker holds."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading

import pytest

from media import moving_box
from pipelines import worker_cpu
from pipelines.ingest import own_cpu
from pipelines.ingest_config import IngestConfig
from pipelines.worker_cpu import claim_cpu
from sora import video_io
from sora.video_worker import DecodeWorker

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs CPU affinity and at least two CPUs")
ALLOWED = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
SHOW_CPUS = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]


class OnThread:
    """Runs calls on a thread of its own, one at a time (CPU affinity is per thread)."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            fn, box = job
            try:
                box.put((True, fn()))
            except BaseException as e:  # handed to the caller
                box.put((False, e))

    def __call__(self, fn):
        box: queue.Queue = queue.Queue()
        self.jobs.put((fn, box))
        ok, value = box.get(timeout=60)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)


def test_claims_take_distinct_cpus_until_none_is_left_and_release_gives_them_back(tmp_path):
    threads = [OnThread() for _ in range(len(ALLOWED) + 1)]
    try:
        claims = [t(lambda: (claim_cpu(root=str(tmp_path)), os.sched_getaffinity(0))) for t in threads]
        held = [c for c, _ in claims[:-1]]
        assert sorted(c.cpu for c in held) == sorted(ALLOWED)  # one each, every CPU once
        assert all(cpus == {c.cpu} for c, cpus in claims[:-1])  # each thread pinned to its own
        assert claims[-1] == (None, ALLOWED)  # none left: the last one runs unpinned
        for t, c in zip(threads, held):
            t(c.release)
            t(c.release)  # idempotent
            assert t(lambda: os.sched_getaffinity(0)) == ALLOWED
        again = threads[-1](lambda: claim_cpu(root=str(tmp_path)))
        assert again is not None  # released CPUs can be claimed again
        threads[-1](again.release)
    finally:
        for t in threads:
            t.close()


def test_a_claim_pins_the_decode_child_and_the_children_started_under_it(tmp_path):
    worker, on = DecodeWorker(), OnThread()
    try:
        worker.start()
        claim = on(lambda: claim_cpu((worker.pid,), root=str(tmp_path)))
        assert os.sched_getaffinity(worker.pid) == {claim.cpu}
        later = on(lambda: subprocess.run(SHOW_CPUS, capture_output=True, text=True, check=True).stdout)
        assert later.strip() == str([claim.cpu])  # started from the pinned thread: inherited
        on(lambda: claim.release((worker.pid,)))
        assert os.sched_getaffinity(worker.pid) == ALLOWED
    finally:
        worker.close()
        on.close()


def test_a_dead_holders_cpu_is_free_again(tmp_path):
    code = ("import sys; sys.path[:0] = [sys.argv[1]]\n"
            "from pipelines.worker_cpu import claim_cpu\n"
            "c = claim_cpu(root=sys.argv[2]); print(c.cpu, flush=True); sys.stdin.read()")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", code, root, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    threads = [OnThread() for _ in ALLOWED]
    try:
        taken = int(holder.stdout.readline())
        claims = [t(lambda: claim_cpu(root=str(tmp_path))) for t in threads]
        assert claims[-1] is None and taken not in {c.cpu for c in claims[:-1]}
        holder.kill()
        holder.wait()
        freed = threads[-1](lambda: claim_cpu(root=str(tmp_path)))
        assert freed is not None and freed.cpu == taken
        for t, c in zip(threads, [*claims[:-1], freed]):
            t(c.release)
    finally:
        holder.kill()
        for t in threads:
            t.close()


@pytest.mark.parametrize("pin", [True, False])
def test_an_ingest_worker_and_its_decoder_share_a_cpu_while_on_a_block(pin, tmp_path, monkeypatch):
    """`own_cpu` around a block: the decoder it starts runs on the worker's CPU; after the block
    both have every CPU again. Off: nothing is pinned."""
    monkeypatch.setattr(worker_cpu, "claims_dir", lambda: str(tmp_path / "claims"))  # not the machine's
    path = str(tmp_path / "v.mp4")
    video_io.write_video(path, moving_box(64, 48, 8), 8)
    worker, on = DecodeWorker(), OnThread()
    monkeypatch.setattr(video_io, "_WORKER", worker)

    def block() -> tuple[set, set]:
        with own_cpu(IngestConfig(pin_cpu=pin)):
            video_io.probe(path)  # starts the decoder inside the block
            return os.sched_getaffinity(0), os.sched_getaffinity(worker.pid)

    try:
        mine, decoder = on(block)
        assert mine == decoder and len(mine) == (1 if pin else len(ALLOWED))
        assert on(lambda: os.sched_getaffinity(0)) == ALLOWED and os.sched_getaffinity(worker.pid) == ALLOWED
    finally:
        worker.close()
        on.close()


def test_a_claims_directory_that_cannot_be_made_leaves_the_worker_unpinned(tmp_path):
    (tmp_path / "file").write_text("")  # a path under a file: no directory can be made there
    on = OnThread()
    try:
        assert on(lambda: (claim_cpu(root=str(tmp_path / "file" / "claims")), os.sched_getaffinity(0))) == (None, ALLOWED)
    finally:
        on.close()
