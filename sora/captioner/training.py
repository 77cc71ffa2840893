"""Training our captioner on (clip, caption) pairs: inputs, the loss module, the loop, saving.

`train_captioner` is the one-process run (a notebook, a test); `pipelines.train_captioner`
runs the same `fit_captioner` on Ray Train workers, each with its share of every batch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from sora.captioner.frames import flip_grid, frame_grid
from sora.captioner.inference import DEFAULT_PROMPT, SIDECAR, prompt_text
from sora.captioner.losses import bag_of_words_loss, bag_of_words_targets, tag_loss, tag_targets
from sora.captioner.model import CaptionerConfig, build_captioner, make_image_processor, mirror_word_ids
from sora.optim import budget_fraction, lr_at, make_optimizers, mean_over_ranks


def encode_clips(examples: Iterable[tuple[np.ndarray, str]], cfg: CaptionerConfig,
                 chunk: int = 256) -> tuple[torch.Tensor, list[str]]:
    """Stream (clip (T, H, W, 3) uint8, caption) pairs into training inputs, keeping only each
    clip's frame grid (a few thousand full clips would not fit in memory).

    Returns pixel_values (N, 3, H, W) float32 ((H, W) = cfg.image_hw) and the N captions."""
    from PIL import Image

    image_processor = make_image_processor(cfg)
    pixels: list[torch.Tensor] = []
    captions: list[str] = []
    grids: list = []
    for frames, caption in examples:
        grids.append(Image.fromarray(frame_grid(frames, cfg.num_frames, layout=cfg.layout, tile=cfg.tile)))
        captions.append(caption)
        if len(grids) >= chunk:
            pixels.append(image_processor(images=grids, return_tensors="pt")["pixel_values"])
            grids = []
    if grids:
        pixels.append(image_processor(images=grids, return_tensors="pt")["pixel_values"])
    if not captions:
        raise ValueError("no training examples: the captioner needs at least one (clip, caption) pair")
    return torch.cat(pixels), captions


def _token_batches(processor, captions: list[str], cfg: CaptionerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels (N, L), right padded; labels are -100 on the prompt and padding.
    The prompt is the same for every example: the processor expands its <image> into
    `cfg.image_tokens` placeholders that the vision features replace."""
    from PIL import Image

    tok = processor.tokenizer
    text = prompt_text(processor, "grid", cfg.num_frames, DEFAULT_PROMPT, cfg.grid_note)
    prompt_ids = processor(text=[text], images=[Image.new("RGB", cfg.image_hw[::-1])],
                           return_tensors="pt")["input_ids"][0].tolist()
    cap_ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in captions]
    L = len(prompt_ids) + max(len(c) for c in cap_ids)
    input_ids = torch.full((len(cap_ids), L), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(cap_ids), L), -100, dtype=torch.long)
    for i, c in enumerate(cap_ids):
        row = prompt_ids + c
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(prompt_ids):len(row)] = torch.tensor(c)
    return input_ids, labels


class CaptionObjective(nn.Module):
    """The training loss of one batch: the caption cross-entropy (teacher forcing, loss on the
    caption tokens only) plus the weighted bag-of-words and attribute-tag losses, both read
    from the projector's output. One module holding the captioner and the tag heads, so a
    data-parallel wrapper (DDP) averages the gradients of all of it.

    forward(input_ids (B, L), attention_mask (B, L), pixel_values (B, 3, H, W), labels (B, L),
    words (B, V) or None, tags (B, slots) or None) -> (loss, caption loss, tag loss), scalars;
    the last two detached."""

    def __init__(self, model, cfg: CaptionerConfig, heads: nn.ModuleList | None = None):
        super().__init__()
        self.model, self.heads = model, heads
        self.bow_weight, self.bow_pool, self.tag_weight, self.tag_pool = (cfg.bow_weight, cfg.bow_pool, cfg.tag_weight,
                                                                          cfg.tag_pool)

    def forward(self, input_ids, attention_mask, pixel_values, labels, words=None, tags=None):
        seen: list[torch.Tensor] = []  # the projector's output, (B, N, D)
        hook = (self.model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: seen.append(o))
                if words is not None or tags is not None else None)
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             labels=labels)
        finally:
            if hook is not None:
                hook.remove()
        loss, tagged = out.loss, out.loss.new_zeros(())
        if words is not None:
            loss = loss + self.bow_weight * bag_of_words_loss(seen[-1], self.model.get_input_embeddings().weight,
                                                              words, self.bow_pool)
        if tags is not None:
            tagged = tag_loss(seen[-1], self.heads, tags, self.tag_pool)
            loss = loss + self.tag_weight * tagged
        return loss, out.loss.detach(), tagged.detach()


def fit_captioner(model, processor, pixels: torch.Tensor, captions: list[str], cfg: CaptionerConfig, *,
                  max_minutes: float = 8.0, seed: int = 0, clock: str = "wall",
                  progress: Callable[[int, int, float], None] | None = None, rank: int = 0, world: int = 1,
                  wrap: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, Any]:
    """Train `model` in place on pixel_values (N, 3, H, W) and their N captions. Returns stats
    (see `train_captioner`); progress(step, max_steps, loss) every 10 steps.

    The learning rate follows `cfg.lr_schedule()` (warmup, then cosine) over the run's
    progress, max(step / max_steps, elapsed / budget), so it anneals even when the time budget
    ends the run (the usual case on a shared CPU); when max_steps ends it, the run is
    deterministic. clock: what `max_minutes` measures: "wall" time, or "cpu" time of this
    process (all its threads): with one thread, N cpu-minutes is N wall-minutes on one idle
    core, however busy the machine is.

    Data parallel (world > 1): the caller has initialised the default torch.distributed group
    and passes ``wrap`` (e.g. DDP), which averages gradients over the ranks. Every rank draws
    the same global batch of cfg.batch_size and computes its share (every world-th example),
    so the ranks take identical steps; rank 0's clock decides the schedule and the stop."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if len(pixels) != len(captions):
        raise ValueError(f"{len(pixels)} grids but {len(captions)} captions")
    if cfg.flip_prob > 0 and cfg.tag_weight > 0:
        raise ValueError("flip_prob and tag_weight together are not supported: mirrored clips would keep their "
                         "unmirrored motion tags")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {world} workers")
    if world > 1 and wrap is None:
        raise ValueError("world > 1 needs `wrap`, a data-parallel wrapper that averages gradients (e.g. DDP)")
    input_ids, labels = _token_batches(processor, captions, cfg)
    pad = processor.tokenizer.pad_token_id
    mirror = mirror_word_ids(processor.tokenizer) if cfg.flip_prob > 0 else None
    bow = bag_of_words_targets(processor, captions) if cfg.bow_weight > 0 else None
    tags, heads = None, None
    if cfg.tag_weight > 0:
        tags, n_cls = tag_targets(captions)
        with torch.random.fork_rng():  # the same heads on every rank, the global RNG untouched
            torch.manual_seed(seed + 1)
            heads = torch.nn.ModuleList(torch.nn.Linear(cfg.text_dim, c) for c in n_cls)
    objective = CaptionObjective(model, cfg, heads)
    opt = make_optimizers(objective, lr=cfg.lr, weight_decay=cfg.weight_decay, decays=lambda n, p: True,
                          betas=(0.9, 0.98))
    net = wrap(objective) if wrap is not None else objective
    schedule = cfg.lr_schedule()
    n = len(input_ids)
    gen = torch.Generator().manual_seed(seed)
    budget_s = max_minutes * 60.0
    now = time.perf_counter if clock == "wall" else time.process_time
    order, pos, step, losses, tag_losses = torch.randperm(n, generator=gen), 0, 0, [], []
    objective.train()
    t0, c0, tb = time.perf_counter(), time.process_time(), now()
    while True:
        frac = budget_fraction(now() - tb, budget_s, world)
        if step >= cfg.max_steps or frac >= 1.0:
            break
        opt.set_lr(lr_at(step + 1, schedule, frac))
        if pos + cfg.batch_size > n:  # a new epoch
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        flips = torch.rand(len(idx), generator=gen) < cfg.flip_prob if mirror is not None else None
        idx = idx[rank::world]  # this rank's share of the global batch
        ids, lab = input_ids[idx], labels[idx]
        width = int((ids != pad).sum(1).max())  # drop the columns that are padding in every row
        ids, lab = ids[:, :width], lab[:, :width]
        px, words = pixels[idx], (bow[idx] if bow is not None else None)
        if mirror is not None:  # mirror a random part of the batch, and its captions with it
            f = flips[rank::world]
            px, ids, lab = px.clone(), ids.clone(), lab.clone()
            px[f] = flip_grid(px[f], cfg.num_frames, cfg.layout)
            ids[f] = mirror[ids[f]]
            lab[f] = torch.where(lab[f] >= 0, mirror[lab[f].clamp(min=0)], lab[f])
            if words is not None:
                words = words.clone()
                words[f] = words[f][:, mirror]  # the permutation is its own inverse
        loss, caption_loss, tagged = net(ids, (ids != pad).long(), px, lab, words,
                                         tags[idx] if tags is not None else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        caption_loss = mean_over_ranks(caption_loss.item(), world)  # the logged loss: over the ranks' shares
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        opt.step()
        losses.append(caption_loss)
        if tags is not None:
            tag_losses.append(tagged.item())
        step += 1
        if progress is not None and step % 10 == 0:
            progress(step, cfg.max_steps, losses[-1])
    if not losses:
        raise ValueError("the time budget ended training before the first step: raise max_minutes")
    model.eval()
    tag_stats = ({"first_tag_loss": tag_losses[0], "final_tag_loss": float(np.mean(tag_losses[-20:]))}
                 if tag_losses else {})
    return {"steps": step, "examples": n, "params": sum(p.numel() for p in model.parameters()), **tag_stats,
            "first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])), "loss_history": losses[::10],
            "train_minutes": (time.perf_counter() - t0) / 60, "train_cpu_minutes": (time.process_time() - c0) / 60,
            "clock": clock, "threads": torch.get_num_threads(), "seed": seed, "workers": world}


def save_captioner(model, processor, out_dir: str, cfg: CaptionerConfig, stats: dict[str, Any]) -> None:
    """Write a normal HF model dir plus captioner.json (how to prompt it, and the stats)."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, SIDECAR), "w") as f:
        json.dump({"num_frames": cfg.num_frames, "prompt": DEFAULT_PROMPT, "layout": cfg.layout, "tile": list(cfg.tile),
                   "grid_note": cfg.grid_note,
                   "config": asdict(cfg),
                   "training": {k: v for k, v in stats.items() if k != "loss_history"}}, f, indent=2)


def train_captioner(examples: Iterable[tuple[np.ndarray, str]], out_dir: str, preset: str = "tiny",
                    max_minutes: float = 8.0, seed: int = 0,
                    progress: Callable[[int, int, float], None] | None = None,
                    config: CaptionerConfig | None = None, clock: str = "wall") -> dict[str, Any]:
    """Train our LLaVA captioner in this process on (clip (T, H, W, 3) uint8, caption) pairs
    and save it to `out_dir` as a normal HF model dir (config.json, model.safetensors,
    tokenizer, processor, chat template) plus captioner.json. `examples` may be a generator: it
    is read once. (Several workers: `pipelines.train_captioner.train_captioner_on_ray`.)

    max_minutes / clock / progress: see `fit_captioner`.
    Returns stats: steps, examples, params, first_loss, final_loss (caption loss; final: mean of
    the last 20 steps), loss_history (every 10th step), first_tag_loss / final_tag_loss (when
    cfg.tag_weight > 0), prep_minutes (grids + tokenizer), train_minutes, train_cpu_minutes,
    preset, workers.
    """
    cfg = config if config is not None else CaptionerConfig.preset(preset)
    t0 = time.perf_counter()
    pixels, captions = encode_clips(examples, cfg)
    torch.manual_seed(seed)
    model, processor = build_captioner(cfg, captions)
    prep_s = time.perf_counter() - t0
    stats = fit_captioner(model, processor, pixels, captions, cfg, max_minutes=max_minutes, seed=seed, clock=clock,
                          progress=progress)
    stats.update(preset=preset if config is None else "custom", prep_minutes=prep_s / 60,
                 vocab_size=len(processor.tokenizer))
    save_captioner(model, processor, out_dir, cfg, stats)
    return stats
