"""Ingest throughput: the Ray Data pipeline vs a plain sequential loop over the same stage
functions and the same files, side by side in one run.

    python -m benchmarks.bench_ingest [--quick] [--videos N]

Both write to fresh output directories each repeat (no resume skipping). Ray is started once
before timing (a cluster is long-lived); its start-up time is reported separately.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from benchmarks.common import median, report, side_by_side  # noqa: E402
from media import moving_box  # noqa: E402
from sora.video_io import write_video  # noqa: E402


def make_videos(root: str, n: int, frames: int) -> None:
    sizes = [(320, 180), (180, 320), (240, 240), (320, 240), (240, 320), (382, 160)]
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        a = moving_box(w, h, frames // 2, color=tuple(int(c) for c in rng.integers(50, 255, 3)))
        b = moving_box(w, h, frames - frames // 2, bg=(60, 60, 60), direction=-1)
        write_video(os.path.join(root, f"v{i:04d}.mp4"), np.concatenate([a, b]), 24)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter videos")
    ap.add_argument("--videos", type=int, default=None, help="number of input videos")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-pin-cpu", action="store_true",
                    help="ours without a CPU per worker and its decoder (IngestConfig.pin_cpu=False): the A/B")
    args = ap.parse_args()
    n = args.videos or (12 if args.quick else 48)
    frames = 48 if args.quick else 144
    from pipelines.ingest import IngestConfig, run_ingest, run_sequential
    from pipelines.ray_utils import ensure_ray

    work = tempfile.mkdtemp(prefix="bench-ingest-")
    raw = os.path.join(work, "raw")
    os.makedirs(raw)
    make_videos(raw, n, frames)
    t0 = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - t0
    cfg = IngestConfig(pin_cpu=not args.no_pin_cpu)  # the loop (one process) never pins
    counter = {"i": 0}

    def out() -> str:
        counter["i"] += 1
        d = os.path.join(work, f"out{counter['i']}")
        shutil.rmtree(d, ignore_errors=True)
        return d

    clips = {}

    def seq():
        clips["seq"] = run_sequential([raw], out(), cfg)["clips"]

    def ray_run():
        clips["ray"] = run_ingest([raw], out(), cfg)["clips"]

    tb, to = side_by_side(seq, ray_run, repeats=args.repeats, warmup=1, settled=True)
    assert clips["seq"] == clips["ray"], clips
    report(
        "ingest",
        "videos/s",
        ("sequential loop (same stage functions)", n / median(tb)),
        ("Ray Data streaming pipeline", n / median(to)),
        higher_is_better=True,
        extra={"videos": n, "frames_per_video": frames, "clips": clips["ray"], "ray_start_s": round(ray_start, 2),
               "pin_cpu": cfg.pin_cpu,
               "seconds_baseline": [round(x, 3) for x in tb], "seconds_ours": [round(x, 3) for x in to]},
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
