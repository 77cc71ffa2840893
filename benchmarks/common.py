"""The benchmark convention: a baseline and ours, measured side by side in one run.

Every benchmark script calls `report(...)` once per comparison; it prints one JSON line:

    {"benchmark": "video_decode", "metric": "frames/s", "higher_is_better": true,
     "baseline": {"name": "PyAV decode + PIL resize", "value": 812.0},
     "ours": {"name": "sora.video_io.read_frames", "value": 1430.0},
     "ratio": 1.76, ...}

`ratio` is always ours/baseline of the metric, so >1 is better when higher_is_better and
<1 is better otherwise. `side_by_side` interleaves the two (A B A B ...) so drifting load
on a shared machine hits both equally, and reports medians.
`python -m benchmarks.run_all` runs every `bench_*.py` and writes BENCHMARKS.md (a table, one row per
figure, with the machine it was measured on).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux; what `platform` knows elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_vector_isa() -> str:
    """The widest x86 vector extension the CPU reports ("avx512_bf16", "avx512f", "avx2"), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    return next((isa for isa in ("avx512_bf16", "avx512f", "avx2") if isa in flags), "")


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def machine() -> dict[str, Any]:
    """What a figure was measured on: cores, CPU model, memory, GPU (if any), software versions."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "cpu": cpu_model(), "isa": cpu_vector_isa(),
                            "memory_gib": memory_gib(), "python": platform.python_version(),
                            "platform": platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def settle(timeout_s: float = 30.0, window_s: float = 0.5, busy_cores: float = 0.15) -> float:
    """Wait until this process's descendants (a Ray started here: its workers, its daemons) use
    less than ``busy_cores`` of CPU over ``window_s`` - the processes of an earlier run finishing
    their exit - or ``timeout_s`` passed; return the seconds waited."""
    import psutil

    def cpu() -> float:
        total = 0.0
        for p in psutil.Process().children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # gone meanwhile
                pass
        return total

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        before = cpu()
        time.sleep(window_s)
        if cpu() - before < busy_cores * window_s:
            break
    return time.perf_counter() - t0


def side_by_side(
    baseline: Callable[[], Any], ours: Callable[[], Any], *, repeats: int = 3, warmup: int = 1,
    settled: bool = False
) -> tuple[list[float], list[float]]:
    """Run baseline and ours alternately; return their wall-clock seconds per repeat. With
    ``settled``, each run starts once the processes an earlier run started here are idle
    (`settle`: a Ray pool's actors finishing their exit would otherwise run into the next timing)."""
    def run(fn: Callable[[], Any]) -> float:
        if settled:
            settle()
        return timed(fn)[0]

    for _ in range(warmup):
        run(baseline)
        run(ours)
    tb, to = [], []
    for _ in range(repeats):
        tb.append(run(baseline))
        to.append(run(ours))
    return tb, to


def report(
    benchmark: str,
    metric: str,
    baseline: tuple[str, float],
    ours: tuple[str, float],
    *,
    higher_is_better: bool,
    unit: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Print (and return) one benchmark result as a JSON line on stdout."""
    b_name, b_val = baseline
    o_name, o_val = ours
    row = {
        "benchmark": benchmark,
        "metric": metric,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "baseline": {"name": b_name, "value": round(float(b_val), 6)},
        "ours": {"name": o_name, "value": round(float(o_val), 6)},
        "ratio": round(float(o_val) / float(b_val), 4) if b_val else None,
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": machine(),
        "extra": extra or {},
    }
    print(json.dumps(row), flush=True)
    return row


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def tiny_vae(work: str) -> str:
    """A tiny random-weight VAE saved under WORK/vae (seed 0; kept if already there)."""
    import torch

    from sora.vae import CausalVideoVAE, VAEConfig

    d = os.path.join(work, "vae")
    if not os.path.exists(os.path.join(d, "config.json")):
        torch.manual_seed(0)
        CausalVideoVAE(VAEConfig.preset("tiny")).save_pretrained(d)
    return d
