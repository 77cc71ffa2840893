"""One CPU for a worker process and its decode child while they work in turns.

An ingest worker and its decode child (`sora.video_worker`) strictly alternate: the worker asks,
the child decodes, the worker works on the frames. Left to the kernel, two such pairs on two
CPUs keep drifting onto one CPU (a woken process is placed beside the one that woke it) while
the other CPU idles for the moment it takes to notice; the ingest benchmark saw about 4 % of
both cores idle that way. Pinned, each pair keeps a CPU of its own busy.

The CPU is claimed machine-wide with a lock file per CPU (`flock`): two workers, even of two
Ray nodes started on one machine, never share one, and a claim dies with its process. When
every CPU the process may use is claimed, the worker runs unpinned. Only the calling thread and
the decode child are pinned (Ray's own threads keep every CPU); `CpuClaim.release` gives both
their CPUs back.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass


def claims_dir() -> str:
    """Where the lock files live by default: one directory per user on this machine."""
    return os.path.join(tempfile.gettempdir(), f"sora-cpus-{os.getuid()}")


@dataclass
class CpuClaim:
    """A CPU this process holds for its calling thread and the given children."""

    cpu: int
    fd: int
    before: set[int]  # the thread's CPUs before the claim, given back to it and the children
    children: tuple[int, ...]

    def release(self, children: tuple[int, ...] = ()) -> None:
        """Unpin the thread, the children given at the claim and `children` (those started since
        inherited the CPU), then free the CPU for another worker. Idempotent."""
        if self.fd < 0:
            return
        for pid in {0, *self.children, *children}:
            with contextlib.suppress(OSError):  # a child that died since
                os.sched_setaffinity(pid, self.before)
        os.close(self.fd)  # drops the flock
        self.fd = -1


def claim_cpu(children: tuple[int, ...] = (), root: str | None = None) -> CpuClaim | None:
    """Pin the calling thread, and `children` (pids of this process's children, e.g. its decode
    worker), to a CPU no other claimant on this machine holds; children started later from this
    thread inherit it. None (nothing changed) when every CPU this thread may use is claimed or
    the platform has no CPU affinity. `root`: the lock files' directory (`claims_dir()`)."""
    if not hasattr(os, "sched_setaffinity"):  # Linux only (also fcntl's flock below)
        return None
    import fcntl

    before = os.sched_getaffinity(0)
    if len(before) < 2:
        return None  # already on one CPU: nothing to gain, and no CPU taken from another worker
    root = root or claims_dir()
    try:  # best effort: a directory that cannot be made leaves the worker unpinned
        os.makedirs(root, exist_ok=True)
    except OSError:
        return None
    for cpu in sorted(before):
        try:
            fd = os.open(os.path.join(root, f"cpu{cpu}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        claim = CpuClaim(cpu, fd, before, tuple(children))
        os.sched_setaffinity(0, {cpu})
        for pid in children:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, {cpu})
        return claim
    return None
