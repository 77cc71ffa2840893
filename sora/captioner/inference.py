"""Captions from any Hugging Face image-text-to-text model in a local directory (offline)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from sora.captioner.frames import frame_grid, sample_frame_indices

# Asked of every model. Short on purpose: our own model reads it on every example, and it is a
# plain instruction any instruction-tuned VLM follows.
DEFAULT_PROMPT = "Describe this video in one sentence."
# Prepended in grid mode so a general VLM knows how to read the picture.
GRID_NOTE = "The image shows {k} frames in time order, left to right, top to bottom."
SIDECAR = "captioner.json"  # how a model dir wants to be asked: num_frames and prompt


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

        if not os.path.isdir(path):
            raise FileNotFoundError(f"captioner path {path!r} is not a directory: give a model directory")
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
