"""The `latents` table: spacetime patch tokens of every clip, stored once, read by every run.

One row per clip, plain Parquet (bytes + shape/dtype columns, no Ray-only extension type), so
`pyarrow.parquet.read_table` alone rebuilds the exact tensors:

    tokens       binary   raw little-endian array, shape `tokens_shape` = (N, D_in), `tokens_dtype`
    grid_t/h/w   int32    the patch grid; N = grid_t * grid_h * grid_w (t-major, then h, then w)
    patch_t/h/w  int32    the patch size (p_t, p_h, p_w)
    latent_channels, latent_t/h/w   the latent video (C, T', H', W') the tokens were cut from
    text         binary   text encoder states (L, D_text) of the caption, real tokens only
    text_shape, text_dtype, text_encoder
    clip_id, caption, bucket, fps, width, height, num_frames, source, start_frame, vae

Everything here is pure functions over numpy: the encode stage writes rows, training reads them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import storage

LATENTS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("caption", pa.string()),
        ("tokens", pa.binary()),
        ("tokens_shape", pa.list_(pa.int64())),
        ("tokens_dtype", pa.string()),
        ("grid_t", pa.int32()),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("patch_t", pa.int32()),
        ("patch_h", pa.int32()),
        ("patch_w", pa.int32()),
        ("latent_channels", pa.int32()),
        ("latent_t", pa.int32()),
        ("latent_h", pa.int32()),
        ("latent_w", pa.int32()),
        ("text", pa.binary()),
        ("text_shape", pa.list_(pa.int64())),
        ("text_dtype", pa.string()),
        ("text_encoder", pa.string()),
        ("bucket", pa.string()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_frames", pa.int32()),
        ("source", pa.string()),
        ("start_frame", pa.int64()),
        ("vae", pa.string()),
    ]
)


def array_to_bytes(a: np.ndarray) -> tuple[bytes, list[int], str]:
    """(bytes, shape, dtype name) of a C-contiguous little-endian copy of `a`."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes(), list(a.shape), a.dtype.name


def bytes_to_array(data: bytes, shape, dtype: str) -> np.ndarray:
    """Inverse of `array_to_bytes` (a writable copy)."""
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape([int(s) for s in shape]).copy()


def make_row(
    *,
    tokens: np.ndarray,
    grid: tuple[int, int, int],
    patch_size: tuple[int, int, int],
    latent_shape: tuple[int, int, int, int],
    text: np.ndarray,
    text_encoder: str,
    clip: dict[str, Any],
    caption: str,
    vae: str,
) -> dict[str, Any]:
    """One `latents` row. `tokens` (N, D_in), `text` (L, D_text), `latent_shape` (C, T', H', W');
    `clip` is the clips-table row (clip_id, bucket, fps, bucket size, source, start_frame)."""
    n = int(np.prod(grid))
    assert tokens.ndim == 2 and tokens.shape[0] == n, f"tokens {tokens.shape} do not fill grid {grid}"
    tb, ts, td = array_to_bytes(tokens)
    xb, xs, xd = array_to_bytes(text)
    return {
        "clip_id": clip["clip_id"],
        "caption": caption,
        "tokens": tb,
        "tokens_shape": ts,
        "tokens_dtype": td,
        "grid_t": grid[0],
        "grid_h": grid[1],
        "grid_w": grid[2],
        "patch_t": patch_size[0],
        "patch_h": patch_size[1],
        "patch_w": patch_size[2],
        "latent_channels": latent_shape[0],
        "latent_t": latent_shape[1],
        "latent_h": latent_shape[2],
        "latent_w": latent_shape[3],
        "text": xb,
        "text_shape": xs,
        "text_dtype": xd,
        "text_encoder": text_encoder,
        "bucket": clip["bucket"],
        "fps": float(clip["fps"]),
        "width": int(clip["bucket_width"]),
        "height": int(clip["bucket_height"]),
        "num_frames": int(clip["bucket_frames"]),
        "source": clip["source"],
        "start_frame": int(clip["start_frame"]),
        "vae": vae,
    }


def tensors_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the arrays of one row (a dict from pyarrow's `to_pylist()` or a Ray Data row):
    tokens (N, D_in), text (L, D_text), grid, patch size and latent shape."""
    return {
        "clip_id": row["clip_id"],
        "caption": row["caption"],
        "tokens": bytes_to_array(row["tokens"], row["tokens_shape"], row["tokens_dtype"]),
        "text": bytes_to_array(row["text"], row["text_shape"], row["text_dtype"]),
        "grid": (int(row["grid_t"]), int(row["grid_h"]), int(row["grid_w"])),
        "patch_size": (int(row["patch_t"]), int(row["patch_h"]), int(row["patch_w"])),
        "latent_shape": (int(row["latent_channels"]), int(row["latent_t"]), int(row["latent_h"]), int(row["latent_w"])),
        "bucket": row["bucket"],
        "fps": float(row["fps"]),
    }


def read_latents(data: str, columns: list[str] | None = None) -> pa.Table:
    return storage.read_table(storage.join(data, "latents"), schema=LATENTS_SCHEMA, columns=columns)
