"""Latents on disk vs video on the fly, side by side on the same shapes-world clips:

1. bytes per clip: the `latents` row (tokens + text states) vs the source mp4;
2. training-batch throughput: reading `DATA/latents` and rebuilding the token tensors vs
   decoding each clip at its bucket size and running the VAE encode + patchify every time.

    python -m benchmarks.bench_latents [--quick] [--clips N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np

from benchmarks.common import median, report, side_by_side


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clips", type=int, default=None)
    ap.add_argument("--vae", default=None, help="a trained VAE dir (default: a random-init tiny VAE; speed is the same)")
    args = ap.parse_args()
    n = args.clips or (16 if args.quick else 64)

    import torch

    from pipelines.caption import CaptionConfig, run_caption
    from pipelines.encode import EncodeConfig, run_encode
    from pipelines.ingest import IngestConfig, read_clips, run_sequential
    from pipelines.latents import read_latents, tensors_from_row
    from pipelines.ray_utils import ensure_ray
    from sora.patches import patchify
    from sora.shapes import synth_dataset
    from sora.vae import CausalVideoVAE, VAEConfig, load_vae
    from sora.video_io import read_frames

    work = tempfile.mkdtemp(prefix="bench-latents-")
    raw, data = os.path.join(work, "raw"), os.path.join(work, "ds")
    synth_dataset(raw, n, seed=5)
    run_sequential([raw], data, IngestConfig(min_motion=0.0))
    run_caption(data, CaptionConfig(model=None))
    vae_dir = args.vae or os.path.join(work, "vae")
    if not args.vae:
        CausalVideoVAE(VAEConfig.preset("tiny")).save_pretrained(vae_dir)
    ensure_ray()
    run_encode(data, EncodeConfig(vae=vae_dir))

    clips = read_clips(data).to_pylist()
    table = read_latents(data)
    rows = table.to_pylist()
    video_bytes = np.mean([os.path.getsize(c["source"]) for c in clips])
    latent_bytes = np.mean([len(r["tokens"]) + len(r["text"]) for r in rows])
    token_bytes = np.mean([len(r["tokens"]) for r in rows])
    report("latents_bytes_per_clip", "bytes/clip", ("source mp4 (H.264)", video_bytes),
           ("latents row (fp16 tokens + text states)", latent_bytes), higher_is_better=False,
           extra={"clips": len(rows), "token_bytes_per_clip": round(float(token_bytes)),
                  "parquet_on_disk_bytes_per_clip": round(sum(os.path.getsize(os.path.join(data, "latents", f))
                                                              for f in os.listdir(os.path.join(data, "latents"))
                                                              if f.endswith(".parquet")) / len(rows)),
                  "text_bytes_per_clip": round(float(latent_bytes - token_bytes))})

    vae = load_vae(vae_dir)
    torch.set_num_threads(2)

    def on_the_fly():
        for c in clips:
            idx = list(range(c["start_frame"], c["start_frame"] + c["bucket_frames"]))
            f = read_frames(c["source"], idx, size=(c["bucket_width"], c["bucket_height"]))
            x = torch.from_numpy(f).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
            with torch.no_grad():
                patchify(vae.encode_latents(x, chunk_latent_frames=4)[0], (1, 2, 2))

    def from_latents():
        for r in read_latents(data).to_pylist():
            torch.from_numpy(tensors_from_row(r)["tokens"]).float()

    tb, to = side_by_side(on_the_fly, from_latents, repeats=3 if not args.quick else 2)
    report("training_batches", "clips/s", ("decode + VAE encode + patchify on the fly", len(clips) / median(tb)),
           ("read latents Parquet + rebuild tokens", len(clips) / median(to)), higher_is_better=True,
           extra={"clips": len(clips), "seconds_baseline": [round(x, 3) for x in tb],
                  "seconds_ours": [round(x, 3) for x in to], "vae": "trained" if args.vae else "random-init tiny (same cost)"})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
