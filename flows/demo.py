"""`sora demo`: the whole system on the embedded default, end to end, with a report.

    shapes world -> data flow (ingest -> caption) -> train VAE -> encode -> train captioner
    -> train DiT -> samples (6 aspect ratios, image-to-video, extension, join, draft -> full)
    -> eval on held-out prompts -> DIR/report.html + DIR/metrics.json

Everything runs on the local machine (Ray local, Prefect's temporary server) with no network.
The default run takes ~40 minutes on 2 cores; `--quick` ~3 minutes (tests use it). The terminal
shows each stage and its progress; Ray's and Prefect's own output goes to DIR/logs/ray.log.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import numpy as np
from prefect import flow

from flows.commands.common import Progress, finish_progress, stage_budget
from flows.data import caption_task, encode_task, ingest_task
from flows.demo_plan import PLANS, DemoPlan, make_plan  # noqa: F401 - PLANS, DemoPlan: re-exported

ASPECTS = {"16:9": 16 / 9, "9:16": 9 / 16, "1:1": 1.0, "4:3": 4 / 3, "3:4": 3 / 4, "2.39:1": 2.39}


def say(msg: str, t0: float, plan_minutes: float) -> None:
    finish_progress()  # the last stage's progress line ends before the next header
    print(f"[demo {(time.monotonic() - t0) / 60:5.1f}/{plan_minutes:.0f} min] {msg}", flush=True)


def _size_for(aspect: float, base: tuple[int, int]) -> tuple[int, int]:
    from sora.buckets import fit_size

    return fit_size(aspect, base[0] * base[1], 16)


def make_samples(model: str, out: str, plan: DemoPlan) -> list[dict]:
    """Samples of every mode; returns rows for the report (file names relative to out)."""
    import torch

    from sora.pipeline import SoraPipeline, export_to_video
    from sora.video_io import write_webp

    pipe = SoraPipeline.from_pretrained(model)
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    rows = []
    bar = Progress(len(ASPECTS) + 6, "samples")

    def save(name: str, frames: np.ndarray, title: str, prompt: str, **info) -> np.ndarray:
        export_to_video(frames, os.path.join(out, "samples", f"{name}.mp4"), fps=8)
        write_webp(os.path.join(out, "samples", f"{name}.webp"), frames, fps=8)
        rows.append({"name": name, "title": title, "prompt": prompt, "video": f"samples/{name}.mp4",
                     "preview": f"samples/{name}.webp", "shape": list(frames.shape), **info})
        bar(1, name)
        return frames

    common = dict(num_inference_steps=plan.steps, num_frames=plan.sample_frames)
    prompts = ["A large red circle moves from left to right across a black background.",
               "A large yellow square moves up across a navy background.",
               "A large cyan triangle moves from right to left across a gray background.",
               "A large magenta circle moves down across a black background.",
               "A large green square moves from left to right across a gray background.",
               "A large white triangle moves up across a navy background."]
    videos = {}
    for (label, aspect), prompt in zip(ASPECTS.items(), prompts):
        w, h = _size_for(aspect, plan.sample_size)
        frames = pipe(prompt, width=w, height=h, generator=torch.Generator().manual_seed(1), **common).frames
        videos[label] = save(f"t2v_{label.replace(':', 'x').replace('.', '_')}", frames, f"text-to-video {label} ({w}x{h})",
                             prompt)
    w, h = plan.sample_size
    first = videos["16:9"]
    img = first[0]
    prompt = prompts[0]
    save("i2v", pipe.image_to_video(prompt, img, width=w, height=h, generator=torch.Generator().manual_seed(2),
                                    **common).frames, "image-to-video (first frame given)", prompt)
    save("extend_forward", pipe.extend(prompt, first, direction="forward", width=w, height=h,
                                       generator=torch.Generator().manual_seed(3), **common).frames,
         "extend forward", prompt)
    save("extend_backward", pipe.extend(prompt, first, direction="backward", width=w, height=h,
                                        generator=torch.Generator().manual_seed(4), **common).frames,
         "extend backward", prompt)
    second = pipe(prompts[4], width=w, height=h, generator=torch.Generator().manual_seed(5), **common).frames
    save("join", pipe.join(first, second, prompt, width=w, height=h, generator=torch.Generator().manual_seed(6),
                           **common).frames, "join (end of A -> start of B)", prompt)
    out_draft = pipe.draft_and_refine(prompt, width=w, height=h, generator=torch.Generator().manual_seed(7), **common)
    save("draft", out_draft.draft_frames, "draft (low resolution)", prompt)
    save("refined", out_draft.frames, "draft refined at full resolution", prompt)
    return rows


@flow(name="sora-demo", log_prints=True)
def demo_flow(out: str = "demo", quick: bool = False, overrides: dict | None = None) -> dict:
    """Run the quick or default plan (`overrides`: some of its fields replaced) into OUT."""
    from flows.report import write_report
    from flows.training import eval_task, train_dit_task, train_vae_task
    from sora.shapes import DEFAULT_RANGES, TINY, synth_dataset

    plan = make_plan(quick, overrides)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    est = plan.estimate_minutes()
    say(f"starting the {'quick' if quick else 'default'} demo: about {est:.0f} minutes on 2 cores; output in {out}, "
        f"Ray's and Prefect's own output in {out}/logs/ray.log", t0, est)
    metrics: dict = {"plan": asdict(plan), "timings_s": {}}

    def phase(name: str, start: float) -> None:
        metrics["timings_s"][name] = round(time.monotonic() - start, 1)

    s = time.monotonic()
    raw, data = os.path.join(out, "raw"), os.path.join(out, "data")
    say(f"1/8 synth: {plan.clips} shapes-world clips", t0, est)
    bar = Progress(plan.clips, "synth clips")
    synth_dataset(raw, plan.clips, seed=1, ranges=TINY if plan.tiny_clips else DEFAULT_RANGES,
                  progress=lambda done, total: bar.update(done, total))
    phase("synth", s)

    s = time.monotonic()
    say("2/8 data flow: ingest -> caption (ground-truth sidecars)", t0, est)
    ingest = ingest_task(sources=[raw], data=data, min_motion=0.0, resolution="64p")
    caption_task(data)
    metrics["ingest"] = {k: ingest[k] for k in ("clips", "quarantine_rows", "wall_seconds", "buckets")}
    phase("data", s)

    s = time.monotonic()
    say(f"3/8 train the VAE ({plan.vae_minutes} min)", t0, est)
    vae_dir = os.path.join(out, "vae")
    vae = train_vae_task(data, vae_dir, plan.vae_minutes, workers=plan.vae_workers, holdout=plan.vae_holdout)
    metrics["vae"] = {k: vae[k] for k in ("heldout_psnr_db", "heldout_clips", "steps", "train_minutes")}
    phase("train_vae", s)

    s = time.monotonic()
    say("4/8 encode clips to latent patches", t0, est)
    metrics["encode"] = encode_task(data, vae_dir, actors=min(plan.encode_actors, os.cpu_count() or 1))
    phase("encode", s)

    s = time.monotonic()
    say(f"5/8 train the captioner ({plan.captioner_minutes} min) and score it on held-out clips", t0, est)
    from pipelines.train_captioner import run_train_captioner

    stage_budget("train-captioner", 60 * plan.captioner_minutes)  # its workers' step lines make the progress line
    # Both cores when there are two (data parallel, as `sora train-captioner` defaults to).
    metrics["captioner"] = run_train_captioner(data, os.path.join(out, "captioner"), max_minutes=plan.captioner_minutes,
                                               holdout=plan.captioner_eval, workers=min(2, os.cpu_count() or 1))
    phase("train_captioner", s)

    s = time.monotonic()
    say(f"6/8 train the DiT ({plan.dit_minutes} min)", t0, est)
    model = os.path.join(out, "model")
    # cache_data: materialise the (small) latents before the 2 workers take both CPUs, so the
    # streaming read never waits for a CPU that the trainer holds (a deadlock on 2 cores).
    dit = train_dit_task(data, model, vae_dir, "tiny", 2, plan.dit_minutes, plan.dit_steps,
                         overrides={"cache_data": True, **plan.dit_overrides})
    metrics["dit"] = {k: v for k, v in dit.items() if k != "history"}
    losses = [loss for _, loss in dit.get("history", [])]
    phase("train_dit", s)

    s = time.monotonic()
    say("7/8 samples: 6 aspect ratios, image-to-video, extension, join, draft -> full", t0, est)
    samples = make_samples(model, out, plan)
    phase("samples", s)

    s = time.monotonic()
    say(f"8/8 eval on {plan.eval_prompts} held-out prompts", t0, est)
    report = eval_task(model, plan.eval_prompts, plan.steps)
    metrics["eval"] = {k: v for k, v in report.items() if k != "rows"}
    if plan.draft_prompts:
        # drafted at the 64p sizes the DiT trained on and refined at twice them: a half-size
        # draft of a 64p target would be smaller than anything the DiT has seen
        draft = eval_task(model, plan.draft_prompts, plan.steps, draft=True, size_scale=2)
        metrics["eval_draft"] = {k: v for k, v in draft.items() if k != "rows"}
    phase("eval", s)

    metrics["total_minutes"] = round((time.monotonic() - t0) / 60, 2)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    write_report(os.path.join(out, "report.html"), metrics, samples, losses)
    say(f"done in {metrics['total_minutes']} min: {out}/report.html, {out}/metrics.json", t0, est)
    return metrics
