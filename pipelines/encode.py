"""Encode: captioned clips -> spacetime patch tokens in DATA/latents, stored once.

    clips + captions -> [skip clips already encoded] -> actor pool (VAE + text encoder per actor):
        decode the clip at its bucket size -> VAE encode -> patchify -> embed the caption
    -> DATA/latents/<batch-id>.parquet (pipelines/latents.py), failures -> DATA/quarantine

`EncodeStage` is a `pipelines.stage.Stage` (VAE and text encoder loaded once per actor,
failures quarantined). The VAE and text encoder are given one by one (``vae``, ``text_encoder``)
or as a model directory (``model``: ours or a diffusers Wan directory, a path or URL) whose VAE,
text encoder, tokenizer length (512 for UMT5) and patch size are used. Rows record the VAE
(``vae_id``) and text encoder (``sora.model_dir.text_encoder_name``) they came from; the states
of the empty prompt under that text encoder (what a dropped caption becomes in training: Wan's
unconditional prompt) are stored once per dataset and encoder in DATA/null_text
(``read_null_text``).

Exactly-once like the caption stage: deterministic per-batch file names written whole, and a
re-run drops the clips that already have latents. With nothing to encode because no clip has a
caption yet, `run_encode` raises `MissingInputError` naming `sora caption`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.caption import best_caption_table
from pipelines.clips import content_crop, require_clips
from pipelines.latents import LATENTS_SCHEMA, make_row, read_latents
from pipelines.stage import MissingInputError, Stage, StageOutput, StageResources, collect_stats


@dataclass(kw_only=True)
class EncodeConfig(StageResources):
    """How `sora encode` encodes clips (with `StageResources`: actors, num_gpus, torch_threads)."""

    # VAE directory: ours (`sora train-vae`) or a diffusers video VAE (sora.vae.load_vae decides); or give model
    vae: str | None = None
    # model directory (ours or a diffusers Wan directory; path or URL) whose VAE, text encoder and patch size to use
    model: str | None = None
    text_encoder: str | None = None  # local Hugging Face text encoder directory (None: the offline MiniLM)
    # spacetime patch size t,h,w in latent cells (None: the model's, else 1,2,2)
    patch_size: tuple[int, int, int] | None = None
    batch_size: int = 4  # clips per actor call
    dtype: Literal["float16", "float32"] = "float16"  # storage dtype of tokens and text states
    max_text_tokens: int | None = None  # the caption's tokens kept by the text encoder (None: the model's, else 64)
    # latent frames per causal encode chunk (bounded memory on long or large clips); None: sized by chunk_pixels
    chunk_latent_frames: int | None = None
    chunk_pixels: int = 1 << 24  # frames x height x width per chunk when chunk_latent_frames is None
    tile_size: int | None = None  # spatial tile side in pixels for very large frames (None: whole frames)
    decode_timeout: float = 120.0  # seconds one clip's decode may take before it is quarantined
    # clips each of an actor's two batches decodes ahead of the models (0: in turn, one batch per
    # actor); each waits in memory as frames
    prefetch: int = 1
    # actor pool size (None: as many as the cluster holds at torch_threads CPUs each, or one per GPU)
    actors: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.vae is None) == (self.model is None):
            raise ValueError("give a VAE directory (vae, --vae) or a model directory (model, --model), one of them")
        given = [k for k in ("text_encoder", "patch_size", "max_text_tokens") if getattr(self, k) is not None]
        if self.model is not None and given:
            raise ValueError(f"{', '.join(given)} come from the model directory {self.model}: leave them out")
        if self.patch_size is not None:
            if len(self.patch_size) != 3 or min(self.patch_size) < 1:
                raise ValueError(f"patch_size must be three positive integers t,h,w, got {self.patch_size}")
            self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be 0 (decode in turn) or more, got {self.prefetch}")
        for name in ("batch_size", "max_text_tokens", "chunk_pixels", "chunk_latent_frames", "tile_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.decode_timeout <= 0:
            raise ValueError(f"decode_timeout must be positive, got {self.decode_timeout}")


def _start_decoder_quietly() -> None:
    from sora.video_io import start_decoder

    with contextlib.suppress(Exception):  # the first read retries, and its error is the clip's reason
        start_decoder()


def vae_id(vae_dir: str) -> str:
    """Which VAE made the latents: its directory name plus a hash of its config and weights' size."""
    from sora.model_dir import component_id

    return component_id(vae_dir)


def chunk_latent_frames(cfg: EncodeConfig, frames: int, height: int, width: int, temporal: int) -> int | None:
    """Latent frames per causal chunk when encoding a (frames, height, width) clip with a VAE of
    `temporal` compression, or None for one pass (the clip fits in one chunk)."""
    latent_frames = 1 + (frames - 1) // temporal
    n = cfg.chunk_latent_frames or max(1, cfg.chunk_pixels // (temporal * height * width))
    return None if n >= latent_frames else n


class EncodeStage(Stage):
    """VAE and text encoder loaded once per actor; per clip: decode, encode, patchify, embed.
    The next clip decodes (`load_item`, a decode subprocess) while the models work on this one,
    across batches too (two batches per actor, one in the models: `Stage.calls_per_actor`)."""

    name = "encode"
    config_cls = EncodeConfig
    output = "latents"
    schema = LATENTS_SCHEMA

    def setup(self) -> None:
        import threading

        # the decode worker (an interpreter importing its decoders) starts while the models load;
        # should it fail here, the first read starts it again and says why
        threading.Thread(target=_start_decoder_quietly, name="encode-decoder-start", daemon=True).start()
        from sora.model_dir import component_path, fetch_model_dir, load_text_encoder, read_index, text_encoder_name
        from sora.text_encoder import TextEncoder
        from sora.vae import load_vae

        if self.cfg.model is not None:  # fetched on this actor's node when a URL
            model = fetch_model_dir(self.cfg.model)
            index = read_index(model)
            vae_dir = component_path(model, index["vae"])
            self.text = load_text_encoder(model, index, device=self.device)
            self.text_name = text_encoder_name(model, index)
            self.patch_size = tuple(int(p) for p in index["patch_size"])
        else:
            vae_dir = self.cfg.vae
            self.text = TextEncoder.from_pretrained(self.cfg.text_encoder, max_length=self.cfg.max_text_tokens or 64,
                                                    device=self.device)
            self.text_name = self.cfg.text_encoder or "minilm"
            self.patch_size = self.cfg.patch_size or (1, 2, 2)
        self.prefetch = self.cfg.prefetch  # clips `load_item` decodes ahead (the Stage's hook)
        self.vae = load_vae(vae_dir, device=self.device)
        self.vae_name = vae_id(vae_dir)
        sc = self.vae.spatial_compression
        self.stride = sc * self.patch_size[1], sc * self.patch_size[2]  # (h, w) pixels per token
        if self.out is not None:
            write_null_text(self.out, self.text_name, self.text)

    def load_item(self, clip: dict[str, Any]) -> np.ndarray:
        return self.read_clip(clip)

    def process_item(self, clip: dict[str, Any], frames: np.ndarray | None = None) -> dict[str, Any]:
        return self.encode_clip(clip, str(clip["caption"]), frames)

    def process(self, items: list[dict[str, Any]]) -> StageOutput:
        out = super().process(items)
        out.counters["bytes"] = sum(len(r["tokens"]) + len(r["text"]) for r in out.rows)
        return out

    def read_clip(self, clip: dict) -> np.ndarray:
        """The clip's frames at its bucket size, (T, H, W, 3) uint8 (the decode subprocess)."""
        from sora.video_io import read_frames

        t, w, h = int(clip["bucket_frames"]), int(clip["bucket_width"]), int(clip["bucket_height"])
        if h % self.stride[0] or w % self.stride[1]:
            raise ValueError(f"bucket {w}x{h} does not split into this model's patches: its sides must be multiples "
                             f"of {self.stride[1]}x{self.stride[0]} (VAE x{self.vae.spatial_compression} times patch "
                             f"{self.patch_size[1]}x{self.patch_size[2]})")
        start = int(clip["start_frame"])
        return read_frames(str(clip["source"]), list(range(start, start + t)), size=(w, h), crop=content_crop(clip),
                           timeout=self.cfg.decode_timeout)

    def encode_clip(self, clip: dict, caption: str, frames: np.ndarray | None = None) -> dict:
        """One latents row: the clip's ``frames`` (`read_clip`'s; None: decoded now) through the
        VAE and patchify, ``caption`` through the text encoder."""
        import torch

        from sora.patches import grid_for, patchify

        if frames is None:
            frames = self.read_clip(clip)
        t, h, w = frames.shape[:3]
        x = torch.from_numpy(frames).to(self.device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # (1, 3, T, H, W)
        with torch.no_grad():
            kwargs = {}
            chunk = chunk_latent_frames(self.cfg, t, h, w, self.vae.temporal_compression)
            if chunk is not None:
                kwargs["chunk_latent_frames"] = chunk
            if self.cfg.tile_size:
                kwargs["tile_size"] = self.cfg.tile_size
            z = self.vae.encode_latents(x, **kwargs)[0]  # (C, T', H', W')
            tokens = patchify(z, self.patch_size)  # (N, C*pt*ph*pw)
            states, mask = self.text.encode([caption])  # (1, L, D), (1, L)
        text = states[0][mask[0]]  # (L_real, D): padding is not stored
        dt = np.dtype(self.cfg.dtype)
        return make_row(
            tokens=tokens.float().cpu().numpy().astype(dt),
            grid=grid_for(tuple(z.shape), self.patch_size),
            patch_size=self.patch_size,
            latent_shape=tuple(int(s) for s in z.shape),
            text=text.float().cpu().numpy().astype(dt),
            text_encoder=self.text_name,
            clip=clip,
            caption=caption,
            vae=self.vae_name,
        )


NULL_TEXT_SCHEMA = pa.schema([("text_encoder", pa.string()), ("text", pa.binary()),
                              ("text_shape", pa.list_(pa.int64())), ("text_dtype", pa.string())])


def write_null_text(data: str, name: str, text_encoder) -> None:
    """Store the empty prompt's states (L0, D) float32, real tokens only, under text encoder
    ``name`` in DATA/null_text/<hash of name>.parquet (once; the same bytes on every re-run)."""
    from pipelines import storage
    from pipelines.latents import array_to_bytes

    url = storage.join(data, "null_text", f"{storage.stable_id(name)}.parquet")
    if storage.exists(url):
        return
    states, mask = text_encoder.encode([""])  # (1, L, D), (1, L)
    tb, ts, td = array_to_bytes(states[0][mask[0]].float().cpu().numpy())
    row = {"text_encoder": name, "text": tb, "text_shape": ts, "text_dtype": td}
    storage.write_parquet_atomic(pa.Table.from_pylist([row], schema=NULL_TEXT_SCHEMA), url)


def read_null_text(data: str, name: str) -> np.ndarray:
    """The empty prompt's states (L0, D) under text encoder ``name`` (a latents row's
    ``text_encoder``), as `sora encode` stored them: what training feeds for a dropped caption
    (e.g. ``sora.wan.load_wan(..., text_encoder=False, null_text=...)``)."""
    from pipelines import storage
    from pipelines.latents import bytes_to_array

    table = storage.read_table(storage.join(data, "null_text"), schema=NULL_TEXT_SCHEMA)
    rows = [r for r in table.to_pylist() if r["text_encoder"] == name]
    if not rows:
        raise FileNotFoundError(f"{data} holds no empty-prompt states for text encoder {name!r}: run `sora encode` "
                                "with that model again (it stores them once)")
    return bytes_to_array(rows[0]["text"], rows[0]["text_shape"], rows[0]["text_dtype"])


def pending_clips(data: str) -> tuple[pa.Table, int, int]:
    """Captioned clips without latents yet, plus (clips without a caption, already encoded).
    FileNotFoundError when DATA has no clips (the message names `sora ingest`)."""
    clips = require_clips(data)
    latest = best_caption_table(data)  # one caption per clip; a model recaption beats a sidecar
    done = read_latents(data, columns=["clip_id"])["clip_id"]
    # in Arrow, columns against columns: no Python object per clip on the driver
    has_caption = pc.is_in(clips["clip_id"], value_set=latest["clip_id"].combine_chunks())
    is_done = pc.is_in(clips["clip_id"], value_set=done.combine_chunks())
    todo = clips.filter(pc.and_(has_caption, pc.invert(is_done)))
    todo = todo.join(latest, "clip_id", join_type="inner")  # the caption column, last
    uncaptioned = clips.num_rows - (pc.sum(has_caption).as_py() or 0)
    return todo.sort_by("clip_id"), uncaptioned, pc.sum(is_done).as_py() or 0


def run_encode(data: str, cfg: EncodeConfig, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Encode every captioned clip of DATA that has no latents yet (Ray Data actor pool).
    Raises `MissingInputError` when no clip has a caption (run `sora caption` first)."""
    from pipelines import storage
    from pipelines.ray_utils import table_dataset

    t0 = time.perf_counter()
    if cfg.model is not None:  # a bad model directory fails here, before Ray starts any actor
        from sora.model_dir import check_model_dir

        check_model_dir(cfg.model)
    # temp files stopped writers left (before any writer of this run starts; storage.remove_stale_temps)
    started = time.time()
    stale = sum(len(storage.remove_stale_temps(storage.join(data, d), started)) for d in ("latents", "null_text")) + \
        len(storage.remove_stale_temps(storage.join(data, "quarantine"), started, rf"{EncodeStage.name}-.*"))
    todo, uncaptioned, already = pending_clips(data)
    if todo.num_rows == 0 and already == 0 and uncaptioned:
        raise MissingInputError(f"{data}: none of its {uncaptioned} clips has a caption yet; "
                                f"run `sora caption --data {data}` first")
    result = {"to_encode": todo.num_rows, "already_encoded": already, "without_caption": uncaptioned,
              "encoded": 0, "failed": 0, "bytes": 0, "stale_temps_removed": stale}
    if todo.num_rows:
        ds = EncodeStage.apply(table_dataset(todo, cfg.batch_size), cfg, out=data, batch_size=cfg.batch_size)
        stats = collect_stats(ds, todo.num_rows, progress)
        result.update(encoded=stats["ok"], failed=stats["failed"], bytes=stats.get("bytes", 0),
                      actors_used=len(stats["actors"]), batches=stats["batches"],
                      batches_per_node=stats["batches_per_node"])
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result
