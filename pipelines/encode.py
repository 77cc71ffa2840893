"""Encode: captioned clips -> spacetime patch tokens in DATA/latents, stored once.

    clips + captions -> [skip clips already encoded] -> actor pool (VAE + text encoder per actor):
        decode the clip at its bucket size -> VAE encode -> patchify -> embed the caption
    -> DATA/latents/<batch-id>.parquet (pipelines/latents.py), failures -> DATA/quarantine

`EncodeStage` is a `pipelines.stage.Stage` (VAE and text encoder loaded once per actor,
failures quarantined). Exactly-once like the caption stage: deterministic per-batch file names
written whole, and a re-run drops the clips that already have latents. With nothing to encode
because no clip has a caption yet, `run_encode` raises `MissingInputError` naming `sora caption`.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.caption import best_captions
from pipelines.ingest import require_clips
from pipelines.latents import LATENTS_SCHEMA, make_row, read_latents
from pipelines.stage import MissingInputError, Stage, StageOutput, StageResources, collect_stats


@dataclass(kw_only=True)
class EncodeConfig(StageResources):
    """How `sora encode` encodes clips (with `StageResources`: actors, num_gpus, torch_threads)."""

    vae: str  # VAE directory: ours (`sora train-vae`) or a diffusers video VAE (sora.vae.load_vae decides)
    text_encoder: str | None = None  # local Hugging Face text encoder directory (None: the offline MiniLM)
    patch_size: tuple[int, int, int] = (1, 2, 2)  # spacetime patch size t,h,w in latent cells
    batch_size: int = 4  # clips per actor call
    dtype: Literal["float16", "float32"] = "float16"  # storage dtype of tokens and text states
    max_text_tokens: int = 64  # the caption's tokens kept by the text encoder
    # latent frames per causal encode chunk (bounded memory on long or large clips); None: sized by chunk_pixels
    chunk_latent_frames: int | None = None
    chunk_pixels: int = 1 << 24  # frames x height x width per chunk when chunk_latent_frames is None
    tile_size: int | None = None  # spatial tile side in pixels for very large frames (None: whole frames)
    decode_timeout: float = 120.0  # seconds one clip's decode may take before it is quarantined

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive integers t,h,w, got {self.patch_size}")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        for name in ("batch_size", "max_text_tokens", "chunk_pixels", "chunk_latent_frames", "tile_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.decode_timeout <= 0:
            raise ValueError(f"decode_timeout must be positive, got {self.decode_timeout}")


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


class EncodeStage(Stage):
    """VAE and text encoder loaded once per actor; per clip: decode, encode, patchify, embed."""

    name = "encode"
    config_cls = EncodeConfig
    output = "latents"
    schema = LATENTS_SCHEMA

    def setup(self) -> None:
        from sora.text_encoder import TextEncoder
        from sora.vae import load_vae

        self.vae = load_vae(self.cfg.vae, device=self.device)
        self.text = TextEncoder.from_pretrained(self.cfg.text_encoder, max_length=self.cfg.max_text_tokens,
                                                device=self.device)
        self.vae_name = vae_id(self.cfg.vae)
        self.text_name = self.cfg.text_encoder or "minilm"

    def process_item(self, clip: dict[str, Any]) -> dict[str, Any]:
        return self.encode_clip(clip, str(clip["caption"]))

    def process(self, items: list[dict[str, Any]]) -> StageOutput:
        out = super().process(items)
        out.counters["bytes"] = sum(len(r["tokens"]) + len(r["text"]) for r in out.rows)
        return out

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


def pending_clips(data: str) -> tuple[pa.Table, int, int]:
    """Captioned clips without latents yet, plus (clips without a caption, already encoded).
    FileNotFoundError when DATA has no clips (the message names `sora ingest`)."""
    clips = require_clips(data)
    latest = best_captions(data)  # one caption per clip; a model recaption beats a sidecar
    done = set(read_latents(data, columns=["clip_id"])["clip_id"].to_pylist())
    ids = clips["clip_id"].to_pylist()
    has_caption = pa.array([c in latest for c in ids])
    not_done = pa.array([c not in done for c in ids])
    todo = clips.filter(pc.and_(has_caption, not_done))
    todo = todo.append_column("caption", pa.array([latest[c] for c in todo["clip_id"].to_pylist()], pa.string()))
    return todo.sort_by("clip_id"), sum(1 for c in ids if c not in latest), sum(1 for c in ids if c in done)


def run_encode(data: str, cfg: EncodeConfig, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Encode every captioned clip of DATA that has no latents yet (Ray Data actor pool).
    Raises `MissingInputError` when no clip has a caption (run `sora caption` first)."""
    import ray

    from pipelines.ray_utils import table_blocks

    t0 = time.perf_counter()
    todo, uncaptioned, already = pending_clips(data)
    if todo.num_rows == 0 and already == 0 and uncaptioned:
        raise MissingInputError(f"{data}: none of its {uncaptioned} clips has a caption yet; "
                                f"run `sora caption --data {data}` first")
    result = {"to_encode": todo.num_rows, "already_encoded": already, "without_caption": uncaptioned,
              "encoded": 0, "failed": 0, "bytes": 0}
    if todo.num_rows:
        ds = EncodeStage.apply(ray.data.from_arrow(table_blocks(todo, cfg.batch_size)), cfg, out=data,
                               batch_size=cfg.batch_size)
        stats = collect_stats(ds, todo.num_rows, progress)
        result.update(encoded=stats["ok"], failed=stats["failed"], bytes=stats.get("bytes", 0),
                      actors_used=len(stats["actors"]), batches=stats["batches"])
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
