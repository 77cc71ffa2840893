"""How a long-lived process keeps its memory: its C heap (glibc malloc) and Python's collector.

A worker that allocates and frees the same large arrays item after item pays for every page of
them again on each item when glibc gives the freed memory back: each page comes back as a new
zeroed page, one minor page fault per 4 KiB, in kernel time. glibc serves a block from its own
`mmap` above a threshold (128 KiB at first, rising to the largest block freed so far, never
above 32 MiB) and unmaps it on free; below it, it trims the top of its heap whenever more than
twice the threshold is free there. Two cases, two settings of `keep_freed_memory`:

- arrays of a few MB (ingest: the analysis frames, their float32 differences, the bar and
  signature frames): a fresh process (a Ray worker) returns each item's arrays to the kernel,
  kernel time about as large as the stage's own numpy work, where a long-lived process that once
  freed a large block does not. The default setting serves blocks up to `mmap_mb` from the heap
  and keeps up to `trim_mb` free at its top.
- blocks above 32 MiB (a model's activations: the tiny VAE on one 49 x 144 x 256 clip faults in
  about 1 GB of fresh pages; a decoded clip at 720p is 135 MB) are mapped on their own in every
  process, long-lived or not, whatever the threshold. ``mmap_mb=None`` serves every block from
  the heap: with the freed memory kept, the VAE's kernel time per clip fell from 0.57 to 0.02
  CPU-s (1.56 -> 1.03 s a clip at one thread, 0.87 -> 0.55 s at two; peak RSS 1.25 -> 1.42 GiB).
  The stages' workers (`pipelines.stage.Stage`), the decode worker, Serve's generator replicas
  and every `sora` command run so.

The memory kept is what the process already used at its peak, never more. Only glibc has these
knobs (mallopt M_TRIM_THRESHOLD / M_MMAP_THRESHOLD / M_MMAP_MAX); elsewhere nothing changes.
numpy, PIL and torch's CPU tensors allocate through malloc; pyarrow has its own allocator.

Python's cyclic garbage collector walks every object of a generation on each of its passes.
Importing torch and transformers and loading a text encoder and a VAE makes about half a million
objects, and the collector's passes while they are made cost about a fifth of that set-up (4.5-4.9
against 3.7-3.9 CPU-s with it paused); at exit the interpreter's last pass and teardown over them
cost another 1.2-1.4 CPU-s (0.2 with them frozen, as little as `os._exit`). `loading_paused` runs a
set-up with the collector paused, then collects its garbage once and freezes what is left
(`gc.freeze`: objects a process keeps to its end are not walked again, by a later full pass nor
at exit); `freeze_at_exit` has the interpreter's exit skip the walk for what is alive then (Python
never promised finalizers of objects still alive at exit). The stages' actors load so
(`pipelines.stage.Stage`: two encode actors 4-6 CPU-s less a run of 48 clips, most of it at their
exit) and every `sora` command exits so. Serve's replicas need neither: Ray Serve collects and
freezes after a replica's constructor itself (RAY_SERVE_FREEZE_GC_ON_STARTUP).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
from typing import Iterator

# mallopt parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536  # glibc's own limit on blocks mapped at once (DEFAULT_MMAP_MAX)
# glibc refuses an mmap threshold above HEAP_MAX/2: 32 MiB on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_MB_MAX = 4 * ctypes.sizeof(ctypes.c_long)

# Freed memory a process running models keeps at the top of its heap (every block from the heap)
MODEL_TRIM_MB = 1024

_done_in: tuple[int, int, int | None] | None = None  # (pid, trim_mb, mmap_mb) applied (a forked child applies its own)
_exit_frozen_in: int | None = None  # the pid that registered `freeze_at_exit` (a forked child inherits the hook)


def keep_freed_memory(trim_mb: int = 64, mmap_mb: int | None = MMAP_MB_MAX) -> bool:
    """Keep freed heap memory in this process for reuse (see the module docstring): blocks
    below `mmap_mb` MiB come from the heap (None: every block, however large), and up to
    `trim_mb` MiB free at its top stay mapped.

    Idempotent per process (cheap to call at the start of every task). Returns whether the
    setting is in force (False where the C library is not glibc). The memory kept is what the
    process already used at its peak, never more."""
    global _done_in
    if mmap_mb is not None and not 0 < mmap_mb <= MMAP_MB_MAX:
        raise ValueError(f"mmap_mb must be in (0, {MMAP_MB_MAX}] (glibc's limit) or None, got {mmap_mb}")
    if trim_mb < (mmap_mb or MMAP_MB_MAX):
        raise ValueError(f"trim_mb ({trim_mb}) below mmap_mb ({mmap_mb or MMAP_MB_MAX}) would give back what the heap "
                         "just served")
    if _done_in == (os.getpid(), trim_mb, mmap_mb):
        return True
    libc = _glibc()
    if libc is None:
        return False
    if mmap_mb is None:  # no block mapped on its own; glibc still maps more heap when brk cannot grow
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    else:
        ok = libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, mmap_mb << 20) == 1
    ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, trim_mb << 20) == 1
    _done_in = (os.getpid(), trim_mb, mmap_mb) if ok else None
    return ok


def keep_model_memory() -> bool:
    """`keep_freed_memory` as a process that runs models or decodes video uses it: every block
    from the heap, up to `MODEL_TRIM_MB` kept free at its top."""
    return keep_freed_memory(MODEL_TRIM_MB, mmap_mb=None)


@contextlib.contextmanager
def loading_paused(*, freeze: bool = True) -> Iterator[None]:
    """Run a block that builds what the process keeps to its end (imports, model loads) with
    Python's collector paused; after it (with ``freeze``), one collection of the block's garbage,
    then everything alive frozen: never walked again by the collector, at exit neither
    (`freeze_at_exit`). Use ``freeze=False`` in a process that goes on to other work (a test, a
    script): the collector is only paused. The collector's previous state is restored; on an
    exception it is restored and nothing is frozen."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    except BaseException:
        if enabled:
            gc.enable()
        raise
    if freeze:
        gc.collect()
        gc.freeze()
        freeze_at_exit()
    if enabled:
        gc.enable()


def freeze_at_exit() -> None:
    """Have this process's exit skip the collector's last walk over its objects (`gc.freeze` as
    one of its exit steps): a process with torch and transformers loaded spends ~1.2 CPU-s
    there. Idempotent per process."""
    global _exit_frozen_in
    if _exit_frozen_in != os.getpid():
        atexit.register(gc.freeze)
        _exit_frozen_in = os.getpid()


def frozen_objects() -> int:
    """How many objects `gc.freeze` has set aside in this process (0 before any freeze)."""
    return gc.get_freeze_count()


def kept_memory() -> tuple[int, int | None] | None:
    """(trim_mb, mmap_mb) of the `keep_freed_memory` setting in force in this process, or None."""
    return _done_in[1:] if _done_in is not None and _done_in[0] == os.getpid() else None


@functools.cache
def _glibc():
    """The process's C library when it is glibc (it has mallopt and gnu_get_libc_version)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (an AttributeError off glibc: musl, macOS)
        return libc
    except (OSError, AttributeError):
        return None
