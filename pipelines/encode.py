"""Encode: captioned clips -> spacetime patch tokens in DATA/latents, stored once.

    clips + captions -> [skip clips already encoded] -> actor pool (VAE + text encoder per actor):
        decode the clip at its bucket size -> VAE encode -> patchify -> embed the caption
    -> DATA/latents/<batch-id>.parquet (pipelines/latents.py), failures -> DATA/quarantine

Exactly-once like the caption stage: deterministic per-batch file names written whole, and a
re-run drops the clips that already have latents.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import storage
from pipelines.caption import best_captions
from pipelines.ingest import QUARANTINE_SCHEMA, read_clips
from pipelines.latents import LATENTS_SCHEMA, make_row, read_latents


@dataclass
class EncodeConfig:
    vae: str  # local VAE dir (ours or a diffusers one; sora.vae.load_vae decides)
    text_encoder: str | None = None  # local HF encoder dir; None = the offline MiniLM
    patch_size: tuple[int, int, int] = (1, 2, 2)
    batch_size: int = 4  # clips per actor call
    actors: int = 1
    num_gpus: float | None = None  # per actor; None = 1 if the cluster has GPUs
    dtype: str = "float16"  # storage dtype of tokens and text states (halves the bytes)
    max_text_tokens: int = 64
    # Causal chunked encode (bounded memory on long or large clips): n latent frames per chunk,
    # or None to size chunks by `chunk_pixels` (frames x height x width per chunk). Chunks cost
    # time, so small clips go whole: a 33-frame 112x64 clip encoded in chunks of 4 latent
    # frames took 2.4x as long as in one pass (1.51 s vs 0.62 s, tiny VAE, one thread).
    chunk_latent_frames: int | None = None
    chunk_pixels: int = 1 << 24  # ~16.8M: a 64p clip in one pass, 1080p in chunks of 2 latent frames
    tile_size: int | None = None  # spatial tiling (pixels) for very large frames
    decode_timeout: float = 120.0


def vae_id(vae_dir: str) -> str:
    """Which VAE made the latents: its directory name plus a hash of its config and weights' size."""
    h = hashlib.sha1()
    for name in sorted(os.listdir(vae_dir)):
        p = os.path.join(vae_dir, name)
        if name == "config.json":
            h.update(open(p, "rb").read())
        elif name.endswith(".safetensors"):
            h.update(f"{name}:{os.path.getsize(p)}".encode())
    return f"{os.path.basename(os.path.normpath(vae_dir))}@{h.hexdigest()[:12]}"


def chunk_latent_frames(cfg: EncodeConfig, frames: int, height: int, width: int, temporal: int) -> int | None:
    """Latent frames per causal chunk when encoding a (frames, height, width) clip with a VAE of
    `temporal` compression, or None for one pass (the clip fits in one chunk)."""
    latent_frames = 1 + (frames - 1) // temporal
    n = cfg.chunk_latent_frames or max(1, cfg.chunk_pixels // (temporal * height * width))
    return None if n >= latent_frames else n


class EncodeStage:
    """Ray Data callable class: VAE and text encoder loaded once per actor."""

    def __init__(self, cfg: dict, out: str):
        import torch

        from sora.text_encoder import TextEncoder
        from sora.vae import load_vae

        self.cfg = EncodeConfig(**cfg)
        self.out = out
        self.device = "cuda" if (self.cfg.num_gpus or 0) > 0 and torch.cuda.is_available() else "cpu"
        self.vae = load_vae(self.cfg.vae, device=self.device)
        self.text = TextEncoder.from_pretrained(self.cfg.text_encoder, max_length=self.cfg.max_text_tokens, device=self.device)
        self.vae_name = vae_id(self.cfg.vae)
        self.text_name = self.cfg.text_encoder or "minilm"

    def encode_clip(self, clip: dict, caption: str) -> dict:
        import torch

        from sora.patches import grid_for, patchify
        from sora.video_io import read_frames

        t, w, h = int(clip["bucket_frames"]), int(clip["bucket_width"]), int(clip["bucket_height"])
        start = int(clip["start_frame"])
        frames = read_frames(str(clip["source"]), list(range(start, start + t)), size=(w, h), timeout=self.cfg.decode_timeout)
        x = torch.from_numpy(frames).to(self.device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # (1, 3, T, H, W)
        with torch.no_grad():
            kwargs = {}
            chunk = chunk_latent_frames(self.cfg, t, h, w, self.vae.temporal_compression)
            if chunk is not None:
                kwargs["chunk_latent_frames"] = chunk
            if self.cfg.tile_size:
                kwargs["tile_size"] = self.cfg.tile_size
            z = self.vae.encode_latents(x, **kwargs)[0]  # (C, T', H', W')
            tokens = patchify(z, tuple(self.cfg.patch_size))  # (N, C*pt*ph*pw)
            states, mask = self.text.encode([caption])  # (1, L, D), (1, L)
        text = states[0][mask[0]]  # (L_real, D): padding is not stored
        dt = np.dtype(self.cfg.dtype)
        return make_row(
            tokens=tokens.float().cpu().numpy().astype(dt),
            grid=grid_for(tuple(z.shape), tuple(self.cfg.patch_size)),
            patch_size=tuple(self.cfg.patch_size),
            latent_shape=tuple(int(s) for s in z.shape),
            text=text.float().cpu().numpy().astype(dt),
            text_encoder=self.text_name,
            clip=clip,
            caption=caption,
            vae=self.vae_name,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from sora.video_io import VideoError

        t0 = time.perf_counter()
        rows, errors = [], []
        n = len(batch["clip_id"])
        for i in range(n):
            clip = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
            try:
                rows.append(self.encode_clip(clip, str(clip["caption"])))
            except VideoError as e:
                errors.append((clip, e.reason))
            except Exception as e:  # one bad clip never stops the batch
                errors.append((clip, f"{type(e).__name__}: {e}"))
        if rows:
            batch_id = storage.stable_id(*sorted(r["clip_id"] for r in rows))
            storage.write_parquet_atomic(pa.Table.from_pylist(rows, schema=LATENTS_SCHEMA),
                                         storage.join(self.out, "latents", f"{batch_id}.parquet"))
        if errors:
            q = [{"source": c["source"], "reason": r, "stage": "encode", "clip_id": c["clip_id"],
                  "start_frame": int(c["start_frame"]), "num_frames": int(c["num_frames"])} for c, r in errors]
            err_id = storage.stable_id("encode-errors", *sorted(x["clip_id"] for x in q))
            storage.write_parquet_atomic(pa.Table.from_pylist(q, schema=QUARANTINE_SCHEMA),
                                         storage.join(self.out, "quarantine", f"encode-{err_id}.parquet"))
        return {"encoded": [len(rows)], "failed": [len(errors)], "pid": [os.getpid()],
                "bytes": [sum(len(r["tokens"]) + len(r["text"]) for r in rows)], "seconds": [time.perf_counter() - t0]}


def pending_clips(data: str) -> tuple[pa.Table, int, int]:
    """Captioned clips without latents yet, plus (clips without a caption, already encoded)."""
    clips = read_clips(data)
    latest = best_captions(data)  # one caption per clip; a model recaption beats a sidecar
    done = set(read_latents(data, columns=["clip_id"])["clip_id"].to_pylist())
    ids = clips["clip_id"].to_pylist()
    has_caption = pa.array([c in latest for c in ids])
    not_done = pa.array([c not in done for c in ids])
    todo = clips.filter(pc.and_(has_caption, not_done))
    todo = todo.append_column("caption", pa.array([latest[c] for c in todo["clip_id"].to_pylist()], pa.string()))
    return todo.sort_by("clip_id"), sum(1 for c in ids if c not in latest), sum(1 for c in ids if c in done)


def run_encode(data: str, cfg: EncodeConfig, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Encode every captioned clip of DATA that has no latents yet (Ray Data actor pool)."""
    import ray

    from pipelines.ray_utils import has_gpus, table_blocks

    t0 = time.perf_counter()
    todo, uncaptioned, already = pending_clips(data)
    result = {"to_encode": todo.num_rows, "already_encoded": already, "without_caption": uncaptioned,
              "encoded": 0, "failed": 0, "bytes": 0}
    if todo.num_rows:
        if cfg.num_gpus is None:
            cfg.num_gpus = 1.0 if has_gpus() else 0.0
        ds = ray.data.from_arrow(table_blocks(todo, cfg.batch_size)).map_batches(
            EncodeStage,
            fn_constructor_kwargs={"cfg": asdict(cfg), "out": data},
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            num_gpus=cfg.num_gpus,
        )
        pids, calls = set(), 0
        for row in ds.iter_rows():
            for k in ("encoded", "failed", "bytes"):
                result[k] += int(row[k])
            pids.add(int(row["pid"]))
            calls += 1
            if progress:
                progress(result["encoded"] + result["failed"], todo.num_rows)
        result.update(actors_used=len(pids), batches=calls)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
