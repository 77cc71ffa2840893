"""The tiny VAE on the shapes world: held-out PSNR after a time-boxed `sora train-vae`, against
naive compression at the same ratio (keep every 4th frame and a bicubic-downsampled image of
the same number of values, then upsample back), side by side on the same held-out clips.

    python -m benchmarks.bench_vae [--quick] [--minutes 10] [--clips 600]

Acceptance (issue 4): >= 30 dB on 100 held-out clips at 4x8x8 after <= 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile

import numpy as np
import torch

from benchmarks.common import report


def naive_psnr(frames: np.ndarray, values_ratio: float) -> float:
    """PSNR of temporal x4 subsampling + spatial bicubic resampling with `values_ratio` the
    number of values of the original, then reconstruction by upsampling (nearest in time)."""
    from PIL import Image

    from sora.vae_train import psnr

    t, h, w, _ = frames.shape
    keep = frames[::4]
    s = math.sqrt(values_ratio * t / len(keep))  # spatial scale so total values match
    sw, sh = max(1, round(w * s)), max(1, round(h * s))
    small = [np.asarray(Image.fromarray(f).resize((sw, sh), Image.BICUBIC)) for f in keep]
    up = [np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in small]
    rec = np.stack([up[min(i // 4 + (1 if i % 4 >= 2 else 0), len(up) - 1)] for i in range(t)])
    x = torch.from_numpy(frames).float() / 127.5 - 1
    y = torch.from_numpy(rec).float() / 127.5 - 1
    return float(psnr(y[None], x[None])[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 minute, 120 clips (a smoke run)")
    ap.add_argument("--minutes", type=float, default=None, help="training budget (default 10)")
    ap.add_argument("--clips", type=int, default=None, help="shapes-world clips (default 600, 100 held out)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", default=None, help="keep the trained VAE in this directory")
    args = ap.parse_args()
    minutes = args.minutes or (1.0 if args.quick else 10.0)
    n = args.clips or (120 if args.quick else 600)
    holdout = 20 if args.quick else 100

    from pipelines.caption import CaptionConfig, run_caption
    from pipelines.ingest import IngestConfig, run_sequential
    from pipelines.ray_utils import ensure_ray
    from pipelines.train_vae import VAETrainConfig, heldout_psnr, load_clip_frames, run_train_vae, split_clips
    from pipelines.ingest import read_clips
    from sora.shapes import synth_dataset
    from sora.vae import CausalVideoVAE

    work = tempfile.mkdtemp(prefix="bench-vae-")
    raw, data, out = os.path.join(work, "raw"), os.path.join(work, "ds"), args.keep or os.path.join(work, "vae")
    synth_dataset(raw, n, seed=11)
    run_sequential([raw], data, IngestConfig(min_motion=0.0))
    run_caption(data, CaptionConfig(model=None))
    ensure_ray()
    summary = run_train_vae(VAETrainConfig(data=data, out=out, workers=args.workers, max_minutes=minutes, holdout=holdout))
    vae = CausalVideoVAE.from_pretrained(out)
    ours, n_held = heldout_psnr(vae, data, holdout)
    # the VAE's compression in values: C latent channels at /4 time and /8 x /8 space vs 3 RGB
    clips = read_clips(data).to_pylist()
    _, held = split_clips([c["clip_id"] for c in clips], holdout)
    rows = sorted((c for c in clips if c["clip_id"] in held), key=lambda c: c["clip_id"])
    ratios, naive = [], []
    for frames in load_clip_frames(rows):
        t, h, w, _ = frames.shape
        c, tl, hl, wl = vae.latent_shape(t, h, w)
        ratio = (c * tl * hl * wl) / (3 * t * h * w)
        ratios.append(ratio)
        naive.append(naive_psnr(frames, ratio))
    report(
        "vae_heldout_psnr",
        "PSNR",
        ("x4 frame subsampling + bicubic resize at the same number of values", float(np.mean(naive))),
        ("tiny causal 3D VAE (4x8x8)", ours),
        higher_is_better=True,
        unit="dB",
        extra={"heldout_clips": n_held, "train_clips": n - holdout, "train_minutes": summary["train_minutes"],
               "steps": summary["steps"], "workers": args.workers, "values_ratio": round(float(np.mean(ratios)), 4),
               "meets_30db": ours >= 30.0},
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
