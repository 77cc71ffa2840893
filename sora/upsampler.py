"""The prompt upsampler: a short user prompt in, a descriptive caption out.

A model trained on descriptive captions (see `sora.captioner`) follows descriptive prompts best,
but people type short ones. DALL-E 3 and Sora close that gap by letting a language model expand
the user's prompt into the caption style the video model was trained on ("prompt upsampling").
Whatever the user *did* say must survive (a "blue square moving up" stays a blue square moving
up); whatever they did not say is filled in with something typical.

Here the upsampler is any Hugging Face seq2seq text model in a local directory
(`AutoModelForSeq2SeqLM` + `AutoTokenizer`, offline). `train_upsampler` builds and trains our
own: a small `T5ForConditionalGeneration` with a word-level tokenizer trained on the pairs'
vocabulary (lower-cased, so "Red Circle" and "red circle" are the same prompt), saved with
`save_pretrained` so it loads back through the same path as any T5.

    pairs = shapes_pairs(4000, seed=0)          # [("blue square moving up", "A small blue ..."), ...]
    train_upsampler(pairs, "ups", max_minutes=1.0)
    upsample(["red circle"], "ups")              # -> ["A large red circle moves from ..."]

Greedy decoding by default (the same prompt always gives the same caption); pass `seed` to
sample instead, for variety across a batch of generations.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sora.optim import LRSchedule, budget_fraction, lr_at, make_optimizers, mean_over_ranks

SPECIALS = ("<pad>", "</s>", "<unk>")  # T5 convention: pad (also the decoder start), eos, unk
SIDECAR = "upsampler.json"


# ----------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------


def _sentence_case(text: str) -> str:
    """Undo the tokenizer's lower-casing and word splitting: "a red circle . a blue ..." ->
    "A red circle. A blue ..."."""
    text = re.sub(r"\s+([.,:;!?])", r"\1", text.strip())
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


class PromptUpsampler:
    """A seq2seq text model that rewrites short prompts as descriptive captions."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 64, batch_size: int = 64,
                 sentence_case: bool = True):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.batch_size, self.sentence_case = max_new_tokens, batch_size, sentence_case

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", **kw) -> "PromptUpsampler":
        """Load a local seq2seq model dir (offline). Our own dirs carry upsampler.json, which
        says their outputs are lower-case and need `_sentence_case`."""
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"upsampler path {path!r} is not a directory: give a model directory")
        model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        sidecar = os.path.join(path, SIDECAR)
        if os.path.isfile(sidecar):
            with open(sidecar) as f:
                kw.setdefault("sentence_case", bool(json.load(f).get("lowercase", False)))
        else:
            kw.setdefault("sentence_case", False)  # someone else's model: leave its text alone
        return cls(model.to(device), tok, **kw)

    @torch.no_grad()
    def upsample(self, prompts: Sequence[str], seed: int | None = None, temperature: float = 1.0) -> list[str]:
        """One descriptive caption per prompt. seed=None: greedy (deterministic). A seed:
        sample at `temperature`, reproducibly for that seed (the global RNG is left as it was)."""
        device = next(self.model.parameters()).device
        out: list[str] = []
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            for i in range(0, len(prompts), self.batch_size):
                enc = self.tokenizer(list(prompts[i:i + self.batch_size]), return_tensors="pt", padding=True)
                enc = {k: v.to(device) for k, v in enc.items()}
                kw: dict[str, Any] = {"do_sample": False}
                if seed is not None:
                    kw = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                ids = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, **kw)
                texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
                out += [_sentence_case(t) if self.sentence_case else t.strip() for t in texts]
        return out


def upsample(prompts: Sequence[str], model_dir: str, seed: int | None = None, device: str = "cpu",
             **kw) -> list[str]:
    """Load the upsampler in `model_dir` and upsample `prompts` (see `PromptUpsampler`)."""
    return PromptUpsampler.from_pretrained(model_dir, device=device, **kw).upsample(prompts, seed=seed)


# ----------------------------------------------------------------------------------------
# Training data from the shapes world
# ----------------------------------------------------------------------------------------

# Ways people say a motion in a short prompt; each parses back to its motion.
_SHORT_MOTION = {
    "left": ("moving left", "going left", "moving to the left", "drifting left"),
    "right": ("moving right", "going right", "moving to the right", "drifting right"),
    "up": ("moving up", "going up", "rising", "floating up"),
    "down": ("moving down", "going down", "falling", "sinking"),
    "still": ("staying still", "not moving", "still", "at rest"),
}
_SHORT_BG = ("on {bg}", "on a {bg} background", "{bg} background")


def short_prompt(spec, rng: np.random.Generator) -> str:
    """A short prompt for `spec` of the kind people type: always the colour and shape of each
    object, sometimes its size, motion and the background."""
    parts = []
    for obj in spec.objects:
        words = [obj.size] if rng.random() < 0.3 else []
        words += [obj.color, obj.shape]
        if rng.random() < 0.4:
            words.append(str(rng.choice(_SHORT_MOTION[obj.motion])))
        parts.append(" ".join(words))
    text = " and ".join(parts)
    if rng.random() < 0.3:
        text += " " + str(rng.choice(_SHORT_BG)).format(bg=spec.background)
    return text


def shapes_pairs(n: int, seed: int, exclude=None, ranges=None) -> list[tuple[str, str]]:
    """n (short prompt, descriptive caption) pairs from shapes-world clip specs (nothing is
    rendered). exclude: combos to leave out, e.g. `shapes.held_out_combinations()`; ranges:
    a `shapes.ClipRanges` (e.g. two_object_prob=0 for single objects only)."""
    from sora import shapes

    ranges = ranges if ranges is not None else shapes.DEFAULT_RANGES
    out = []
    for i in range(n):
        spec = shapes.sample_clip(seed, i, exclude=exclude, ranges=ranges)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i, 0x0A5])
        out.append((short_prompt(spec, rng), spec.caption()))
    return out


# ----------------------------------------------------------------------------------------
# Our own upsampler: a tiny T5
# ----------------------------------------------------------------------------------------


@dataclass
class UpsamplerConfig:
    """Size of our T5 upsampler and of its training run."""

    d_model: int = 128  # model width
    d_ff: int = 256  # feed-forward width
    num_layers: int = 2  # encoder layers; the decoder gets the same
    num_heads: int = 4  # attention heads (d_model must be a multiple)
    batch_size: int = 64  # pairs per step (the global batch, split over data-parallel workers)
    lr: float = 3e-3  # AdamW peak learning rate
    warmup_steps: int = 30  # linear warmup steps
    max_steps: int = 1500  # the cosine schedule's length; the time budget may stop it earlier

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        if not (self.lr > 0 and self.batch_size >= 1 and self.max_steps >= 1):
            raise ValueError(f"need lr > 0, batch_size >= 1, max_steps >= 1, got {self.lr}, {self.batch_size}, "
                             f"{self.max_steps}")

    def lr_schedule(self) -> LRSchedule:
        """Warmup, then a cosine to 5% of lr over max_steps (or the time budget, if it ends first)."""
        return LRSchedule(lr=self.lr, warmup_steps=self.warmup_steps, decay="cosine", min_lr_ratio=0.05,
                          max_steps=self.max_steps)

    @staticmethod
    def preset(name: str) -> "UpsamplerConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown upsampler preset {name!r}: use one of {sorted(PRESETS)}")
        return replace(PRESETS[name])


PRESETS: dict[str, UpsamplerConfig] = {
    "debug": UpsamplerConfig(d_model=32, d_ff=64, num_layers=1, num_heads=2, batch_size=16, max_steps=50),
    "tiny": UpsamplerConfig(),
}


def build_tokenizer(texts: Sequence[str]):
    """Word-level, lower-cased, punctuation split off (so "circle," is "circle" + ","); the
    vocabulary is every word of `texts`. Returns a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Lowercase()
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))} - set(SPECIALS))
    vocab = {w: i for i, w in enumerate(list(SPECIALS) + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer, tk.pre_tokenizer = norm, pre
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    # Like T5: every encoded text ends in </s>.
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_upsampler(cfg: UpsamplerConfig, texts: Sequence[str]):
    """A randomly initialised T5ForConditionalGeneration and its tokenizer (vocabulary from
    `texts`). Returns (model, tokenizer)."""
    from transformers import T5Config, T5ForConditionalGeneration

    tok = build_tokenizer(texts)
    config = T5Config(vocab_size=len(tok), d_model=cfg.d_model, d_ff=cfg.d_ff, d_kv=cfg.d_model // cfg.num_heads,
                      num_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers, num_heads=cfg.num_heads,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      # Tied: T5 then scales the decoder output by d_model^-0.5 before the
                      # head; untied, its init gives logits in the hundreds (first loss ~65).
                      tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    model = T5ForConditionalGeneration(config)
    g = model.generation_config
    g.pad_token_id, g.eos_token_id, g.decoder_start_token_id = tok.pad_token_id, tok.eos_token_id, tok.pad_token_id
    g.do_sample, g.max_new_tokens = False, 64
    return model, tok


def fit_upsampler(model, tok, pairs: Sequence[tuple[str, str]], cfg: UpsamplerConfig, *, max_minutes: float = 2.0,
                  seed: int = 0, clock: str = "wall", progress: Callable[[int, int, float], None] | None = None,
                  rank: int = 0, world: int = 1, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
                  ) -> dict[str, Any]:
    """Train `model` in place on (short prompt, descriptive caption) pairs (teacher forcing).

    The learning rate follows `cfg.lr_schedule()` over progress = max(step / max_steps,
    elapsed / budget); `clock` ("wall" or "cpu") is what `max_minutes` measures, and data
    parallelism (world > 1 with ``wrap``, e.g. DDP; each rank takes every world-th pair of the
    same global batch; rank 0's clock rules) works as in `sora.captioner.fit_captioner`.
    Returns stats: steps, first_loss, final_loss (mean of the last 20 steps), loss_history
    (every 10th step), pairs, params, cpu_minutes, clock, seed, workers."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if not pairs:
        raise ValueError("the upsampler needs at least one (prompt, caption) pair")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {world} workers")
    if world > 1 and wrap is None:
        raise ValueError("world > 1 needs `wrap`, a data-parallel wrapper that averages gradients (e.g. DDP)")
    src = tok([s for s, _ in pairs], return_tensors="pt", padding=True)
    tgt = tok([t for _, t in pairs], return_tensors="pt", padding=True)["input_ids"]
    labels = tgt.masked_fill(tgt == tok.pad_token_id, -100)  # (N, L) ; no loss on padding
    n = len(pairs)
    opt = make_optimizers(model, lr=cfg.lr, weight_decay=0.01, decays=lambda name, p: True, betas=(0.9, 0.98))
    net = wrap(model) if wrap is not None else model
    schedule = cfg.lr_schedule()
    gen = torch.Generator().manual_seed(seed)
    budget_s = max_minutes * 60.0
    now = time.perf_counter if clock == "wall" else time.process_time
    order, pos, step, losses = torch.randperm(n, generator=gen), 0, 0, []
    model.train()
    tb, c0 = now(), time.process_time()
    while True:
        frac = budget_fraction(now() - tb, budget_s, world)
        if step >= cfg.max_steps or frac >= 1.0:
            break
        opt.set_lr(lr_at(step + 1, schedule, frac))
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + cfg.batch_size][rank::world]  # this rank's share of the global batch
        pos += cfg.batch_size
        mask = src["attention_mask"][idx]
        ws, wt = int(mask.sum(1).max()), int((labels[idx] != -100).sum(1).max())  # trim padding
        out = net(input_ids=src["input_ids"][idx, :ws], attention_mask=mask[:, :ws], labels=labels[idx, :wt])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        loss = mean_over_ranks(out.loss.item(), world)  # the logged loss: over the ranks' shares
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss)
        step += 1
        if progress is not None and step % 10 == 0:
            progress(step, cfg.max_steps, losses[-1])
    if not losses:
        raise ValueError("the time budget ended training before the first step: raise max_minutes")
    model.eval()
    return {"steps": step, "pairs": n, "params": sum(p.numel() for p in model.parameters()), "first_loss": losses[0],
            "final_loss": float(np.mean(losses[-20:])), "loss_history": losses[::10],
            "cpu_minutes": (time.process_time() - c0) / 60, "clock": clock, "seed": seed, "workers": world}


def save_upsampler(model, tok, out_dir: str, cfg: UpsamplerConfig, stats: dict[str, Any]) -> None:
    """Write a normal HF model dir (config.json, model.safetensors, tokenizer) plus upsampler.json."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, SIDECAR), "w") as f:
        json.dump({"lowercase": True, "config": asdict(cfg),
                   "training": {k: v for k, v in stats.items() if k != "loss_history"}}, f, indent=2)


def train_upsampler(pairs: Sequence[tuple[str, str]], out_dir: str, max_minutes: float = 2.0, seed: int = 0,
                    preset: str = "tiny", config: UpsamplerConfig | None = None,
                    progress: Callable[[int, int, float], None] | None = None,
                    clock: str = "wall") -> dict[str, Any]:
    """Train our T5 upsampler in this process on (short prompt, descriptive caption) pairs and
    save it to `out_dir` (config.json, model.safetensors, tokenizer, upsampler.json). (Several
    workers: `pipelines.train_upsampler`.) Returns the stats of `fit_upsampler` plus preset,
    minutes and vocab_size."""
    cfg = config if config is not None else UpsamplerConfig.preset(preset)
    if not pairs:
        raise ValueError("train_upsampler needs at least one (prompt, caption) pair")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, tok = build_upsampler(cfg, [t for p in pairs for t in p])
    stats = fit_upsampler(model, tok, pairs, cfg, max_minutes=max_minutes, seed=seed, clock=clock, progress=progress)
    stats.update(preset=preset if config is None else "custom", minutes=(time.perf_counter() - t0) / 60,
                 vocab_size=len(tok))
    save_upsampler(model, tok, out_dir, cfg, stats)
    return stats
