"""The ingress's write path (`pipelines.serve.VideoAPI`): new jobs made durable in groups, then stored.

    POST -> JobWrites.commit(record)      waits until the record is in a journal file: every
                                          record queued while one journal write runs goes into
                                          the next one (a group commit, on a thread of its own)
         -> the answer                    the job is durable; GET serves it from `pending`
    after a pause in POSTs                each journaled job's own record + active marker are
                                          written (another thread), the journal file dropped,
                                          and `on_stored(id)` starts the job's dispatch

A `Burst` is the POSTs that come together: it lasts while one is being handled or one came or
was answered less than QUIET_S ago. Storing and dispatching wait for its end (at most BURST_S):
a burst is answered first, its follow-up work (record writes on a thread that would contend for
the GIL, generator calls through Serve's router) runs after it on the same cores. Durability
does not wait: the journal write precedes every answer, and a restarted ingress replays the
journal (`JobStore.replay_journal`). Python's cyclic garbage collector waits too: a burst
allocates many short-lived objects, and the collections they trigger would run between the
answers; held off, they run once the burst is answered (reference counting still frees
everything acyclic meanwhile; a burst longer than BURST_S gets the collector back).
"""

import asyncio
import gc
import logging
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from pipelines.video_jobs import JobStore

logger = logging.getLogger("ray.serve")

QUIET_S, BURST_S = 0.02, 1.0  # records are stored and jobs dispatched after a pause in POSTs this long (or this late)


class Burst:
    """The POSTs that create jobs, arriving together, on one event loop (see the module doc)."""

    def __init__(self, hold_gc: bool = True):
        self.hold_gc = hold_gc
        self.posting = 0  # POSTs in progress (arrived, not yet answered)
        self.last = 0.0  # event-loop time the latest of them arrived or was answered
        self._gc: str | None = None  # None, "held" (we disabled it), "released" (given back within a long burst)
        self._gc_since = 0.0

    @contextmanager
    def post(self) -> Iterator[None]:
        """Around the handling of one POST that creates a job (whatever its answer)."""
        loop = asyncio.get_running_loop()
        self.posting += 1
        self.last = loop.time()
        if self.hold_gc and self._gc is None and gc.isenabled():
            gc.disable()
            self._gc, self._gc_since = "held", self.last
            loop.call_later(QUIET_S, self._watch_gc, loop)
        try:
            yield
        finally:
            self.posting -= 1
            self.last = loop.time()

    def active(self, now: float) -> bool:
        return self.posting > 0 or now - self.last < QUIET_S

    def _watch_gc(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        if not self.active(now):
            if self._gc == "held":
                gc.enable()
            self._gc = None
            return
        if self._gc == "held" and now - self._gc_since >= BURST_S:
            gc.enable()
            self._gc = "released"  # not held again until this burst ends
        loop.call_later(QUIET_S / 2, self._watch_gc, loop)


class JobWrites:
    """The journal group commit and the deferred record writes of one ingress (its event loop)."""

    def __init__(self, store: JobStore, on_stored: Callable[[str], None], burst: Burst):
        self.store = store
        self.on_stored = on_stored
        self.burst = burst
        self.reserved = 0  # accepted requests not yet journaled (counted against max_queue)
        self.pending: dict[str, dict[str, Any]] = {}  # journaled, record not yet stored: GET reads these
        # a thread each: a group commit never waits behind the reads of polling clients (the
        # default pool), nor behind the record writes that follow it
        self._commit_pool = ThreadPoolExecutor(1, thread_name_prefix="sora-journal")
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="sora-records")
        self._to_commit: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._to_store: deque[tuple[str, list[dict[str, Any]]]] = deque()
        self._committing = self._storing = False

    def unfinished(self) -> int:
        """Accepted jobs not yet stored (journaled or on their way to the journal)."""
        return len(self.pending) + self.reserved

    async def commit(self, rec: dict[str, Any]) -> None:
        """Journal a new job together with every other one that arrives meanwhile; returns once
        it is durable (then it is in `pending` until its own record is stored). The caller has
        counted it in `reserved`; from here on the commit loop moves that slot to `pending`."""
        done = asyncio.get_running_loop().create_future()
        self._to_commit.append((rec, done))
        if not self._committing:
            self._committing = True
            asyncio.get_running_loop().create_task(self._commit_loop())
        await done

    async def stored(self, ids) -> None:
        """Wait until these jobs (if journaled just now) have their own record in the store."""
        while any(i in self.pending for i in ids):
            await asyncio.sleep(0.01)

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._to_commit:
                batch, self._to_commit = self._to_commit, []
                records = [r for r, _ in batch]
                try:
                    url = await loop.run_in_executor(self._commit_pool, self.store.journal, records)
                except Exception as e:  # noqa: BLE001 - the store refused: these POSTs fail, nothing is kept
                    logger.exception("journal write of %d jobs failed", len(records))
                    self.reserved -= len(batch)
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(e)
                    continue
                self.reserved -= len(batch)  # their queue slots, from now on held by pending
                for r in records:
                    self.pending[r["id"]] = r
                self._to_store.append((url, records))
                if not self._storing:
                    self._storing = True
                    loop.create_task(self._store_loop())
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._committing = False

    async def _store_loop(self) -> None:
        """Write each journaled job's record + active marker, drop the journal file, start the job:
        once a burst is answered (at most BURST_S into it)."""
        loop = asyncio.get_running_loop()
        try:
            while self._to_store:
                start = loop.time()
                while self.burst.active(loop.time()) and loop.time() - start < BURST_S:
                    await asyncio.sleep(QUIET_S / 2)
                url, records = self._to_store[0]
                try:
                    await loop.run_in_executor(self._store_pool, self._store_records, url, records)
                except Exception:  # noqa: BLE001 - a storage hiccup: the journal still holds them; retry
                    logger.exception("storing %d journaled jobs failed; retrying", len(records))
                    await asyncio.sleep(1.0)
                    continue
                self._to_store.popleft()
                for r in records:
                    self.pending.pop(r["id"], None)
                    self.on_stored(r["id"])
        finally:
            self._storing = False

    def _store_records(self, url: str, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.store.adopt(r)
        self.store.drop_journal(url)
