"""Train our own captioner on clips that have good captions, score it on held-out clips, and
(optionally) recaption every clip with it: the DALL-E 3 / Sora recipe.

The captioner is a normal Hugging Face model directory (sora.captioner), so `sora caption
--model OUT` loads it through the same path as any other image-text-to-text model.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipelines.caption import CaptionConfig, read_captions, is_sidecar, run_caption, sample_indices
from pipelines.ingest import require_clips
from pipelines.train_vae import split_clips


def clip_frames(clip: dict, k: int = 4, long_side: int = 96) -> np.ndarray:
    """k frames spread over the clip, decoded with the long side at `long_side` (aspect kept)."""
    from sora.video_io import read_frames

    w, h = clip["width"], clip["height"]
    s = long_side / max(w, h)
    size = (max(2, round(w * s / 2) * 2), max(2, round(h * s / 2) * 2))
    return read_frames(clip["source"], sample_indices(clip["start_frame"], clip["num_frames"], k), size=size)


def run_train_captioner(data: str, out: str, *, preset: str = "tiny", max_minutes: float = 8.0, holdout: int = 200,
                        recaption: bool = False, seed: int = 0, workers: int = 1,
                        progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Train on clips with good captions (sidecar / ground truth, or any existing caption),
    report attribute accuracy on `holdout` clips it never saw (shapes-world parser), and
    recaption all clips when asked. workers > 1 trains data parallel over that many local
    processes (see `sora.captioner.train_captioner`). Returns a summary."""
    from sora.captioner import Captioner, train_captioner
    from sora.shapes import parse_prompt

    clips = require_clips(data).to_pylist()
    t = read_captions(data)
    good = {c: text for c, text, who in zip(t["clip_id"].to_pylist(), t["caption"].to_pylist(), t["captioner"].to_pylist())
            if is_sidecar(who)} or dict(zip(t["clip_id"].to_pylist(), t["caption"].to_pylist()))
    if not good:
        raise ValueError(f"{data} has no captions to learn from: run `sora caption --data {data}` (sidecars) first")
    train_ids, held = split_clips([c["clip_id"] for c in clips if c["clip_id"] in good], holdout)
    examples = ((clip_frames(c), good[c["clip_id"]]) for c in clips if c["clip_id"] in train_ids)
    stats = train_captioner(examples, out, preset=preset, max_minutes=max_minutes, seed=seed, progress=progress,
                            workers=workers)
    cap = Captioner.from_pretrained(out)
    held_rows = [c for c in clips if c["clip_id"] in held]
    predicted = cap.caption([clip_frames(c) for c in held_rows]) if held_rows else []
    correct: dict[str, list[bool]] = {k: [] for k in ("color", "shape", "motion")}
    for c, text in zip(held_rows, predicted):
        want, got = parse_prompt(good[c["clip_id"]]), parse_prompt(text)
        for k in correct:
            correct[k].append(want[k] == got[k])
    summary = {
        "train": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))},
        "heldout_clips": len(held_rows),
        "accuracy": {k: float(np.mean(v)) if v else None for k, v in correct.items()},
        "examples": [{"truth": good[c["clip_id"]], "caption": p} for c, p in list(zip(held_rows, predicted))[:5]],
    }
    if recaption:
        summary["recaption"] = run_caption(data, CaptionConfig(model=out, recaption=True))
    return summary
