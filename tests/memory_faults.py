"""Counting the page faults of a stage-like allocation pattern (tests of
`sora.process_memory`): what a process pays when freed heap memory goes back to the kernel."""

from __future__ import annotations

import resource

import numpy as np

ROUNDS, ARRAYS, ARRAY_BYTES = 4, 8, 5 << 19  # 8 arrays of 2.5 MiB: below numpy's huge-page size


def steady_state_faults() -> int:
    """Minor page faults of this thread over ROUNDS rounds of an item's arrays (ARRAYS of
    ARRAY_BYTES, filled, then all freed), after one warm-up round. Pages touched: about
    ROUNDS * ARRAYS * ARRAY_BYTES / 4096 (20,480); all of them fault when freed memory is given
    back between rounds, none when it is kept."""

    def one_item() -> None:
        arrays = [np.ones(ARRAY_BYTES // 8) for _ in range(ARRAYS)]
        del arrays

    one_item()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(ROUNDS):
        one_item()
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


LARGE_BYTES = 48 << 20  # one block above glibc's largest mmap threshold (32 MiB): always mapped on its own


def large_block_faults() -> int:
    """Minor page faults of this process over ROUNDS rounds of one LARGE_BYTES block (a model's
    activation, a decoded clip) from malloc, filled and freed, after one warm-up round: about
    ROUNDS * LARGE_BYTES / 4096 (49,152) when each block is unmapped on free, none when the heap
    serves and keeps it. (C's malloc and memset: numpy asks for huge pages on blocks this large,
    and torch fills them on several threads.)"""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def one_item() -> None:
        block = libc.malloc(LARGE_BYTES)
        ctypes.memset(block, 1, LARGE_BYTES)
        libc.free(block)

    one_item()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(ROUNDS):
        one_item()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def decode_worker_memory(job: dict) -> tuple[dict, None]:
    """A decode worker handler that answers with the worker's `keep_freed_memory` setting."""
    from sora.process_memory import kept_memory

    return {"kept": kept_memory()}, None
