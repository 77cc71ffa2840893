"""How fast this box runs right now: one fixed piece of CPU work, timed.

A shared VM's speed moves during a day (1.7x on the 2-core box this project is measured on), so a
wall-clock figure is only comparable with another taken at the same speed. This is the yardstick
written beside such figures: the tiny VAE (seed 0) encoding one 49 x 144 x 256 clip at one torch
thread, the median seconds of a few runs after a warm-up.

    python -m benchmarks.box_speed            # "box speed: 1.83 s per clip (runs 1.93 1.62 1.73)"
    python -m benchmarks.box_speed --repeats 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import median, tiny_vae


def seconds_per_clip(repeats: int = 3, work: str | None = None) -> tuple[float, list[float]]:
    """The median seconds per clip over REPEATS timed encodes, and each run's seconds."""
    import torch

    from sora.vae import CausalVideoVAE

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    vae = CausalVideoVAE.from_pretrained(tiny_vae(work or os.path.join(tempfile.gettempdir(), "sora-box-speed"))).eval()
    x = torch.rand(1, 3, 49, 144, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        with torch.inference_mode():
            vae.encode_latents(x)  # warm-up: first-call allocations
            for _ in range(repeats):
                t0 = time.perf_counter()
                vae.encode_latents(x)
                runs.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return median(runs), runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (default 3)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    s, runs = seconds_per_clip(args.repeats)
    print(f"box speed: {s:.2f} s per clip (runs {' '.join(f'{r:.2f}' for r in runs)}; lower is faster)")


if __name__ == "__main__":
    main()
