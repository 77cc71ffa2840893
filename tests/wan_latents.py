"""Shapes-world latents for a Wan directory, in the `latents` Parquet contract, for training tests
and the LoRA benchmark.

Clips come from `sora.shapes` (its objects, motions, backgrounds and captions) at a few small
sizes that the Wan VAE and the transformer's (1, 2, 2) patch divide; each is encoded with the
directory's own VAE (normalised latents, as WanPipeline) and its caption with the directory's
UMT5 (Wan's prompt cleaning), and written with `pipelines.latents.make_row`, naming the VAE and
the text encoder as `sora encode --model DIR` does (`vae_id`, `text_encoder_name`), with the
empty prompt's states in DATA/null_text (`write_null_text`). Sizes are picked here, not by the
bucketer, so a few token grids repeat across many clips.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

# (width, height) in units of (VAE spatial compression x patch) pixels, and frames: 4 token grids
SHAPES = ((2, 2, 9), (3, 2, 9), (4, 2, 5), (2, 3, 5))


def shapes_clips(n: int, seed: int, unit: int) -> list[tuple[np.ndarray, str, dict]]:
    """``n`` shapes-world clips ((T, H, W, 3) uint8 frames, caption, clips-table row) cycling
    through SHAPES, ``unit`` pixels per size unit."""
    from sora.shapes import TINY, render, sample_clip

    out = []
    for i in range(n):
        w, h, t = SHAPES[i % len(SHAPES)]
        spec = dataclasses.replace(sample_clip(seed, i, ranges=TINY), width=w * unit, height=h * unit, num_frames=t)
        clip = {"clip_id": f"s{seed}-{i:04d}", "bucket": f"{spec.width}x{spec.height}x{t}", "fps": float(spec.fps),
                "bucket_width": spec.width, "bucket_height": spec.height, "bucket_frames": t,
                "source": f"shapes://{seed}/{i}", "start_frame": 0}
        out.append((render(spec), spec.caption(), clip))
    return out


def build_wan_latents(wan_dir: str, data: str, n: int, seed: int = 0, dtype=np.float32, files: int = 2) -> str:
    """Encode ``n`` shapes-world clips for the Wan directory into DATA/latents (``files`` Parquet
    files); returns DATA."""
    from pipelines.encode import vae_id, write_null_text
    from pipelines.latents import LATENTS_SCHEMA, make_row
    from sora.model_dir import text_encoder_name
    from sora.patches import grid_for, patchify
    from sora.vae import DiffusersVideoVAE
    from sora.wan import load_text_encoder

    vae = DiffusersVideoVAE.from_pretrained(os.path.join(wan_dir, "vae"))
    encoder = load_text_encoder(wan_dir)
    clips = shapes_clips(n, seed, unit=2 * vae.spatial_compression)
    latents: list = [None] * n
    for shape in sorted({c[0].shape for c in clips}):  # one VAE call per clip size
        idx = [i for i, c in enumerate(clips) if c[0].shape == shape]
        x = torch.stack([torch.from_numpy(clips[i][0]).permute(3, 0, 1, 2) for i in idx]).float() / 127.5 - 1.0
        with torch.no_grad():
            z = vae.encode_latents(x)  # (B, C, T', H', W') normalised
        for i, zi in zip(idx, z):
            latents[i] = zi
    states, mask = encoder.encode([c[1] for c in clips])  # (n, L, D), (n, L)
    name = text_encoder_name(wan_dir)
    rows = []
    for i, ((_, caption, clip), z) in enumerate(zip(clips, latents)):
        rows.append(make_row(tokens=patchify(z, (1, 2, 2)).numpy().astype(dtype), grid=grid_for(tuple(z.shape)),
                             patch_size=(1, 2, 2), latent_shape=tuple(int(s) for s in z.shape),
                             text=states[i][mask[i]].numpy().astype(dtype), text_encoder=name,
                             clip=clip, caption=caption, vae=vae_id(os.path.join(wan_dir, "vae"))))
    os.makedirs(os.path.join(data, "latents"), exist_ok=True)
    for k in range(files):
        pq.write_table(pa.Table.from_pylist(rows[k::files], schema=LATENTS_SCHEMA),
                       os.path.join(data, "latents", f"part-{k}.parquet"))
    write_null_text(data, name, encoder)
    return data
