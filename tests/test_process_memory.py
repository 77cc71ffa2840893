"""sora.process_memory: a worker keeps its freed heap memory for the next item, large blocks
(a model's activations, a decoded clip) included where it asks for every block from the heap;
the decode worker does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memory_faults import ARRAY_BYTES, ARRAYS, LARGE_BYTES, ROUNDS
from sora.process_memory import MMAP_MB_MAX, MODEL_TRIM_MB, _glibc, keep_freed_memory, kept_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ROUNDS * ARRAYS * ARRAY_BYTES // 4096

glibc_only = pytest.mark.skipif(_glibc() is None, reason="mallopt's thresholds are glibc's")


def faults_in_fresh_process(keep: bool, count: str = "steady_state_faults", setting: str = "") -> int:
    """memory_faults.COUNT() in a new interpreter, with or without keep_freed_memory(SETTING) first."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            f"from memory_faults import {count}\n"
            "from sora.process_memory import keep_freed_memory\n"
            f"assert keep_freed_memory({setting}) if sys.argv[3] == '1' else True\n"
            f"print({count}())")
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


@glibc_only
def test_blocks_above_the_mmap_ceiling_stay_only_when_every_block_comes_from_the_heap():
    pages = ROUNDS * LARGE_BYTES // 4096
    given_back = faults_in_fresh_process(keep=False, count="large_block_faults")
    thresholds = faults_in_fresh_process(keep=True, count="large_block_faults")  # ingest's setting: 32 MiB at most
    kept = faults_in_fresh_process(keep=True, count="large_block_faults", setting=f"{MODEL_TRIM_MB}, mmap_mb=None")
    assert given_back > pages // 2 and thresholds > pages // 2, (given_back, thresholds, pages)
    assert kept < pages // 50, f"{kept} faults for {pages} pages with every block from the heap"


def test_the_setting_in_force_is_reported_and_checked():
    with pytest.raises(ValueError, match="mmap_mb"):
        keep_freed_memory(mmap_mb=0)
    with pytest.raises(ValueError, match="trim_mb"):
        keep_freed_memory(trim_mb=16, mmap_mb=None)  # below the heap's own 32 MiB blocks
    if _glibc() is not None:
        assert keep_freed_memory(MODEL_TRIM_MB, mmap_mb=None) and kept_memory() == (MODEL_TRIM_MB, None)
        assert keep_freed_memory() and kept_memory() == (64, MMAP_MB_MAX)  # a later setting replaces it


@glibc_only
def test_the_decode_worker_keeps_every_block_it_frees():
    from sora.video_worker import DecodeWorker

    worker = DecodeWorker(handler="memory_faults:decode_worker_memory", sys_path=[ROOT, os.path.join(ROOT, "tests")])
    try:
        header, frames = worker.run({"op": "memory"}, timeout=60)
    finally:
        worker.close()
    assert frames is None and tuple(header["kept"]) == (MODEL_TRIM_MB, None)


# -- Python's collector: paused while a process loads what it keeps, frozen after ------------------

def run_fresh(code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter (freezing is per process and cannot be undone in this one)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_loading_paused_collects_the_loads_garbage_once_and_freezes_what_it_keeps():
    code = ("import gc, weakref\n"
            "from sora.process_memory import frozen_objects, loading_paused\n"
            "class Node: pass\n"
            "assert frozen_objects() == 0 and gc.isenabled()\n"
            "with loading_paused():\n"
            "    assert not gc.isenabled()\n"
            "    kept = [Node() for _ in range(1000)]\n"
            "    a = Node(); a.me = a; dead = weakref.ref(a); del a\n"  # a cycle: only the collector frees it
            "    assert dead() is not None\n"
            "assert gc.isenabled() and dead() is None\n"
            "assert frozen_objects() >= 1000\n"
            "assert not any(o is kept[0] for o in gc.get_objects())\n"  # no generation holds it: not walked
            "print('ok')")
    out = run_fresh(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_loading_paused_without_freeze_only_pauses_and_restores_the_collector():
    import gc

    from sora.process_memory import frozen_objects, loading_paused

    before = frozen_objects()
    with loading_paused(freeze=False):
        assert not gc.isenabled()
    assert gc.isenabled() and frozen_objects() == before
    gc.disable()
    try:
        with loading_paused(freeze=False):
            pass
        assert not gc.isenabled()  # a collector the caller had off stays off
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="load failed"), loading_paused():  # a failed load: nothing frozen
        raise RuntimeError("load failed")
    assert gc.isenabled() and frozen_objects() == before


FINALIZER_AT_EXIT = ("class Cycle:\n"
                     "    def __del__(self):\n"
                     "        print('walked at exit', flush=True)\n"
                     "c = Cycle(); c.me = c\n")  # freed at exit only by the collector's last walk


def test_freeze_at_exit_skips_the_collectors_last_walk():
    plain = run_fresh(FINALIZER_AT_EXIT)
    assert plain.returncode == 0 and "walked at exit" in plain.stdout, plain  # what the hook saves
    hooked = run_fresh("from sora.process_memory import freeze_at_exit\nfreeze_at_exit()\nfreeze_at_exit()\n" +
                       FINALIZER_AT_EXIT)
    assert hooked.returncode == 0 and "walked at exit" not in hooked.stdout, hooked
