"""Train our own captioner on Ray Train, on clips that have good captions; score it on held-out
clips, and (optionally) recaption every clip with it: the DALL-E 3 / Sora recipe.

    train_captioner_on_ray(examples, out, config=CaptionerConfig.preset("tiny"), workers=2)

The driver turns the clips into frame grids (`sora.captioner.encode_clips`) and puts them in
Ray's object store; every worker builds the same model (same seed) and runs
`sora.captioner.fit_captioner` on its share of every global batch, gradients averaged by DDP
(Ray Train's process group); rank 0 saves the trained model, which comes back as the run's
checkpoint and is copied to OUT. The captioner is a normal Hugging Face model directory, so
`sora caption --model OUT` loads it through the same path as any other image-text-to-text model.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from pipelines import trainer
from pipelines.caption import CaptionConfig, is_sidecar, read_captions, run_caption, sample_indices
from pipelines.clips import content_crop, content_size, require_clips
from pipelines.train_vae import split_clips


def clip_frames(clip: dict, k: int = 4, long_side: int = 96) -> np.ndarray:
    """k frames spread over the clip, decoded with the long side at `long_side` (aspect kept)."""
    from sora.video_io import read_frames

    w, h = content_size(clip)
    s = long_side / max(w, h)
    size = (max(2, round(w * s / 2) * 2), max(2, round(h * s / 2) * 2))
    return read_frames(clip["source"], sample_indices(clip["start_frame"], clip["num_frames"], k), size=size,
                       crop=content_crop(clip))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config`` holds the CaptionerConfig (as a dict), an object
    reference to the pixel values, the captions, and seed, max_minutes, clock, threads."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from sora.captioner import CaptionerConfig, build_captioner, fit_captioner, save_captioner

    cfg = CaptionerConfig(**config["captioner"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    with warnings.catch_warnings():  # a read-only view of the object store's copy: only ever indexed
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(ray.get(config["pixels"]))
    captions = config["captions"]
    torch.manual_seed(config["seed"])  # the same model on every rank (DDP also broadcasts rank 0's)
    model, processor = build_captioner(cfg, captions)

    reports = trainer.MetricsReports(world, ray.train.torch.get_device())

    def progress(step: int, total: int, loss: float) -> None:  # every rank, the same steps
        reports({"step": step, "loss": loss})
        if rank == 0 and step % 100 == 0:
            print(f"[train-captioner] step {step}/{total} loss {loss:.3f}", flush=True)

    def wrap(module):  # the tag heads see no data when no caption parses: DDP must allow unused parameters
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": True})

    stats = fit_captioner(model, processor, pixels, captions, cfg, max_minutes=config["max_minutes"],
                          seed=config["seed"], clock=config["clock"], progress=progress, rank=rank, world=world,
                          wrap=wrap)
    stats.update(config["extra_stats"], vocab_size=len(processor.tokenizer))
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_captioner(model, processor, d, cfg, stats)
        trainer.report_directory(stats, d if rank == 0 else None)


def train_captioner_on_ray(examples: Iterable[tuple[np.ndarray, str]], out: str, *, config=None,
                           preset: str = "tiny", max_minutes: float = 8.0, seed: int = 0, clock: str = "wall",
                           workers: int = 1, cpus_per_worker: float = 1.0, storage_path: str | None = None
                           ) -> dict[str, Any]:
    """`sora.captioner.train_captioner` on ``workers`` Ray Train workers (data parallel, the
    same global batch): the same stats, the same model directory in ``out``. Each worker uses
    max(1, int(cpus_per_worker)) torch threads. A run starts from scratch (storage under
    OUT/_train, removed after a successful run)."""
    import time

    import ray

    from pipelines.ray_utils import ensure_ray
    from sora.captioner import CaptionerConfig, encode_clips

    cfg = config if config is not None else CaptionerConfig.preset(preset)
    if workers < 1 or cfg.batch_size % workers:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {workers} workers: use a worker count "
                         f"that divides it")
    t0 = time.perf_counter()
    pixels, captions = encode_clips(examples, cfg)
    if len(captions) < workers:
        raise ValueError(f"{len(captions)} examples cannot feed {workers} workers")
    prep_minutes = (time.perf_counter() - t0) / 60
    ensure_ray()
    extra = {"preset": preset if config is None else "custom", "prep_minutes": prep_minutes}
    loop_config = {"captioner": asdict(cfg), "pixels": ray.put(pixels.numpy()), "captions": captions, "seed": seed,
                   "max_minutes": max_minutes, "clock": clock, "threads": max(1, int(cpus_per_worker)),
                   "extra_stats": extra}
    return trainer.train_to_directory(train_loop_per_worker, loop_config, out, kind="captioner", workers=workers,
                                      cpus_per_worker=cpus_per_worker, storage_path=storage_path)


@dataclass
class CaptionerRunConfig:
    """A `run_train_captioner` run: what to train on, how long, and what to do after."""

    data: str = ""  # dataset directory (clips + captions)
    out: str = ""  # output model directory (a Hugging Face model dir)
    preset: str = "tiny"  # captioner size (sora.captioner.PRESETS)
    max_minutes: float = 8.0  # training time budget (wall clock)
    workers: int | None = None  # Ray Train workers (None: 2 when this machine has 2 or more cores, else 1)
    holdout: int = 200  # held-out clips for the accuracy report (never trained on)
    recaption: bool = False  # recaption every clip with the trained model (Ray)
    seed: int = 0  # model init and batch order

    def __post_init__(self) -> None:
        if self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.workers is None:
            self.workers = 2 if (os.cpu_count() or 1) >= 2 else 1
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


def run_train_captioner(data: str, out: str, **options) -> dict:
    """Train on clips with good captions (sidecar / ground truth, or any existing caption) on
    Ray Train workers, report attribute accuracy on held-out clips it never saw (shapes-world
    parser), and recaption all clips when asked. ``options``: the fields of
    `CaptionerRunConfig`. Returns a summary."""
    from sora.captioner import Captioner
    from sora.shapes import parse_prompt

    run = CaptionerRunConfig(data=data, out=out, **options)
    clips = require_clips(data).to_pylist()
    t = read_captions(data)
    good = {c: text for c, text, who in zip(t["clip_id"].to_pylist(), t["caption"].to_pylist(), t["captioner"].to_pylist())
            if is_sidecar(who)} or dict(zip(t["clip_id"].to_pylist(), t["caption"].to_pylist()))
    if not good:
        raise ValueError(f"{data} has no captions to learn from: run `sora caption --data {data}` (sidecars) first")
    train_ids, held = split_clips([c["clip_id"] for c in clips if c["clip_id"] in good], run.holdout)
    examples = ((clip_frames(c), good[c["clip_id"]]) for c in clips if c["clip_id"] in train_ids)
    stats = train_captioner_on_ray(examples, out, preset=run.preset, max_minutes=run.max_minutes, seed=run.seed,
                                   workers=run.workers)
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
    if run.recaption:
        summary["recaption"] = run_caption(data, CaptionConfig(model=out, recaption=True))
    return summary
