"""Auxiliary training losses of our captioner: a bag of caption words and attribute tags, both
read from the projected image tokens (training only: the saved model is a plain LLaVA)."""

from __future__ import annotations

from typing import Callable

import torch

from sora.captioner.model import SPECIALS

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
