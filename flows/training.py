"""The training flow: (train the VAE and re-encode, when asked) -> train the DiT -> evaluate ->
publish the model directory.

    from flows.training import training_flow
    training_flow(data="data/ds", out="runs/model", vae="runs/vae", max_minutes=20)

Artifacts: the loss curve (image), the eval table.
"""

from __future__ import annotations

import json
import os
import time

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.charts import data_url, line_chart
from flows.commands.common import Progress, stage_budget
from flows.data import encode_task


@task(retries=1, retry_delay_seconds=2, log_prints=True)
def train_vae_task(data: str, out: str, max_minutes: float = 10.0, workers: int = 2, preset: str = "tiny",
                   holdout: int = 100) -> dict:
    from pipelines.ray_utils import ensure_ray
    from pipelines.train_vae import VAETrainConfig, run_train_vae

    ensure_ray()
    stage_budget("train-vae", 60 * max_minutes)
    summary = run_train_vae(VAETrainConfig(data=data, out=out, preset=preset, workers=workers, max_minutes=max_minutes,
                                           holdout=holdout))
    print(f"train-vae: held-out PSNR {summary['heldout_psnr_db']:.2f} dB after {summary['steps']} steps")
    return summary


@task(retries=1, retry_delay_seconds=2, log_prints=True)
def train_dit_task(data: str, out: str, vae: str, preset: str = "tiny", workers: int = 2,
                   max_minutes: float | None = 20.0, max_steps: int | None = None, overrides: dict | None = None) -> dict:
    from pipelines.ray_utils import ensure_ray
    from pipelines.train import TrainConfig, run_training

    ensure_ray()
    stage_budget("train", 60 * max_minutes if max_minutes else None)
    cfg = TrainConfig(preset=preset, workers=workers, max_minutes=max_minutes, max_steps=max_steps, **(overrides or {}))
    summary = run_training(data, out, vae, cfg)
    print(f"train: {summary.get('steps')} steps, final loss {summary.get('final_loss')}")
    return summary


@task(retries=1, retry_delay_seconds=2, log_prints=True)
def eval_task(model: str, n_prompts: int = 100, steps: int | None = None, seed: int = 0, resolution: str = "64p",
              draft: bool = False, size_scale: int = 1) -> dict:
    """Score the model on held-out prompts (MODEL/eval.json); with draft=True every prompt is
    a low-resolution draft refined at full size and the report adds draft_agreement
    (MODEL/eval_draft.json). ``size_scale`` multiplies each prompt's width and height: with
    2 and the pipeline's half-size drafts (``draft_scale`` 0.5), a `resolution` model drafts at
    the sizes it was trained on and refines at twice them (a half-size draft of the trained
    sizes would be smaller than anything it has seen)."""
    from sora.eval_suite import evaluate
    from sora.pipeline import SoraPipeline
    from sora.shapes import make_eval_prompts

    if int(size_scale) != size_scale or size_scale < 1:
        raise ValueError(f"size_scale must be a whole number >= 1, got {size_scale!r}")
    prompts = make_eval_prompts(n_prompts, seed=seed, resolution=resolution)
    for p in prompts:
        p["width"], p["height"] = p["width"] * int(size_scale), p["height"] * int(size_scale)
    pipe = SoraPipeline.from_pretrained(model)
    bar = Progress(len(prompts), "eval draft prompts" if draft else "eval prompts")
    report = evaluate(pipe, prompts, num_inference_steps=steps, draft=draft,
                      progress=lambda done, total: bar.update(done, total))
    with open(os.path.join(model, "eval_draft.json" if draft else "eval.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print("eval:", json.dumps(report.get("accuracy", {})))
    return report


@task(retries=2, retry_delay_seconds=2)
def publish_task(model: str, publish_to: str) -> str:
    """Copy the model directory to PUBLISH_TO/<UTC time> and point PUBLISH_TO/LATEST at it
    (a pointer file written last, so readers never see a half-copied model)."""
    from pipelines import storage

    name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = storage.join(publish_to, name)
    fs, path = storage.fs_and_path(dest)
    fs.put(os.path.abspath(model).rstrip("/") + "/", path, recursive=True)
    storage.write_bytes_atomic(storage.join(publish_to, "LATEST"), name.encode())
    return dest


@flow(name="sora-training", log_prints=True)
def training_flow(data: str, out: str, vae: str | None = None, train_vae: bool = False, vae_minutes: float = 10.0,
                  preset: str = "tiny", workers: int = 2, max_minutes: float | None = 20.0,
                  max_steps: int | None = None, eval_prompts: int = 100, eval_steps: int | None = None,
                  publish_to: str | None = None, overrides: dict | None = None) -> dict:
    """Train (VAE if asked, then the DiT on DATA/latents), evaluate on held-out prompts, publish."""
    result: dict = {}
    if train_vae or not vae:
        vae = out.rstrip("/") + "-vae"  # beside the model dir, which export rewrites
        result["vae"] = train_vae_task(data, vae, vae_minutes, workers)
        result["encode"] = encode_task(data, vae)  # new VAE, new latents (the stage skips done clips)
    summary = train_dit_task(data, out, vae, preset, workers, max_minutes, max_steps, overrides)
    result["train"] = {k: v for k, v in summary.items() if k != "history"}
    history = summary.get("history") or []
    losses = [loss for _, loss in history]
    create_markdown_artifact(key="training-loss-curve", markdown=(
        f"## DiT training loss\n\n{len(losses)} logged steps, final {losses[-1] if losses else 'n/a'}\n\n"
        f"![loss]({data_url(line_chart({'loss': losses}, 'flow-matching loss', log_y=True))})"))
    if eval_prompts:
        report = eval_task(out, eval_prompts, eval_steps)
        result["eval"] = report
        create_table_artifact(key="eval-accuracy", table=[{"attribute": k, "accuracy": v}
                                                          for k, v in report.get("accuracy", {}).items()])
    if publish_to:
        result["published"] = publish_task(out, publish_to)
    return result
