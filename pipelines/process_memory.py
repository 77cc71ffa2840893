"""How a worker process's C heap (glibc malloc) hands memory back to the kernel.

A stage that allocates and frees arrays of a few MB per item (ingest: the analysis frames, their
float32 differences, the bar and signature frames) pays for every page of them again on each
item when glibc gives the freed memory back: glibc serves a block from `mmap` above a threshold
that starts at 128 KiB and rises only to the largest block freed so far, and trims the top of
its heap whenever more than twice that threshold is free there. A fresh process (a Ray worker)
therefore returns each item's arrays to the kernel and takes them back as new zeroed pages: one
minor page fault per 4 KiB, kernel time about as large as the stage's own numpy work. A
long-lived process that once freed a large block (a driver that wrote the videos) does not.
`keep_freed_memory` makes a worker behave like the latter from its first item: blocks up to
`mmap_mb` come from the heap, and freed memory stays in the process up to `trim_mb` at the top
of the heap, for the next item to reuse.

Only glibc has these knobs (mallopt M_TRIM_THRESHOLD / M_MMAP_THRESHOLD); elsewhere it does
nothing. numpy and PIL allocate through malloc; pyarrow has its own allocator (not affected).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX/2: 32 MiB on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_MB_MAX = 4 * ctypes.sizeof(ctypes.c_long)

_done_in: tuple[int, int, int] | None = None  # (pid, trim_mb, mmap_mb) applied (a forked child applies its own)


def keep_freed_memory(trim_mb: int = 64, mmap_mb: int = MMAP_MB_MAX) -> bool:
    """Keep freed heap memory in this process for reuse (see the module docstring): blocks
    below `mmap_mb` MiB come from the heap and up to `trim_mb` MiB free at its top stay mapped.

    Idempotent per process (cheap to call at the start of every task). Returns whether the
    setting is in force (False where the C library is not glibc). The memory kept is what the
    process already used at its peak, never more."""
    global _done_in
    if not 0 < mmap_mb <= MMAP_MB_MAX:
        raise ValueError(f"mmap_mb must be in (0, {MMAP_MB_MAX}] (glibc's limit), got {mmap_mb}")
    if trim_mb < mmap_mb:
        raise ValueError(f"trim_mb ({trim_mb}) below mmap_mb ({mmap_mb}) would give back what the heap just served")
    if _done_in == (os.getpid(), trim_mb, mmap_mb):
        return True
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_mb << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_mb << 20) == 1
    if ok:
        _done_in = (os.getpid(), trim_mb, mmap_mb)
    return ok


@functools.cache
def _glibc():
    """The process's C library when it is glibc (it has mallopt and gnu_get_libc_version)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (an AttributeError off glibc: musl, macOS)
        return libc
    except (OSError, AttributeError):
        return None
