"""The recaptioner: descriptive captions for clips from any Hugging Face vision-language model.

Sora (and DALL-E 3 before it, Betker et al. 2023) trains on *descriptive* captions written by a
captioner model rather than on whatever short text came with the data. Two halves live here:

1. `Captioner` - inference. `Captioner.from_pretrained(dir)` loads ANY image-text-to-text model
   from a local directory through `AutoModelForImageTextToText` + `AutoProcessor` (offline),
   asks it for a caption through the processor's chat template, and decodes greedily. Processors
   with a video processor get the sampled frames as a video; image-only ones get a *frame grid*
   (k frames tiled into one image, time order left to right then top to bottom) so that motion
   is visible in a single picture. Processors with no chat template (BLIP, ViT+GPT2) caption the
   image unconditionally, as they were trained to.

2. Our own small captioner, built from stock Hugging Face classes so it loads back through the
   very same `Captioner.from_pretrained`: a LLaVA design (a vision tower, a 2-layer projector, a
   Llama decoder) sized in kilobytes-to-megabytes, with a word-level tokenizer trained on the
   caption vocabulary and a `CLIPImageProcessorPil` (no torchvision on the target machines). The
   default tower is a small ResNet, which transformers runs as FastVLM
   (`FastVlmForConditionalGeneration`: LLaVA with a convolutional tower); Swin or CLIP towers
   make a plain `LlavaForConditionalGeneration` (see `CaptionerConfig.vision`).
   `train_captioner` is a plain torch loop on (clip, caption) pairs that saves a normal HF model dir.

Why LLaVA: of the classes `AutoModelForImageTextToText` maps in transformers 5, it is the
simplest one whose processor has a chat template and a PIL image processor, so our model goes
through exactly the code path a real VLM (SmolVLM, Qwen2-VL, LLaVA-1.5) does. BLIP loads too (no
chat template); `vision-encoder-decoder` (ViT + GPT2) has a model mapping but no processor class,
so `_load_processor` pairs its image processor and tokenizer by hand.

Tiny CPU run (seconds; see `benchmarks/bench_captioner.py` for the 8-minute run):

    from sora import shapes
    specs = [shapes.sample_clip(0, i, ranges=shapes.TINY) for i in range(64)]
    train_captioner(((shapes.render(s), s.caption()) for s in specs), "cap", preset="debug",
                    max_minutes=0.5)
    Captioner.from_pretrained("cap").caption([shapes.render(specs[0])])   # -> ["A large ..."]
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable

import numpy as np
import torch

# Asked of every model. Short on purpose: our own model reads it on every example, and it is a
# plain instruction any instruction-tuned VLM follows.
DEFAULT_PROMPT = "Describe this video in one sentence."
# Prepended in grid mode so a general VLM knows how to read the picture.
GRID_NOTE = "The image shows {k} frames in time order, left to right, top to bottom."
SIDECAR = "captioner.json"  # how a model dir wants to be asked: num_frames and prompt

# ----------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------


def sample_frame_indices(num_frames: int, k: int) -> np.ndarray:
    """k frame indices spread evenly over a clip of num_frames, first and last included (so the
    whole motion is seen). k == 1 takes the middle frame; k > num_frames repeats frames.

    Returns (k,) int64, non-decreasing, in [0, num_frames)."""
    assert num_frames >= 1, f"a clip needs at least one frame, got {num_frames}"
    assert k >= 1, f"k must be >= 1, got {k}"
    if k == 1:
        return np.array([(num_frames - 1) // 2], dtype=np.int64)
    return np.rint(np.linspace(0, num_frames - 1, k)).astype(np.int64)


def grid_shape(k: int) -> tuple[int, int]:
    """(rows, cols) of the grid holding k frames: as square as possible, cols >= rows."""
    cols = math.ceil(math.sqrt(k))
    return math.ceil(k / cols), cols


LAYOUTS = ("grid", "interleave", "interleave+key")  # see `frame_grid`


def frame_grid(frames: np.ndarray, k: int = 4, max_tile: int | None = 224, layout: str = "grid",
               tile: tuple[int, int] | None = None) -> np.ndarray:
    """Put k evenly sampled frames of a clip into one image.

    Args:
        frames: (T, H, W, 3) uint8.
        k: frames to show, on a `grid_shape(k)` = (rows, cols) layout; missing frames are black.
        max_tile: frames whose longer side exceeds this are first shrunk (aspect kept) so a 4K
            clip does not make a 4K grid; None keeps them as they are.
        layout: "grid": frame i is the tile at (i // cols, i % cols), time order left to right
            then top to bottom, what a general VLM can read. "interleave": every pixel becomes a
            rows x cols block holding that pixel in each of the k frames (a pixel-unshuffle of
            the frames), so the motion at a place is visible inside one small patch; for our
            own captioner, whose patch embedding learns to read it. "interleave+key": the
            interleaved image with the first sampled frame alone, at the interleaved image's
            size (rows x cols times the tile's pixels), to its right: motion from the left
            half, the look of things (shape) from a frame that no other frame overlaps.
        tile: (h, w) to resize every frame to first (overrides max_tile). The interleaved image
            must reach the model at exactly its input size: a resize would mix the frames.
    Returns:
        (rows * h, cols * w, 3) uint8 where (h, w) is the (possibly resized) frame size;
        (rows * h, 2 * cols * w, 3) for "interleave+key".
    """
    assert frames.ndim == 4 and frames.shape[-1] == 3, f"frames must be (T, H, W, 3), got {frames.shape}"
    assert frames.dtype == np.uint8, f"frames must be uint8, got {frames.dtype}"
    assert layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {layout!r}"
    picked = frames[sample_frame_indices(frames.shape[0], k)]  # (k, H, W, 3)
    key = picked[0]  # (H, W, 3), resized below from the full frame, not from its tile
    h, w = picked.shape[1:3]
    if tile is not None:
        h, w = tile
    elif max_tile is not None and max(h, w) > max_tile:
        s = max_tile / max(h, w)
        h, w = max(1, round(h * s)), max(1, round(w * s))
    if (h, w) != picked.shape[1:3]:
        picked = np.stack([_resize(f, h, w) for f in picked])
    rows, cols = grid_shape(k)
    cells = np.zeros((rows * cols, h, w, 3), dtype=np.uint8)
    cells[:k] = picked
    cells = cells.reshape(rows, cols, h, w, 3)
    if layout == "grid":
        return cells.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)  # (r, y, c, x)
    woven = cells.transpose(2, 0, 3, 1, 4).reshape(h * rows, w * cols, 3)  # (y, r, x, c)
    if layout == "interleave":
        return woven
    return np.concatenate([woven, _resize(key, rows * h, cols * w)], axis=1)  # (rows*h, 2*cols*w, 3)


def _resize(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear (a stretch when the aspect changes)."""
    if frame.shape[:2] == (h, w):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR))


# ----------------------------------------------------------------------------------------
# Loading any HF image-text-to-text model
# ----------------------------------------------------------------------------------------


class _ImageTextProcessor:
    """An image processor and a tokenizer glued together, for model types with no processor
    class (`vision-encoder-decoder`). Mimics the two calls `Captioner` makes."""

    chat_template = None
    video_processor = None

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def __call__(self, images=None, return_tensors="pt", **_):
        return self.image_processor(images=images, return_tensors=return_tensors)

    def batch_decode(self, ids, **kw):
        return self.tokenizer.batch_decode(ids, **kw)


def _load_processor(path: str):
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        proc = None
    if proc is not None and hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
        return proc
    # No processor class for this model type (AutoProcessor then returns a bare tokenizer or
    # image processor): pair the two by hand.
    return _ImageTextProcessor(AutoImageProcessor.from_pretrained(path, local_files_only=True),
                               AutoTokenizer.from_pretrained(path, local_files_only=True))


def _user_message(mode: str, k: int, prompt: str, grid_note: bool = True) -> list[dict]:
    if mode == "video":
        return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    text = f"{GRID_NOTE.format(k=k)} {prompt}" if grid_note else prompt
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def prompt_text(processor, mode: str, k: int, prompt: str, grid_note: bool = True) -> str | None:
    """The full chat-formatted prompt string, or None for a processor with no chat template.
    grid_note: in grid mode, say how the frames are laid out (for general VLMs; our own model
    learns the layout and is better off without it, see `CaptionerConfig.grid_note`)."""
    if getattr(processor, "chat_template", None) is None:
        return None
    return processor.apply_chat_template(_user_message(mode, k, prompt, grid_note), add_generation_prompt=True,
                                         tokenize=False)


class Captioner:
    """Descriptive captions for clips from a Hugging Face image-text-to-text model.

    `mode` is "video" (processor has a video processor: the k sampled frames go in as a video)
    or "grid" (one frame-grid image per clip); "auto" picks by the processor. Greedy decoding,
    so the same clip always gets the same caption.
    """

    def __init__(self, model, processor, *, name: str, prompt: str = DEFAULT_PROMPT, num_frames: int = 4,
                 max_new_tokens: int = 64, batch_size: int = 16, mode: str = "auto",
                 max_tile: int | None = 224, layout: str = "grid", tile: tuple[int, int] | None = None,
                 grid_note: bool = True):
        if mode == "auto":
            mode = "video" if getattr(processor, "video_processor", None) is not None else "grid"
        assert mode in ("video", "grid"), f"mode must be 'auto', 'video' or 'grid', got {mode!r}"
        self.model, self.processor, self.name, self.prompt = model.eval(), processor, name, prompt
        self.num_frames, self.max_new_tokens, self.batch_size = num_frames, max_new_tokens, batch_size
        self.mode, self.max_tile, self.layout, self.grid_note = mode, max_tile, layout, grid_note
        self.tile = tuple(tile) if tile is not None else None
        tok = getattr(processor, "tokenizer", None)
        if tok is not None and not model.config.is_encoder_decoder:
            # Decoder-only models continue the LAST token of each row: pad on the left.
            tok.padding_side = "left"

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", max_new_tokens: int = 64,
                        dtype: torch.dtype | None = None, **kw) -> "Captioner":
        """Load a local HF model dir (offline). kw go to `Captioner(...)`; `num_frames` and
        `prompt` (and our own model's frame `layout` and `tile` size) default to the dir's
        captioner.json (written by `train_captioner`) if any."""
        from transformers import AutoModelForImageTextToText

        assert os.path.isdir(path), f"captioner path {path!r} is not a directory"
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        sidecar = os.path.join(path, SIDECAR)
        if os.path.isfile(sidecar):
            with open(sidecar) as f:
                saved = json.load(f)
            for key in ("num_frames", "prompt", "layout", "tile", "grid_note"):
                if key in saved:
                    kw.setdefault(key, saved[key])
        name = f"{model.config.model_type}:{os.path.basename(os.path.normpath(path))}"
        return cls(model.to(device), _load_processor(path), name=name, max_new_tokens=max_new_tokens, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def inputs(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Processor outputs for a batch of (T, H, W, 3) uint8 clips, on the model's device."""
        from PIL import Image

        text = prompt_text(self.processor, self.mode, self.num_frames, self.prompt, self.grid_note)
        kw: dict[str, Any] = {"return_tensors": "pt"}
        if text is not None:
            kw.update(text=[text] * len(clips), padding=True)
        if self.mode == "video":
            kw["videos"] = [c[sample_frame_indices(c.shape[0], self.num_frames)] for c in clips]
        else:
            kw["images"] = [Image.fromarray(frame_grid(c, self.num_frames, self.max_tile, self.layout, self.tile))
                            for c in clips]
        enc = self.processor(**kw)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in enc.items() if isinstance(v, torch.Tensor)}

    @torch.no_grad()
    def caption(self, clips: list[np.ndarray]) -> list[str]:
        """One caption per clip. clips: list of (T, H, W, 3) uint8 arrays (any sizes)."""
        out: list[str] = []
        for i in range(0, len(clips), self.batch_size):
            enc = self.inputs(clips[i:i + self.batch_size])
            ids = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
            prompt_ids = enc.get("input_ids")
            if (prompt_ids is not None and not self.model.config.is_encoder_decoder
                    and ids.shape[1] >= prompt_ids.shape[1]
                    and torch.equal(ids[:, :prompt_ids.shape[1]], prompt_ids)):
                ids = ids[:, prompt_ids.shape[1]:]  # decoder-only models echo the prompt
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


# ----------------------------------------------------------------------------------------
# Our own captioner: a tiny LLaVA
# ----------------------------------------------------------------------------------------

# A plain-text chat format: "user: <image> ... \nassistant: ". Word-level tokens, no BOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


@dataclass
class CaptionerConfig:
    """Size of our LLaVA captioner and of its training run.

    The defaults are the "tiny" preset. Measured (bench_captioner: 4000 clips, 200 held-out
    clips; colour / shape / motion), with the attribute-tag loss in place of the bag of words
    (`tag_weight` 1, `bow_weight` 0): 8 wall-minutes on both cores (`workers=2`, ~3,300-3,600
    steps) seed 0 1.00 / 1.00 / 1.00, seed 1 1.00 / 0.995 / 1.00 (0.995 motion in a second
    run); one process, 8 cpu-minutes (~2,130 steps):
    1.00 / 0.975 / 1.00 and 1.00 / 0.94 / 0.995. A linear probe on the tower's max-pooled
    features showed why: before the tags the TOWER did not know shape (probe 0.67 held-out,
    the captioner 0.735), with them it does (0.945, the captioner 0.935).

    Before the tags (bag of words over all caption words at weight 1), 8 cpu-minutes on 1
    thread: colour 0.99 / shape 0.815 / motion 0.955 (seed 0, 2163 steps) and 1.00 / 0.575 /
    1.00 (seed 1, 2229 steps), about 0.22 s a step: short of 0.95, and far from stable across
    seeds (the Swin recipe: 0.535 and 0.60). Twice the compute
    (16 cpu-minutes, the whole 4000-step schedule) is not the cure: shape 0.74 (seed 0) and
    0.735 (seed 1), colour >= 0.995, motion >= 0.965 - steadier across seeds, not higher.
    Both cores (`train_captioner(workers=2)`, 8 wall-minutes, ~3,600 steps of 2 x 16 clips):
    shape 0.735 (seed 0) and 0.87 (seed 1; 0.945 in a run on rank 0's 8 cpu-minutes, 3,857
    steps), colour >= 0.995, motion >= 0.965. Errors are not only small objects: large squares
    read as circles too (12 of seed 0's 53 errors), so the tower has not learnt the feature
    rather than failing to see it. 16,000 training clips instead of 4,000 (seed 0, 2 workers):
    shape 0.705 - not memorisation either.

    How it got there (scratch probes: a tower with linear heads on its max-pooled features,
    trained directly on shape / motion / colour for 1.5 cpu-minutes, 1000 held-out clips):
    - The 32 px tiles are NOT what bounds shape: a plain 5-layer CNN reads the main object's
      shape from ONE frame stretched to 32x32 at 0.997 held-out (1 cpu-min, both seeds), 0.999
      at 64x64; the area/bounding-box hand rule below was simply a weak reader.
    - What does: frames overlapping in the interleaved image, and the tower's design. With the
      three heads together, on the interleaved image: Swin (the old tower) shape 0.44, a plain
      CNN 0.53-0.75, a ResNet 0.72-0.75 (train 0.97-1.00: it memorises), a RegNet 0.49-0.61,
      FocalNet 0.38-0.46; the same CNN on shape alone 0.84-0.96. Adding the first frame alone,
      at the interleaved image's size, beside it ("interleave+key") and a ResNet: shape 0.956 /
      0.947 (two inits), motion 0.99, colour 1.00 in ~890 steps.
    - Caption training teaches the tower shape far more slowly than those heads: at 3
      cpu-minutes (~800 steps) the captioner's shape was 0.43-0.555 whatever the auxiliary loss
      (bow_weight 0 / 0.1 / 1 / 3, bow_pool "token" or "feature"); 8 minutes reach 0.8. In the
      probe the bag-of-words loss over all caption words, in place of the three heads, left
      the tower at shape 0.41-0.45 (the same loss over the 3 shape words alone: 0.935; over
      colour and shape words: 0.73; softmax instead of per-word BCE, a per-word learnt
      uncertainty weight, or a linear head on the raw tower features: 0.40-0.41). So the
      dense loss over every word, most of which the image cannot predict (template words,
      "left"/"right" in both directions of "from left to right"), drowns the shape signal.

    The Swin recipe before it (vision "swin", layout "interleave", patch 8, vision_dim 48,
    depths (2, 2); the "base" preset still uses Swin): colour 1.00 / shape 0.535 / motion 0.955,
    4000 steps in 7.5 cpu-minutes (the same recipe rerun through a scratch harness: 0.99 / 0.555
    / 0.975; on the "grid" layout: 0.99 / 0.495 / 0.805). The previous recipe (patch 4, window
    8, lr 1e-3, no bag-of-words loss, grid note) got 1.00 / 0.60 / 0.26 in ~1300 steps: its
    tower cost 0.22 s of a 0.37 s step (256 stage-1 tokens), and the caption loss alone never
    taught the tower motion direction. Shape was the open problem (small 0.49, large 0.60; a 128
    px grid with patch 16 gave 0.59). Diagnosis (scratch probe: this tower + linear max-pooled
    heads trained directly on shape / motion / colour, 1000 held-out clips): 1.5 cpu-min (2000
    steps) held-out shape 0.45 (train 0.64); 4 cpu-min 0.49 (train 0.95): the tower memorises
    the 4000 clips rather than learn shape. No cheap change moved it at 1.5 cpu-min: "grid"
    layout 0.49, patch 4 0.51 (627 steps), a 128 px grid 0.48 (610 steps), a LeViT conv stem
    0.50 (64 px) / 0.44 (128 px), random shifts of +-4 or +-8 px with or without mirroring 0.45
    (motion 0.975 -> 0.995). A hand rule (area / bounding box of the first frame) reads shape
    1.00 at native size, 1.00 / 0.85 (large / small) in a 64 px stretched tile, 0.98 / 0.70 at
    48 px, 0.93 / 0.57 at 32 px: small shapes are ~6 x 2.5-6 px in ours, below legibility. So
    0.95 needs more pixels per frame AND a tower that learns shape from 4000 clips; bigger
    inputs cost too many steps at 3 cpu-min: image 128 with a third Swin stage 654 steps, colour
    0.37 / shape 0.42 / motion 0.20; image 96 with patch 12 1422 steps, 0.995 / 0.525 / 0.37.
    More clips are not the cure either: 16,000 training clips (each seen ~8 times in the
    4,000-step schedule, not ~32) gave colour 1.00 / shape 0.59 / motion 0.98 against 0.98 /
    0.60 / 0.98 from 4,000 (bench, seed 1), so what the 32 px tiles show, not the number of
    clips, bounds shape (the CNN probe above later showed the tiles are legible: the tower was
    the limit).
    """

    num_frames: int = 4  # frames in the grid (2x2)
    image_size: int = 64  # the grid is resized to image_size^2, so each frame to image_size/2 (+ the key frame)
    # How the frames make one image (see `frame_grid`). "interleave" puts the frames of each
    # place side by side, so motion is local to a patch. Measured with the old recipe (8
    # cpu-minutes): "grid" colour 1.00 / shape 0.58 / motion 0.23, "interleave" 1.00 / 0.60 /
    # 0.26 (motion at chance either way: the recipe, not the layout, was the bottleneck).
    # "interleave+key" adds the first frame alone at image_size^2 (an input twice as wide): in
    # the interleaved half the frames of a moving object overlap, and towers memorised shape
    # there (ResNet 0.75 held-out / 1.00 train) instead of learning it (0.95 with the key frame).
    layout: str = "interleave+key"
    # Prepend GRID_NOTE to the prompt. Off saves our model ~20 of ~55 tokens per sequence (20%
    # more steps per cpu-minute); the note's "left to right, top to bottom" also shares words
    # with the motion phrases. Saved in captioner.json, so inference asks the same way.
    grid_note: bool = False
    # The vision tower. "resnet" (He et al. 2016; basic blocks, stride 4 stem, then stride 2 per
    # stage; in transformers' FastVLM): convolutions from the first pixel, so shape features
    # are the same wherever a small object lands; Swin's linear 8x8 patch embedding must learn
    # every alignment of a 3-6 px shape to its patch grid (its direct shape head: 0.44). "swin"
    # (Liu et al. 2021): windowed attention, a patch merge per stage; a plain ViT ("clip") of
    # the same cost was still at ~60% shape accuracy after 8 cpu-minutes. FocalNet (depthwise
    # conv modulation) was 0.44 s a step at a stride-2 patch, 0.125 s with its conv stem, shape
    # 0.38-0.46: no better than Swin.
    vision: str = "resnet"
    # swin, clip: the first patch (resnet ignores it); swin then halves the grid per extra
    # stage. 8 (an 8x8 grid at stage 1, 4x4 image tokens) not 4: patch 4 made 256 stage-1
    # tokens, 0.22 s per step of 32 on one thread vs 0.04 s, and the tower alone with a direct
    # motion loss learnt motion in one cpu-minute at patch 8 (0.94) but not at patch 4 (0.36).
    patch_size: int = 8
    vision_dim: int = 32  # swin, resnet: first-stage width, doubled per stage; clip: the width
    vision_depths: tuple[int, ...] = (1, 1, 1)  # swin, resnet: blocks per stage; clip: sum() layers
    vision_heads: tuple[int, ...] = (3, 6)  # per stage (clip uses the first)
    # Swin attention window, in patches. FOOTGUN: HF Swin breaks (a shape error in attention)
    # when a later stage's grid is smaller than the window, so keep it <= the last grid side.
    window_size: int = 4
    # Swin's learned absolute position embeddings (off in stock Swin, which relies on relative
    # biases): the language model needs each image token to say WHERE it is to read motion.
    absolute_positions: bool = True
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    batch_size: int = 32
    lr: float = 3e-3  # 1e-3 learnt motion slower (3 cpu-min: 0.28 vs 0.39, both with bow 0.1-0.3)
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_steps: int = 4000  # the cosine schedule's length; the time budget may stop it earlier
    # Weight of the auxiliary "which caption words does the image show" loss (see
    # `bag_of_words_loss`); 0 trains on the captions alone. Training-only: the saved model is a
    # plain LLaVA. At 3 cpu-minutes motion was 0.36 / 0.67 / 0.38 with 0.3 / 1 / 3 (noisy).
    # Off in "tiny" since the tag loss below teaches motion too: with the tags, keeping it (at
    # 1) gave shape 0.77 / 0.935 against 0.975 / 0.94 without (8 cpu-minutes, seeds 0 / 1).
    bow_weight: float = 0.0
    # See `bag_of_words_loss`. "feature" was no better at 3 cpu-minutes (shape 0.525 / motion
    # 0.205 vs 0.505 / 0.24 with "token").
    bow_pool: str = "token"
    # Chance that a training example is mirrored left-right, its caption's "left"/"right" words
    # swapped to match (see `flip_grid`, `mirror_word_ids`); training-only, 0 turns it off.
    # Off: at 0.5 the bench gave colour 0.995 / shape 0.55 / motion 0.94 (seed 0) and 1.00 /
    # 0.54 / 0.75 (seed 1; off, the same seed: 0.98 / 0.60 / 0.98): no help to shape, and
    # motion worse (half the batch with the opposite word pairs may slow its learning).
    flip_prob: float = 0.0
    # Weight of the auxiliary attribute-tag loss (`tag_targets`, `tag_loss`): each caption
    # parsed into attribute slots (colour, shape, size, motion, background of its main object)
    # by the shapes-world parser, each slot read by a linear softmax head from the projector's
    # output. Training-only (the heads are dropped; the saved model is a plain FastVLM/LLaVA).
    # 0 turns it off; captions the parser does not understand add nothing.
    tag_weight: float = 1.0
    # "feature": the head reads the max-pooled image tokens; "token": it scores every token and
    # each class keeps its best (multiple instance). "token" was worse: shape 0.655 / 0.69
    # (seeds 0 / 1, with the bag of words at 1) against 0.77 / 0.935 for "feature".
    tag_pool: str = "feature"

    @property
    def tile(self) -> tuple[int, int]:
        """Each frame's size inside the image_size^2 input (so the processor never resizes)."""
        rows, cols = grid_shape(self.num_frames)
        return self.image_size // rows, self.image_size // cols

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the model's input: image_size^2, twice as wide with the key frame."""
        return self.image_size, self.image_size * (2 if self.layout == "interleave+key" else 1)

    @property
    def feature_stride(self) -> int:
        """Pixels per image token handed to the language model."""
        if self.vision == "swin":
            return self.patch_size * 2 ** (len(self.vision_depths) - 1)
        if self.vision == "resnet":  # stem: conv stride 2 + max-pool stride 2; then stride 2 per later stage
            return 4 * 2 ** (len(self.vision_depths) - 1)
        return self.patch_size

    @property
    def image_tokens(self) -> int:
        """Image tokens per clip: the (H / feature_stride) x (W / feature_stride) grid (+1 CLS for clip)."""
        H, W = self.image_hw
        return (H // self.feature_stride) * (W // self.feature_stride) + (self.vision == "clip")

    @staticmethod
    def preset(name: str) -> "CaptionerConfig":
        assert name in PRESETS, f"unknown captioner preset {name!r}, have {sorted(PRESETS)}"
        return replace(PRESETS[name])


PRESETS: dict[str, CaptionerConfig] = {
    # Unit tests: trains in seconds, learns only the caption template.
    "debug": CaptionerConfig(image_size=32, patch_size=4, vision_dim=16, vision_depths=(1, 1), vision_heads=(2, 2),
                             window_size=4, text_dim=64, text_layers=1, text_heads=2, batch_size=16, lr=3e-3,
                             warmup_steps=5, max_steps=200),
    # The shapes world on a CPU in minutes (benchmarks/bench_captioner.py, `sora demo`).
    "tiny": CaptionerConfig(),
    # A start for natural video: a 224 px grid of 8 frames (3x3), a Swin-T-sized tower.
    "base": CaptionerConfig(num_frames=8, image_size=224, layout="interleave", vision="swin", patch_size=4,
                            vision_dim=96, vision_depths=(2, 2, 6, 2),
                            vision_heads=(3, 6, 12, 24), window_size=7, text_dim=512, text_layers=6, text_heads=8,
                            batch_size=64, lr=3e-4, warmup_steps=500, max_steps=50000,
                            bow_weight=1.0, tag_weight=0.0),  # natural captions: no shapes-world tags
}


_LEFT_RIGHT = re.compile(r"^(left|right)(wards?)?([.,;:!?]*)$")


def _mirror_word(word: str) -> str:
    """"left" <-> "right", "leftward." <-> "rightward." (lower case, punctuation kept); any
    other word is its own mirror."""
    m = _LEFT_RIGHT.match(word)
    if m is None:
        return word
    return ("right" if m.group(1) == "left" else "left") + (m.group(2) or "") + m.group(3)


def build_tokenizer(texts: Iterable[str]):
    """A word-level tokenizer whose vocabulary is every whitespace-separated word of `texts`
    (punctuation stays attached: "background." is one token, so decoding is an exact inverse of
    single-spaced text) plus the special tokens, plus the left/right mirror of every direction
    word (see `mirror_word_ids`). Returns a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.WhitespaceSplit()
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(t)}
    words = sorted((words | {_mirror_word(w) for w in words}) - set(SPECIALS))  # a mirrored caption stays in vocabulary
    vocab = {w: i for i, w in enumerate(list(SPECIALS) + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # join with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE)


def make_image_processor(cfg: CaptionerConfig):
    """The PIL (torchvision-free) CLIP image processor: grid -> (3, H, W) = cfg.image_hw, in [-1, 1]."""
    from transformers import CLIPImageProcessorPil

    H, W = cfg.image_hw
    size = {"height": H, "width": W}
    # Stretch to a square, no crop: a centre crop would cut off the first and last frames.
    return CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)


def build_captioner(cfg: CaptionerConfig, texts: Iterable[str]):
    """A randomly initialised captioner and its processor; the tokenizer's vocabulary comes from
    `texts` (the training captions; the prompt words are added here).

    vision "swin" / "clip": a LLaVA (`LlavaForConditionalGeneration`), whose tower must return
    (B, N, D) hidden states. vision "resnet": the same LLaVA design with a convolutional tower,
    which transformers ships as FastVLM (`FastVlmForConditionalGeneration`, Vasu et al. 2025:
    a LLaVA whose projector reads the tower's last (B, C, h, w) feature map as h * w tokens); any
    stock HF CNN fits there, here `ResNetModel`. Both load through `AutoModelForImageTextToText`
    and use a `LlavaProcessor`.
    Returns (model, LlavaProcessor)."""
    from transformers import (CLIPVisionConfig, FastVlmConfig, FastVlmForConditionalGeneration, LlamaConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, ResNetConfig, SwinConfig)

    assert cfg.vision in ("swin", "clip", "resnet"), f"vision must be 'swin', 'clip' or 'resnet', got {cfg.vision!r}"
    assert cfg.layout in LAYOUTS, f"layout must be one of {LAYOUTS}, got {cfg.layout!r}"
    H, W = cfg.image_hw
    assert H % cfg.feature_stride == 0 and W % cfg.feature_stride == 0, \
        f"the input {H}x{W} must be a multiple of the feature stride {cfg.feature_stride}"
    assert cfg.vision != "clip" or H == W, "the CLIP tower wants a square input (no 'interleave+key')"
    fixed = [GRID_NOTE.format(k=cfg.num_frames), DEFAULT_PROMPT, "user: assistant:"]  # the chat words
    tok = build_tokenizer(list(texts) + fixed)
    # The processor expands <image> into (H / patch_size) * (W / patch_size) + extra placeholders;
    # for Swin and ResNet its "patch" is the stride of the LAST stage, and there is no CLS token.
    processor = LlavaProcessor(image_processor=make_image_processor(cfg), tokenizer=tok,
                               patch_size=cfg.feature_stride, vision_feature_select_strategy="full",
                               num_additional_image_tokens=int(cfg.vision == "clip"), image_token="<image>",
                               chat_template=CHAT_TEMPLATE)
    widths = [cfg.vision_dim * 2 ** i for i in range(len(cfg.vision_depths))]
    if cfg.vision == "swin":
        assert len(cfg.vision_heads) == len(cfg.vision_depths), "one head count per Swin stage"
        # hidden_states[-1] of SwinModel is the last stage, (B, N, vision_dim * 2^(stages-1)):
        # LLaVA's projector reads config.hidden_size, which Swin sets to exactly that width.
        vision = SwinConfig(image_size=[H, W], patch_size=cfg.patch_size, embed_dim=cfg.vision_dim,
                            depths=list(cfg.vision_depths), num_heads=list(cfg.vision_heads),
                            window_size=cfg.window_size, mlp_ratio=4.0,
                            use_absolute_embeddings=cfg.absolute_positions)
    elif cfg.vision == "resnet":
        # Basic blocks (two 3x3 convs), widths doubling per stage. FastVLM's projector reads
        # vision_config.hidden_size, which ResNetConfig lacks: set it to the last stage's width
        # (an extra config attribute, saved in config.json like any other).
        vision = ResNetConfig(embedding_size=cfg.vision_dim, hidden_sizes=widths, depths=list(cfg.vision_depths),
                              layer_type="basic", downsample_in_first_stage=False, hidden_size=widths[-1])
    else:
        vision = CLIPVisionConfig(image_size=H, patch_size=cfg.patch_size, hidden_size=cfg.vision_dim,
                                  intermediate_size=4 * cfg.vision_dim, num_hidden_layers=sum(cfg.vision_depths),
                                  num_attention_heads=cfg.vision_heads[0])
    ids = {k: tok.convert_tokens_to_ids(k) for k in SPECIALS}
    text = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.text_dim, intermediate_size=4 * cfg.text_dim,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                       num_key_value_heads=cfg.text_heads, max_position_embeddings=512,
                       pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                       tie_word_embeddings=True)
    if cfg.vision == "resnet":
        config = FastVlmConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"],
                               image_seq_length=cfg.image_tokens, projector_hidden_act="gelu")
        model = FastVlmForConditionalGeneration(config)
    else:
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"],
                             vision_feature_select_strategy="full", vision_feature_layer=-1,
                             projector_hidden_act="gelu")
        model = LlavaForConditionalGeneration(config)
    assert config.vision_config.hidden_size == model.model.multi_modal_projector.linear_1.in_features
    g = model.generation_config
    g.eos_token_id, g.pad_token_id, g.bos_token_id = ids["</s>"], ids["<pad>"], ids["<s>"]
    g.do_sample, g.max_new_tokens = False, 64
    return model, processor


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
    assert captions, "no training examples"
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


def bag_of_words_targets(processor, captions: list[str]) -> torch.Tensor:
    """(N, V) float multi-hot: which vocabulary words each caption contains (specials never)."""
    tok = processor.tokenizer
    special = set(tok.convert_tokens_to_ids(list(SPECIALS)))
    out = torch.zeros(len(captions), len(tok))
    for i, c in enumerate(captions):
        out[i, [t for t in tok(c, add_special_tokens=False)["input_ids"] if t not in special]] = 1.0
    return out


def bag_of_words_loss(image_tokens: torch.Tensor, word_embeddings: torch.Tensor, targets: torch.Tensor,
                      pool: str = "token") -> torch.Tensor:
    """Tag the image with its caption's words, through the language model's own embeddings.

    Why: the caption loss reaches the vision tower only through the few tokens that name a
    shape or a direction, after the language model has learnt to look at the image at all; on
    a CPU budget the tower then never learns motion (it stayed at chance), although the same
    tower with a direct loss learns it in a minute. Scoring every projected image token
    against every word embedding (multiple-instance: a word is present if ANY token shows it,
    so a small object in one token counts) gives the tower a direct, dense signal, and pulls
    its features towards the embeddings the language model reads (cf. tag-prediction
    pre-training, Huang et al. 2023, "Tag2Text").

    pool: "token" scores each word by its best token, max_n (t_n . e_w); "feature" scores it
    against the image's max-pooled feature, (max_n t_n) . e_w, one vector for every word.

    image_tokens (B, N, D) projector outputs; word_embeddings (V, D); targets (B, V) multi-hot.
    Returns the binary cross-entropy summed over words, averaged over the batch (a scalar)."""
    assert pool in ("token", "feature"), f"pool must be 'token' or 'feature', got {pool!r}"
    if pool == "token":
        logits = (image_tokens @ word_embeddings.T).amax(1)  # (B, V): the best token per word
    else:
        logits = image_tokens.amax(1) @ word_embeddings.T  # (B, D) @ (D, V)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return bce.sum(1).mean()


TAG_SLOTS = ("color", "shape", "size", "motion", "background")  # of the caption's main object


def tag_targets(captions: list[str], parse: Callable[[str], dict] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Parse each caption into attribute tags, one class per slot of TAG_SLOTS (Tag2Text-style
    tags parsed from the paired text, Huang et al. 2023). `parse(caption)` returns a dict with
    those keys, None for what the caption does not say; default: the shapes-world parser
    (`sora.shapes.parse_prompt`), which leaves every slot None on captions outside that world.

    Returns (N, len(TAG_SLOTS)) long class indices, -100 where the caption does not say, and
    the class count of each slot (the values seen in `captions`, sorted; at least 1)."""
    if parse is None:
        from sora.shapes import parse_prompt as parse

    parsed = [parse(c) for c in captions]
    values = [sorted({p[k] for p in parsed if p[k] is not None}) for k in TAG_SLOTS]
    out = torch.full((len(captions), len(TAG_SLOTS)), -100, dtype=torch.long)
    for i, p in enumerate(parsed):
        for j, k in enumerate(TAG_SLOTS):
            if p[k] is not None:
                out[i, j] = values[j].index(p[k])
    return out, [max(1, len(v)) for v in values]


def tag_loss(image_tokens: torch.Tensor, heads: torch.nn.ModuleList, targets: torch.Tensor,
             pool: str = "feature") -> torch.Tensor:
    """Sum over tag slots of the cross-entropy of a linear head reading the image tokens.

    Why: the caption loss teaches the vision tower an attribute only through the one caption
    token that names it, behind a language model still learning to look; the bag of words
    over all caption words gives a dense signal, but one that most words (the template, both
    "left" and "right" of "from left to right") spend on nothing the image shows. One softmax
    per attribute slot is the signal a tower learns fastest from (a direct shape head: 0.95
    held-out in ~900 steps).

    image_tokens (B, N, D) projector outputs; heads: one Linear(D, classes) per slot; targets
    (B, slots) long with -100 = unknown (a slot unknown in the whole batch adds nothing).
    pool: "feature" reads the max-pooled tokens; "token" scores every token and keeps each
    class's best (multiple instance). Returns a scalar."""
    assert pool in ("token", "feature"), f"pool must be 'token' or 'feature', got {pool!r}"
    assert targets.shape == (image_tokens.shape[0], len(heads)), f"targets {tuple(targets.shape)} for {len(heads)} heads"
    pooled = image_tokens.amax(1) if pool == "feature" else None
    total = image_tokens.new_zeros(())
    for j, head in enumerate(heads):
        if (targets[:, j] >= 0).any():
            logits = head(pooled) if pool == "feature" else head(image_tokens).amax(1)
            total = total + torch.nn.functional.cross_entropy(logits, targets[:, j], ignore_index=-100)
    return total


def flip_grid(pixels: torch.Tensor, k: int, layout: str) -> torch.Tensor:
    """Mirror every frame of frame-grid images left-right, keeping the layout and time order.

    A plain flip of the whole image would also reverse the frame order along each row: in
    "grid" the tiles of a row, in "interleave" the column phase of each pixel block (frame 0
    would land where frame 1 belongs, so motion would run backwards). Flipping back that one
    axis undoes it. "interleave+key": each half on its own (the key frame is a plain picture).
    pixels (..., S, W) with W = S (2 S for "interleave+key") and S = rows * h = cols * w;
    returns the same shape."""
    if layout == "interleave+key":
        woven, key = pixels.chunk(2, dim=-1)
        return torch.cat([flip_grid(woven, k, "interleave"), key.flip(-1)], dim=-1)
    rows, cols = grid_shape(k)
    W = pixels.shape[-1]
    assert W % cols == 0, f"width {W} is not a multiple of the grid's {cols} columns"
    x = pixels.flip(-1)
    if layout == "interleave":  # (..., W/cols, cols): flip the phase back
        return x.unflatten(-1, (W // cols, cols)).flip(-1).flatten(-2)
    assert layout == "grid", f"unknown layout {layout!r}"
    return x.unflatten(-1, (cols, W // cols)).flip(-2).flatten(-2)  # (..., cols, w): tiles back in order


def mirror_word_ids(tokenizer) -> torch.Tensor:
    """(V,) long permutation of the vocabulary that a left-right mirror applies to a caption:
    "left" <-> "right", "leftward." <-> "rightward." etc. (lower case, punctuation kept); every
    other word maps to itself. An involution. `build_tokenizer` puts every mirror word in the
    vocabulary; with another tokenizer a word whose mirror is missing would stay unswapped."""
    vocab = tokenizer.get_vocab()
    perm = torch.arange(len(tokenizer))
    for word, i in vocab.items():
        perm[i] = vocab.get(_mirror_word(word), i)
    assert torch.equal(perm[perm], torch.arange(len(perm))), "the left/right swap must be an involution"
    return perm


def fit_captioner(model, processor, pixels: torch.Tensor, captions: list[str], cfg: CaptionerConfig, *,
                  max_minutes: float = 8.0, seed: int = 0, clock: str = "wall",
                  progress: Callable[[int, int, float], None] | None = None,
                  rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Train `model` in place on pixel_values (N, 3, S, S) and their N captions (teacher
    forcing, loss on the caption tokens only). Returns stats (see `train_captioner`).

    Data parallel when world > 1 (a torch.distributed group already initialised, see
    `train_captioner(workers=)`): every rank draws the same global batch of cfg.batch_size and
    computes its share (every world-th example); gradients and the loss are averaged with one
    all-reduce, so the ranks take identical steps. Rank 0's clock decides the schedule and the
    stop, broadcast each step.

    The learning rate follows warmup + cosine over progress = max(step / max_steps,
    elapsed / budget), so it anneals even when the time budget, not the step count, ends the
    run (the usual case on a shared CPU); when max_steps ends it, the run is deterministic.
    clock: what `max_minutes` measures: "wall" time, or "cpu" time of this process (all its
    threads). On a shared machine "cpu" with `torch.set_num_threads(1)` is the honest budget:
    N cpu-minutes single-threaded is N wall-minutes on one idle core, however busy the
    machine is while it runs.
    """
    assert clock in ("wall", "cpu"), f"clock must be 'wall' or 'cpu', got {clock!r}"
    assert len(pixels) == len(captions), f"{len(pixels)} grids but {len(captions)} captions"
    input_ids, labels = _token_batches(processor, captions, cfg)
    pad = processor.tokenizer.pad_token_id
    mirror = mirror_word_ids(processor.tokenizer) if cfg.flip_prob > 0 else None
    bow = bag_of_words_targets(processor, captions) if cfg.bow_weight > 0 else None
    tags, heads = None, None
    assert not (cfg.flip_prob > 0 and cfg.tag_weight > 0), \
        "flip_prob and tag_weight together are not supported: mirrored clips would keep their unmirrored motion tags"
    if cfg.tag_weight > 0:
        tags, n_cls = tag_targets(captions)
        with torch.random.fork_rng():  # the same heads on every rank, the global RNG untouched
            torch.manual_seed(seed + 1)
            heads = torch.nn.ModuleList(torch.nn.Linear(cfg.text_dim, c) for c in n_cls)
    seen: list[torch.Tensor] = []  # the projector's output of the current step, (B, N, D)
    hook = (model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: seen.append(o))
            if bow is not None or tags is not None else None)
    n = len(input_ids)
    trained = list(model.parameters()) + (list(heads.parameters()) if heads is not None else [])
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    budget_s = max_minutes * 60.0
    now = time.perf_counter if clock == "wall" else time.process_time
    order, pos, step, losses, tag_losses = torch.randperm(n, generator=gen), 0, 0, [], []
    assert cfg.batch_size % world == 0, f"batch_size {cfg.batch_size} does not split over {world} workers"
    if world > 1:
        import torch.distributed as dist
        for p in trained:  # start from rank 0's weights, whatever each rank built
            dist.broadcast(p.data, src=0)
    params = [p for p in trained if p.requires_grad]
    model.train()
    t0, c0, tb = time.perf_counter(), time.process_time(), now()
    while True:
        frac = max(step / cfg.max_steps, (now() - tb) / budget_s)
        if world > 1:  # rank 0's clock rules: the same schedule and the same last step everywhere
            sync = torch.tensor([frac], dtype=torch.float64)
            dist.broadcast(sync, src=0)
            frac = float(sync[0])
        if step >= cfg.max_steps or frac >= 1.0:
            break
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
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
        out = model(input_ids=ids, attention_mask=(ids != pad).long(), pixel_values=px, labels=lab)
        loss = out.loss
        image_tokens = seen.pop() if seen else None
        if bow is not None:
            loss = loss + cfg.bow_weight * bag_of_words_loss(image_tokens, model.get_input_embeddings().weight, words,
                                                             cfg.bow_pool)
        if tags is not None:
            tagged = tag_loss(image_tokens, heads, tags[idx], cfg.tag_pool)
            loss = loss + cfg.tag_weight * tagged
            tag_losses.append(tagged.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        caption_loss = out.loss.item()
        if world > 1:
            caption_loss = _all_reduce_mean(params, caption_loss, world)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        losses.append(caption_loss)
        step += 1
        if progress is not None and step % 10 == 0:
            progress(step, cfg.max_steps, losses[-1])
    assert losses, "the time budget ended training before the first step"
    if hook is not None:
        hook.remove()
    model.eval()
    tag_stats = ({"first_tag_loss": tag_losses[0], "final_tag_loss": float(np.mean(tag_losses[-20:]))}
                 if tag_losses else {})
    return {"steps": step, "examples": n, "params": sum(p.numel() for p in model.parameters()), **tag_stats,
            "first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])), "loss_history": losses[::10],
            "train_minutes": (time.perf_counter() - t0) / 60, "train_cpu_minutes": (time.process_time() - c0) / 60,
            "clock": clock, "threads": torch.get_num_threads(), "seed": seed}


def _all_reduce_mean(params: list[torch.Tensor], loss: float, world: int) -> float:
    """Average the gradients of `params` (None counts as zeros) and a loss over the group, in
    one flat all-reduce. Returns the mean loss."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([loss], dtype=grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)  # views of this step's fresh buffer
        offset += g.numel()
    return float(flat[-1])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join_group(rank: int, world: int, port: int) -> None:
    """Join the local gloo group of a data-parallel captioner run (rank 0 hosts it on `port`).
    A collective that waits 2 minutes means a rank died: fail rather than hang."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=2))


def _fit_worker(rank: int, world: int, port: int, cfg: CaptionerConfig, pixels: torch.Tensor, captions: list[str],
                seed: int, max_minutes: float, clock: str, threads: int, done=None) -> None:
    """A helper rank of `train_captioner(workers=)`: builds the same model and takes its share
    of every step; rank 0 (the calling process) keeps and saves the result.

    It sets `done` once its share is taken, then leaves with os._exit: FOOTGUN: a spawned gloo
    rank that ran the normal interpreter teardown sometimes died with SIGABRT ("terminate called
    without an active exception", gloo threads outliving the interpreter) after all its work was
    done, and CI failed on the exit code of a run that had finished."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    _join_group(rank, world, port)
    try:
        torch.manual_seed(seed)
        model, processor = build_captioner(cfg, captions)
        fit_captioner(model, processor, pixels, captions, cfg, max_minutes=max_minutes, seed=seed, clock=clock,
                      rank=rank, world=world)
        if done is not None:
            done.set()
    finally:
        dist.destroy_process_group()
    if done is not None:  # spawned by _fit_parallel: skip the interpreter teardown (see above)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


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
                    config: CaptionerConfig | None = None, clock: str = "wall", workers: int = 1) -> dict[str, Any]:
    """Train our LLaVA captioner on (clip (T, H, W, 3) uint8, caption) pairs and save it to
    `out_dir` as a normal HF model dir (config.json, model.safetensors, tokenizer, processor,
    chat template) plus captioner.json. `examples` may be a generator: it is read once.

    max_minutes / clock / progress: see `fit_captioner` (progress(step, max_steps, loss) every
    10 steps). workers > 1: data parallel over that many processes on this machine (this one
    is rank 0; the others are spawned, share the pixels through shared memory, and the ranks
    split this process's torch threads between them), e.g. 2 on 2 cores: twice the examples per minute at
    the same global batch. With clock "cpu" the budget is rank 0's CPU time.
    Returns stats: steps, examples, params, first_loss, final_loss (caption loss; final: mean of
    the last 20 steps), loss_history (every 10th step), first_tag_loss / final_tag_loss (when
    cfg.tag_weight > 0; rank 0's share of the batch), prep_minutes (grids + tokenizer),
    train_minutes, train_cpu_minutes, preset.
    """
    cfg = config if config is not None else CaptionerConfig.preset(preset)
    t0 = time.perf_counter()
    pixels, captions = encode_clips(examples, cfg)
    torch.manual_seed(seed)
    model, processor = build_captioner(cfg, captions)
    prep_s = time.perf_counter() - t0
    assert workers >= 1, f"workers must be >= 1, got {workers}"
    if workers == 1:
        stats = fit_captioner(model, processor, pixels, captions, cfg, max_minutes=max_minutes, seed=seed,
                              clock=clock, progress=progress)
    else:
        stats = _fit_parallel(model, processor, pixels, captions, cfg, workers, max_minutes=max_minutes, seed=seed,
                              clock=clock, progress=progress)
    stats.update(preset=preset if config is None else "custom", prep_minutes=prep_s / 60,
                 vocab_size=len(processor.tokenizer), workers=workers)
    save_captioner(model, processor, out_dir, cfg, stats)
    return stats


def _fit_parallel(model, processor, pixels: torch.Tensor, captions: list[str], cfg: CaptionerConfig, workers: int,
                  **fit_kwargs) -> dict[str, Any]:
    """`fit_captioner` over `workers` local processes: this one is rank 0, the rest spawned.

    The ranks share this process's torch threads: each gets max(1, threads // workers) for the
    run. FOOTGUN: each rank keeping all of them (2 ranks x 2 threads on 2 cores) made the
    demo's captioner 5x slower than one process (240 steps in 3 minutes)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    assert not dist.is_initialized(), "train_captioner(workers > 1) needs a process without a torch.distributed group"
    assert len(captions) >= workers, f"{len(captions)} examples cannot feed {workers} workers"
    port = _free_port()
    pixels = pixels.share_memory_()
    threads_before = torch.get_num_threads()
    per_rank = max(1, threads_before // workers)
    ctx = mp.get_context("spawn")
    done = [ctx.Event() for _ in range(1, workers)]
    helpers = [ctx.Process(target=_fit_worker, daemon=True,
                           args=(r, workers, port, cfg, pixels, captions, fit_kwargs["seed"], fit_kwargs["max_minutes"],
                                 fit_kwargs["clock"], per_rank, done[r - 1]))
               for r in range(1, workers)]
    for h in helpers:
        h.start()
    torch.set_num_threads(per_rank)
    try:
        _join_group(0, workers, port)
        try:
            stats = fit_captioner(model, processor, pixels, captions, cfg, rank=0, world=workers, **fit_kwargs)
        finally:
            # rank 0 hosts the group's store: let the helpers leave the group before it goes
            for h in helpers:
                h.join(timeout=60)
            dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads_before)
        for h in helpers:
            h.join(timeout=5)
            if h.is_alive():
                h.terminate()
                h.join(timeout=5)
    unfinished = [r for r, h in enumerate(helpers, start=1) if not done[r - 1].is_set()]
    assert not unfinished, (f"captioner training helper ranks {unfinished} did not finish their share "
                            f"(exit codes {[helpers[r - 1].exitcode for r in unfinished]})")
    crashed = [h.exitcode for h in helpers if h.exitcode != 0]
    if crashed:  # every step's collectives completed, so the model is whole; say so, do not fail
        print(f"note: captioner helper ranks exited with {crashed} after finishing their share", file=sys.stderr)
    return stats
