"""Prompt-adherence evaluation in the shapes world: generate each prompt, read it back, score.

    pipe = SoraPipeline.from_pretrained("model")
    prompts = shapes.make_eval_prompts(100, seed=0)         # held-out attribute combinations
    report = evaluate(pipe, prompts, num_inference_steps=30)
    report["accuracy"]   # {"color": 0.93, "shape": 0.78, "size": ..., "motion": ..., "all": ...}

Each prompt row is a dict with ``prompt`` and optionally the attributes it asks for (``color``,
``shape``, ``size``, ``motion``, ``background`` - as ``make_eval_prompts`` writes them) and
``width``, ``height``, ``num_frames``, ``fps``, ``seed``. Rows without attributes are parsed
from the prompt text (``shapes.parse_prompt``). Scoring is the analytic evaluator
(``sora.evaluator.score``), plus two exact checks the pipeline promises: the output has the
requested size and the requested frame count.

With ``draft=True`` every prompt is generated as a low-resolution draft refined at full
resolution, and the report adds ``draft_agreement``: how often the refined video shows the same
colour / shape / size / motion as its own draft (refinement should keep what the draft decided).

With ``from_reference=s`` every prompt is instead an SDEdit of its own reference clip (rows from
``make_eval_prompts`` carry one): the reference is rendered, noised to strength s and denoised
with the prompt. A diagnostic, not the benchmark: it shows at which noise level a model loses
what the clean clip had (e.g. keeps shape from s = 0.7 but not from pure noise, so the layout
is decided badly at high noise, not rendered badly at low noise).
Prompts of one shape are generated together in batches; each prompt has its own seed, so a
video does not depend on what it was batched with.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from sora.evaluator import ATTRIBUTES, analyze, score
from sora.shapes import parse_prompt


@dataclass
class EvalSettings:
    """How `evaluate` generates the prompts: ``evaluate(pipe, prompts, **asdict(settings))``."""

    num_inference_steps: int | None = None  # sampling steps (none: the model's)
    guidance_scale: float | None = None  # guidance scale (none: the model's)
    seed: int = 0  # generation seed base (prompt i uses seed + i)
    batch_size: int = 8  # prompts of one shape per model call
    # the ODE samplers euler, heun or the stochastic ancestral (none: the model's, euler)
    sampler: Literal["euler", "heun", "ancestral"] | None = None
    draft: bool = False  # evaluate draft-then-refine generation
    strength: float | None = None  # refinement strength with draft (none: 0.4)
    # SDEdit each prompt's reference clip at this strength in (0, 1] instead of generating from
    # noise (needs rows with a reference: held-out prompts, or make_eval_prompts files)
    from_reference: float | None = None
    save_dir: str | None = None  # also write every video to this directory


def _attributes(row: dict) -> dict:
    """The attributes a prompt row asks for: its own fields, else parsed from its text."""
    parsed = parse_prompt(row["prompt"])
    return {k: row.get(k) if row.get(k) is not None else parsed.get(k) for k in ATTRIBUTES + ("background",)}


def _reference(row: dict) -> np.ndarray:
    """The prompt row's reference clip, rendered (T, H, W, 3) uint8."""
    from sora.shapes import ClipSpec, render

    return render(ClipSpec.from_attributes(row["reference"]))


def _shape_key(row: dict, defaults: dict) -> tuple:
    return tuple(int(row.get(k) or defaults[k]) for k in ("width", "height", "num_frames")) + (
        float(row.get("fps") or defaults["fps"]),)


def evaluate(
    pipe,
    prompts: list[dict],
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    sampler: str | None = None,
    draft: bool = False,
    strength: float | None = None,
    from_reference: float | None = None,
    save_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Generate and score every prompt row (see the module docstring). Returns the report:
    n, accuracy per attribute (+ "all" and "background"), size_correct, frames_correct,
    draft_agreement (draft only), settings, seconds, and ``rows`` (one dict per prompt)."""
    import torch

    from sora.pipeline import DEFAULT_SAMPLER, export_to_video

    assert prompts, "no prompts to evaluate"
    if from_reference is not None:
        if draft:
            raise ValueError("from_reference and draft are different evaluations; pick one")
        if not 0.0 < from_reference <= 1.0:
            raise ValueError(f"from_reference is an SDEdit strength in (0, 1], got {from_reference}")
        missing = [i for i, r in enumerate(prompts) if not isinstance(r.get("reference"), dict)]
        if missing:
            raise ValueError(f"from_reference needs a 'reference' in every row (make_eval_prompts writes one); "
                             f"rows {missing[:5]} have none")
    assert all(isinstance(r.get("prompt"), str) and r["prompt"].strip() for r in prompts), "every row needs a prompt"
    t0 = time.perf_counter()
    defaults = pipe.defaults
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(prompts):
        groups.setdefault(_shape_key(row, defaults), []).append(i)
    results: list[dict | None] = [None] * len(prompts)
    done = 0
    for key in sorted(groups):
        width, height, num_frames, fps = key
        idx = groups[key]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s: s + batch_size]
            seeds = [prompts[i].get("seed") for i in chunk]
            gens = [torch.Generator().manual_seed(int(seed + i if sd is None else sd)) for i, sd in zip(chunk, seeds)]
            kwargs = dict(width=width, height=height, num_frames=num_frames, fps=fps,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          generator=gens, sampler=sampler)
            if draft:
                kwargs.update(mode="draft", strength=strength)
            if from_reference is None:
                out = pipe([prompts[i]["prompt"] for i in chunk], **kwargs)
                batch_frames, out_draft = out.frames, out.draft_frames
            else:  # one reference clip per prompt, so one call per prompt
                batch_frames = [pipe.edit(prompts[i]["prompt"], _reference(prompts[i]), strength=from_reference,
                                          **{**kwargs, "generator": gens[j]}).frames for j, i in enumerate(chunk)]
            for j, i in enumerate(chunk):
                frames = batch_frames[j]
                attrs = _attributes(prompts[i])
                row = {"index": i, "prompt": prompts[i]["prompt"], "want": attrs,
                       **score(frames, attrs),
                       # the output's resolution; "size_ok" (from score) is the object's size
                       "resolution_ok": frames.shape[1:3] == (height, width),
                       "frames_ok": frames.shape[0] == num_frames,
                       "width": width, "height": height, "num_frames": num_frames}
                if draft:
                    d = analyze(out_draft[j])
                    row["draft"] = {k: getattr(d, k) for k in ATTRIBUTES}
                    row.update({f"draft_{k}_same": row["draft"][k] == row[k] for k in ATTRIBUTES})
                if save_dir is not None:
                    os.makedirs(save_dir, exist_ok=True)
                    name = f"{i:04d}.mp4"
                    export_to_video(frames, os.path.join(save_dir, name), fps=fps)
                    row["video"] = name
                results[i] = row
            done += len(chunk)
            if progress is not None:
                progress(done, len(prompts))
    rows = [r for r in results if r is not None]
    report = {
        "n": len(rows),
        "accuracy": {k: float(np.mean([r[f"{k}_ok"] for r in rows])) for k in ATTRIBUTES + ("all",)},
        "size_correct": float(np.mean([r["resolution_ok"] for r in rows])),
        "frames_correct": float(np.mean([r["frames_ok"] for r in rows])),
        "settings": {"num_inference_steps": num_inference_steps or defaults["num_inference_steps"],
                     "guidance_scale": defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
                     "seed": seed, "sampler": sampler or defaults.get("sampler", DEFAULT_SAMPLER), "draft": draft,
                     "strength": strength, "from_reference": from_reference},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    with_bg = [r for r in rows if "background_ok" in r]
    if with_bg:
        report["accuracy"]["background"] = float(np.mean([r["background_ok"] for r in with_bg]))
    if draft:
        report["draft_agreement"] = {k: float(np.mean([r[f"draft_{k}_same"] for r in rows])) for k in ATTRIBUTES}
    proportions = proportion_summary(rows)
    if proportions is not None:
        report["proportions"] = proportions
    report["rows"] = json.loads(json.dumps(rows, default=_jsonable))
    return report


def proportion_summary(rows: list[dict], tolerance: float = 1.2) -> dict | None:
    """How far generated objects are from their square bounding box (``aspect`` of
    `sora.evaluator.Analysis`), and shape accuracy within / beyond ``tolerance`` (w/h or h/w):
    a diagnostic for where shape is lost - a square drawn 1.5x as tall as wide fits the round
    template best. None when no row has an aspect."""
    rows = [r for r in rows if r.get("aspect") is not None and math.isfinite(r["aspect"])]
    if not rows:
        return None
    off = np.array([abs(math.log(r["aspect"])) for r in rows])
    near = off <= math.log(tolerance)
    acc = lambda m: float(np.mean([r["shape_ok"] for r, k in zip(rows, m) if k])) if m.any() else None  # noqa: E731
    return {"n": len(rows), "tolerance": tolerance, "median_abs_log_aspect": float(np.median(off)),
            "within": float(near.mean()), "shape_accuracy_within": acc(near), "shape_accuracy_beyond": acc(~near)}


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON-able: {type(v).__name__}")
