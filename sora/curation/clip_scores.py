"""CLIP scores of a clip: an aesthetic score (a linear head on CLIP image embeddings, as the
LAION aesthetic predictor does) and caption-image alignment (CLIP's text-image cosine
similarity, Radford et al. 2021), from any `transformers.CLIPModel` saved in a local directory.

The model directory holds what `CLIPModel.save_pretrained` writes, the image processor's
`preprocessor_config.json`, for alignment a tokenizer, and for the aesthetic score
`aesthetic_head.safetensors`: {"weight": (1, D), "bias": (1,)} over L2-normalised image
embeddings of width D (`save_aesthetic_head` writes one). Nothing is fetched from a hub.

Without a model directory there is no score: callers store null, never a made-up value.

Shapes: frames are (T, H, W, 3) uint8 RGB.
"""

from __future__ import annotations

import os

import numpy as np
import torch

HEAD_FILE = "aesthetic_head.safetensors"


def save_aesthetic_head(model_dir: str, weight: torch.Tensor, bias: torch.Tensor) -> str:
    """Write a linear aesthetic head (weight (1, D), bias (1,)) into `model_dir`."""
    from safetensors.torch import save_file

    weight, bias = weight.detach().float().reshape(1, -1).contiguous(), bias.detach().float().reshape(1).contiguous()
    path = os.path.join(model_dir, HEAD_FILE)
    save_file({"weight": weight, "bias": bias}, path)
    return path


class ClipScorer:
    """A CLIP model from `model_dir`, loaded once; scores clips frame by frame."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from transformers import CLIPImageProcessorPil, CLIPModel

        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"CLIP model directory {model_dir!r} does not exist: pass a directory "
                                    "written by CLIPModel.save_pretrained (with its preprocessor_config.json)")
        self.model = CLIPModel.from_pretrained(model_dir).to(device).eval()
        self.processor = CLIPImageProcessorPil.from_pretrained(model_dir)
        self.device = device
        self.tokenizer = None
        if any(os.path.isfile(os.path.join(model_dir, f)) for f in
               ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.head = None
        head = os.path.join(model_dir, HEAD_FILE)
        if os.path.isfile(head):
            from safetensors.torch import load_file

            w = load_file(head)
            dim = self.model.config.projection_dim
            if tuple(w["weight"].shape) != (1, dim) or tuple(w["bias"].shape) != (1,):
                raise ValueError(f"{head}: the head must be weight (1, {dim}) and bias (1,), got "
                                 f"{tuple(w['weight'].shape)} and {tuple(w['bias'].shape)}")
            self.head = torch.nn.Linear(dim, 1).to(device)
            self.head.load_state_dict(w)
        self.model_dir = model_dir

    @torch.no_grad()
    def image_embeddings(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (T, D) L2-normalised CLIP image embeddings."""
        frames = np.asarray(frames)
        assert frames.ndim == 4 and frames.shape[-1] == 3 and len(frames), \
            f"frames must be (T, H, W, 3) with T >= 1, got {frames.shape}"
        pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model.get_image_features(pixel_values=pixels)
        emb = getattr(out, "pooler_output", out)  # transformers 5 returns a model output
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def aesthetic(self, frames: np.ndarray) -> float:
        """Mean over `frames` of the head's score of each frame's embedding."""
        if self.head is None:
            raise FileNotFoundError(f"{self.model_dir} has no {HEAD_FILE}: add a linear head "
                                    "(sora.curation.clip_scores.save_aesthetic_head) for aesthetic scores")
        return float(self.head(self.image_embeddings(frames)).mean())

    @torch.no_grad()
    def alignment(self, frames: np.ndarray, caption: str) -> float:
        """Cosine similarity in [-1, 1] of the caption's CLIP text embedding and the mean image
        embedding of `frames` (re-normalised): low values flag captions that miss the picture."""
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.model_dir} has no tokenizer: caption alignment needs the "
                                    "CLIP tokenizer saved beside the model")
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer([caption], return_tensors="pt", truncation=True, max_length=max_len)
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device))
        text = torch.nn.functional.normalize(getattr(out, "pooler_output", out).float(), dim=-1)[0]
        image = torch.nn.functional.normalize(self.image_embeddings(frames).mean(0), dim=-1)
        return float(image @ text)


def aesthetic_or_none(scorer: ClipScorer | None, frames: np.ndarray) -> float | None:
    """The aesthetic score, or None when no CLIP model was given (a null column)."""
    return None if scorer is None else scorer.aesthetic(frames)


def alignment_or_none(scorer: ClipScorer | None, frames: np.ndarray, caption: str | None) -> float | None:
    """Caption-image alignment, or None without a CLIP model or a caption."""
    return None if scorer is None or not caption else scorer.alignment(frames, caption)
