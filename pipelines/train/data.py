"""Training data: latents rows -> samples -> packs within a token budget (per worker), or
same-shape batches within it for models that run one forward per shape (``by_grid``)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch

from pipelines import storage
from pipelines.latents import read_latents, tensors_from_row
from pipelines.train.config import TrainConfig
from sora.packing import Sample, batch_by_token_budget
from sora.patches import position_ids


def sample_from_row(row: dict[str, Any]) -> Sample:
    """One latents row -> a Sample: tokens (N, D_in) float32, positions (N, 3) from the grid,
    text states (L, D_text) float32 with an all-True mask (only real tokens are stored)."""
    t = tensors_from_row(row)
    tokens = torch.from_numpy(t["tokens"].astype(np.float32, copy=False))  # (N, D_in)
    text = torch.from_numpy(t["text"].astype(np.float32, copy=False))  # (L, D_text)
    return Sample(tokens=tokens, positions=position_ids(t["grid"]), grid=t["grid"], text=text,
                  text_mask=torch.ones(text.shape[0], dtype=torch.bool),
                  metadata={"clip_id": t["clip_id"]})


def batch_by_grid(samples: Iterable[Sample], max_tokens: int, *, max_samples: int | None = None
                  ) -> Iterator[list[Sample]]:
    """Group a stream of samples into same-shape batches (one token grid each) of at most
    ``max_tokens`` tokens: one open batch per grid, emitted when the next sample of its grid would
    overflow it (or ``max_samples`` is reached); what is left open goes out at the end of the
    stream, oldest first. Every sample appears exactly once. For models that cannot mix shapes
    in one forward (``DenoiserSpec.packed`` False): a mixed pack would run one forward per shape."""
    assert max_tokens > 0, "max_tokens must be positive"
    open_batches: dict[tuple[int, int, int], list[Sample]] = {}
    for s in samples:
        if s.num_tokens > max_tokens:
            raise ValueError(f"a sample of {s.num_tokens} tokens (grid {s.grid}) exceeds the token budget {max_tokens}")
        batch = open_batches.setdefault(tuple(s.grid), [])
        if batch and ((len(batch) + 1) * s.num_tokens > max_tokens or
                      (max_samples is not None and len(batch) >= max_samples)):
            yield open_batches.pop(tuple(s.grid))
            batch = open_batches.setdefault(tuple(s.grid), [])
        batch.append(s)
    yield from open_batches.values()


def _batches(samples: Iterable[Sample], cfg: TrainConfig, by_grid: bool) -> Iterator[list[Sample]]:
    if by_grid:
        return batch_by_grid(samples, cfg.tokens_per_step, max_samples=cfg.max_samples_per_pack)
    return batch_by_token_budget(samples, cfg.tokens_per_step, max_samples=cfg.max_samples_per_pack)


def iter_packs(shard, cfg: TrainConfig, epoch: int, rank: int, skip_rows: int = 0, by_grid: bool = False,
               keep: list[Sample] | None = None) -> Iterator[list[Sample]]:
    """One epoch of this worker's shard as packs (lists of Samples within the token budget;
    same-shape batches with ``by_grid``, see `batch_by_grid`).

    ``skip_rows`` rows are read and dropped first: the resume point inside an epoch. Ray
    Data's streaming split does not promise the same rows to the same worker on a re-run, so
    this resumes the *amount* of data seen in the epoch, not the exact rows. ``keep``: every
    sample read is appended to it, the skipped ones too (the whole shard once the packs are
    exhausted)."""
    shuffle = cfg.shuffle_buffer_rows or None
    batches = shard.iter_batches(batch_size=16, batch_format="pyarrow", local_shuffle_buffer_size=shuffle,
                                 local_shuffle_seed=(cfg.seed * 1000003 + epoch * 1009 + rank) if shuffle else None)

    def samples() -> Iterator[Sample]:
        skip = skip_rows
        for table in batches:
            for row in table.to_pylist():
                if skip > 0 and keep is None:
                    skip -= 1
                    continue
                sample = sample_from_row(row)
                if keep is not None:
                    keep.append(sample)
                if skip > 0:
                    skip -= 1
                else:
                    yield sample

    yield from _batches(samples(), cfg, by_grid)


def iter_cached_packs(cached: list[Sample], cfg: TrainConfig, epoch: int, rank: int, skip_rows: int = 0,
                      by_grid: bool = False) -> Iterator[list[Sample]]:
    """Like `iter_packs`, from this worker's samples kept in memory: a seeded shuffle per
    (seed, epoch, rank), then the first ``skip_rows`` dropped (resume inside an epoch)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
    order = torch.randperm(len(cached), generator=g).tolist()[skip_rows:]
    yield from _batches((cached[i] for i in order), cfg, by_grid)


def samples_mb(info: dict[str, Any]) -> float:
    """What all the latents of `inspect_latents` ``info`` take in memory as Samples (float32
    tokens and text states, int64 positions), in MB."""
    token_dim = info["latent_channels"] * int(np.prod(info["patch_size"]))
    per_row = info["mean_tokens"] * (4 * token_dim + 8 * 3) + 4 * info["max_text_tokens"] * info["text_dim"]
    return info["rows"] * per_row / 1e6


def inspect_latents(data: str) -> dict[str, Any]:
    """What the model must match, from the small columns of DATA/latents (plain pyarrow)."""
    cols = ["latent_channels", "patch_t", "patch_h", "patch_w", "grid_t", "grid_h", "grid_w", "text_shape",
            "text_encoder", "vae", "fps", "width", "height", "num_frames"]
    table = read_latents(data, columns=cols).to_pydict()
    n = len(table["grid_t"])
    if n == 0:
        raise FileNotFoundError(f"{storage.join(data, 'latents')} holds no rows: run `sora encode` first")

    def one(key: str):
        values = set(map(str, table[key]))
        if len(values) != 1:
            raise ValueError(f"latents mix several {key} values {sorted(values)[:4]}: train on one at a time")
        return table[key][0]

    def mode(key: str):
        values, counts = np.unique(np.asarray(table[key]), return_counts=True)
        return values[counts.argmax()].item()

    tokens = [t * h * w for t, h, w in zip(table["grid_t"], table["grid_h"], table["grid_w"])]
    return {
        "rows": n, "max_tokens": max(tokens), "mean_tokens": float(np.mean(tokens)),
        "latent_channels": int(one("latent_channels")),
        "patch_size": (int(one("patch_t")), int(one("patch_h")), int(one("patch_w"))),
        "text_dim": int(table["text_shape"][0][1]), "max_text_tokens": max(int(s[0]) for s in table["text_shape"]),
        "text_encoder": one("text_encoder"), "vae": one("vae"),
        "fps": mode("fps"), "width": int(mode("width")), "height": int(mode("height")),
        "num_frames": int(mode("num_frames")),
    }
