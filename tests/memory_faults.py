"""Counting the page faults of a stage-like allocation pattern (tests of
`pipelines.process_memory`): what a process pays when freed heap memory goes back to the kernel."""

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
