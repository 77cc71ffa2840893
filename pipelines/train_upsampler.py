"""Train our prompt upsampler (`sora.upsampler`) on Ray Train, in the loop shape every model
trains through (`pipelines.trainer`).

    train_upsampler_on_ray(shapes_pairs(4000, seed=0), "ups", max_minutes=2.0, workers=1)

Every worker builds the same T5 and tokenizer from the pairs (same seed) and runs
`sora.upsampler.fit_upsampler` on its share of every global batch (DDP averages the
gradients); rank 0 saves the model, which comes back as the run's checkpoint and is copied to
OUT (a normal Hugging Face directory that `PromptUpsampler.from_pretrained` loads).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from typing import Any, Sequence

from pipelines import trainer


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config`` holds the UpsamplerConfig (as a dict), the pairs, and
    seed, max_minutes, clock, threads."""
    import ray.train
    import ray.train.torch
    import torch

    from sora.upsampler import UpsamplerConfig, build_upsampler, fit_upsampler, save_upsampler

    cfg = UpsamplerConfig(**config["upsampler"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    pairs = [tuple(p) for p in config["pairs"]]
    t0 = time.perf_counter()
    torch.manual_seed(config["seed"])  # the same model on every rank (DDP also broadcasts rank 0's)
    model, tok = build_upsampler(cfg, [t for p in pairs for t in p])

    reports = trainer.MetricsReports(world, ray.train.torch.get_device())

    def progress(step: int, total: int, loss: float) -> None:  # every rank, the same steps
        reports({"step": step, "loss": loss})
        if rank == 0 and step % 100 == 0:
            print(f"[train-upsampler] step {step}/{total} loss {loss:.3f}", flush=True)

    stats = fit_upsampler(model, tok, pairs, cfg, max_minutes=config["max_minutes"], seed=config["seed"],
                          clock=config["clock"], progress=progress, rank=rank, world=world,
                          wrap=ray.train.torch.prepare_model)
    stats.update(config["extra_stats"], minutes=(time.perf_counter() - t0) / 60, vocab_size=len(tok))
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            save_upsampler(model, tok, d, cfg, stats)
        trainer.report_directory(stats, d if rank == 0 else None)


def train_upsampler_on_ray(pairs: Sequence[tuple[str, str]], out: str, *, config=None, preset: str = "tiny",
                           max_minutes: float = 2.0, seed: int = 0, clock: str = "wall", workers: int = 1,
                           cpus_per_worker: float = 1.0, storage_path: str | None = None) -> dict[str, Any]:
    """`sora.upsampler.train_upsampler` on ``workers`` Ray Train workers: the same stats, the
    same model directory in ``out``. Each worker uses max(1, int(cpus_per_worker)) torch
    threads. A run starts from scratch (storage under OUT/_train, removed after a successful run)."""
    from pipelines.ray_utils import ensure_ray
    from sora.upsampler import UpsamplerConfig

    cfg = config if config is not None else UpsamplerConfig.preset(preset)
    if not pairs:
        raise ValueError("the upsampler needs at least one (prompt, caption) pair")
    if workers < 1 or cfg.batch_size % workers:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {workers} workers: use a worker count "
                         f"that divides it")
    ensure_ray()
    loop_config = {"upsampler": asdict(cfg), "pairs": [list(p) for p in pairs], "seed": seed,
                   "max_minutes": max_minutes, "clock": clock, "threads": max(1, int(cpus_per_worker)),
                   "extra_stats": {"preset": preset if config is None else "custom"}}
    return trainer.train_to_directory(train_loop_per_worker, loop_config, out, kind="upsampler", workers=workers,
                                      cpus_per_worker=cpus_per_worker, storage_path=storage_path)
