"""pipelines.process_memory: a worker keeps its freed heap memory for the next item."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memory_faults import ARRAY_BYTES, ARRAYS, ROUNDS
from pipelines.process_memory import MMAP_MB_MAX, _glibc, keep_freed_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ROUNDS * ARRAYS * ARRAY_BYTES // 4096

glibc_only = pytest.mark.skipif(_glibc() is None, reason="mallopt's thresholds are glibc's")


def faults_in_fresh_process(keep: bool) -> int:
    """steady_state_faults() in a new interpreter, with or without keep_freed_memory() first."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "from memory_faults import steady_state_faults\n"
            "from pipelines.process_memory import keep_freed_memory\n"
            "assert keep_freed_memory() if sys.argv[3] == '1' else True\n"
            "print(steady_state_faults())")
    out = subprocess.run([sys.executable, "-c", code, ROOT, os.path.join(ROOT, "tests"), "1" if keep else "0"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@glibc_only
def test_a_fresh_process_faults_its_freed_arrays_in_again_unless_it_keeps_them():
    given_back = faults_in_fresh_process(keep=False)
    kept = faults_in_fresh_process(keep=True)
    assert given_back > PAGES // 2, f"{given_back} faults for {PAGES} pages: glibc kept the memory anyway"
    assert kept < PAGES // 50, f"{kept} faults for {PAGES} pages with the memory kept"


def test_keep_freed_memory_checks_its_limits_and_is_idempotent():
    with pytest.raises(ValueError, match="mmap_mb"):
        keep_freed_memory(mmap_mb=MMAP_MB_MAX + 1)
    with pytest.raises(ValueError, match="trim_mb"):
        keep_freed_memory(trim_mb=8, mmap_mb=16)
    first = keep_freed_memory()
    assert first == (_glibc() is not None)
    assert keep_freed_memory() == first
