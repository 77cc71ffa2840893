"""NaViT-style sequence packing, and the pad-to-longest baseline it replaces.

Videos of different sizes and durations give different token counts N_i. Two ways to batch:

- **Packing** (Dehghani et al. 2023, "Patch n' Pack"): concatenate the token lists of several
  videos into one sequence of length N = sum N_i, and tell attention which video each token
  belongs to (``seq_ids`` / ``cu_seqlens``). Batches are formed by a *token budget*, so every
  step does about the same work whatever the mix of sizes, and no compute goes to padding.
- **Padding** (the baseline): stack B videos into (B, N_max, D_in), padding each to the
  longest one. Mixed aspect ratios and lengths waste a large fraction of the compute.

:func:`padding_fraction` measures the waste of both so the benchmark can compare them.

Shapes: N tokens, D_in = C * pt * ph * pw token width, L text tokens, B videos.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch


@dataclass
class Sample:
    """One video as patch tokens.

    tokens: (N_i, D_in); positions: (N_i, 3) int (t, h, w) from ``patches.position_ids``;
    grid: (t, h, w) with t * h * w == N_i. Text is either the encoder states ``text``
    (L_i, text_dim) with ``text_mask`` (L_i,) bool, or ``text_index`` into a table of
    embeddings held elsewhere (so a dataset need not copy the same prompt embedding per row).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    grid: tuple[int, int, int]
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    text_index: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)
        t, h, w = self.grid
        n = self.tokens.shape[0]
        assert t * h * w == n, f"grid {self.grid} has {t * h * w} cells but there are {n} tokens"
        assert self.positions.shape == (n, 3), f"positions {tuple(self.positions.shape)} != ({n}, 3)"
        if self.text is not None and self.text_mask is None:
            self.text_mask = torch.ones(self.text.shape[0], dtype=torch.bool)
        if self.text is not None:
            assert self.text_mask.shape == self.text.shape[:1], "text_mask must be (L_i,) for text (L_i, text_dim)"

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]


def _pad_text(samples: list[Sample]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Text of B samples -> (text (B, L, text_dim), mask (B, L), index (B,)); None where absent."""
    has_text = [s.text is not None for s in samples]
    has_index = [s.text_index is not None for s in samples]
    text = mask = index = None
    if any(has_text):
        assert all(has_text), "either every sample carries text states or none does"
        L = max(s.text.shape[0] for s in samples)
        ref = samples[0].text
        text = ref.new_zeros(len(samples), L, ref.shape[1])  # (B, L, text_dim)
        mask = torch.zeros(len(samples), L, dtype=torch.bool)  # (B, L)
        for b, s in enumerate(samples):
            text[b, : s.text.shape[0]] = s.text
            mask[b, : s.text.shape[0]] = s.text_mask
    if any(has_index):
        assert all(has_index), "either every sample carries a text_index or none does"
        index = torch.tensor([s.text_index for s in samples], dtype=torch.long)  # (B,)
    return text, mask, index


# ----------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """B videos packed into one sequence of N tokens (see :func:`pack`)."""

    tokens: torch.Tensor  # (N, D_in)
    positions: torch.Tensor  # (N, 3) long
    seq_ids: torch.Tensor  # (N,) long, video index in [0, B)
    cu_seqlens: torch.Tensor  # (B + 1,) int32, token offsets (flash-attn varlen convention)
    grids: list[tuple[int, int, int]]
    text: torch.Tensor | None = None  # (B, L, text_dim), zero-padded
    text_mask: torch.Tensor | None = None  # (B, L) bool
    text_index: torch.Tensor | None = None  # (B,) long
    metadata: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.grids)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def seqlens(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)

    def to(self, device: str | torch.device) -> "PackedBatch":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return PackedBatch(**{k: move(v) for k, v in self.__dict__.items()})


def pack(samples: list[Sample]) -> PackedBatch:
    """Concatenate samples into one :class:`PackedBatch`: tokens (N, D_in), positions (N, 3),
    seq_ids (N,), cu_seqlens (B+1,), text padded to (B, L, text_dim) with mask (B, L)."""
    assert len(samples) > 0, "cannot pack an empty list of samples"
    lengths = torch.tensor([s.num_tokens for s in samples])
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    text, mask, index = _pad_text(samples)
    return PackedBatch(
        tokens=torch.cat([s.tokens for s in samples]),  # (N, D_in)
        positions=torch.cat([s.positions for s in samples]).long(),  # (N, 3)
        seq_ids=torch.repeat_interleave(torch.arange(len(samples)), lengths),  # (N,)
        cu_seqlens=cu,
        grids=[s.grid for s in samples],
        text=text,
        text_mask=mask,
        text_index=index,
        metadata=[s.metadata for s in samples],
    )


def unpack(tensor: torch.Tensor, packed: PackedBatch) -> list[torch.Tensor]:
    """Split a per-token tensor (N, ...) of a pack back into B tensors (N_i, ...)."""
    assert tensor.shape[0] == packed.num_tokens, f"tensor has {tensor.shape[0]} rows, pack has {packed.num_tokens} tokens"
    return list(torch.split(tensor, packed.seqlens))


def batch_by_token_budget(
    samples: Iterable[Sample], max_tokens: int, *, max_samples: int | None = None, oversize: str = "raise"
) -> Iterator[list[Sample]]:
    """Group a stream of samples into packs of at most ``max_tokens`` tokens.

    Greedy next-fit in stream order: add samples to the current pack until the next one
    would overflow the budget (or ``max_samples`` is reached), then emit it. Every sample
    appears exactly once and order is kept, so a seeded shuffle upstream stays reproducible.
    A sample longer than the budget alone: ``oversize="raise"`` raises ValueError (the
    default: it usually means the budget is below the largest bucket); ``"alone"`` emits it
    as its own pack, which then exceeds the budget.
    """
    assert max_tokens > 0, "max_tokens must be positive"
    assert oversize in ("raise", "alone"), f"oversize must be 'raise' or 'alone', got {oversize!r}"
    current: list[Sample] = []
    used = 0
    for s in samples:
        n = s.num_tokens
        if n > max_tokens:
            if oversize == "raise":
                raise ValueError(f"a sample of {n} tokens (grid {s.grid}) exceeds the token budget {max_tokens}")
            if current:
                yield current
                current, used = [], 0
            yield [s]
            continue
        if used + n > max_tokens or (max_samples is not None and len(current) >= max_samples):
            yield current
            current, used = [], 0
        current.append(s)
        used += n
    if current:
        yield current


# ----------------------------------------------------------------------------------------
# The pad-to-longest baseline
# ----------------------------------------------------------------------------------------


@dataclass
class PaddedBatch:
    """B videos padded to the longest one (see :func:`pad_batch`)."""

    tokens: torch.Tensor  # (B, N_max, D_in), zero at padding
    positions: torch.Tensor  # (B, N_max, 3) long, zero at padding
    token_mask: torch.Tensor  # (B, N_max) bool, False = padding
    grids: list[tuple[int, int, int]]
    text: torch.Tensor | None = None  # (B, L, text_dim)
    text_mask: torch.Tensor | None = None  # (B, L) bool
    text_index: torch.Tensor | None = None  # (B,) long
    metadata: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return self.tokens.shape[0]

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.token_mask.float().mean().item()

    def to(self, device: str | torch.device) -> "PaddedBatch":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return PaddedBatch(**{k: move(v) for k, v in self.__dict__.items()})


def batch_by_count(samples: Iterable[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """The baseline batcher: fixed ``batch_size`` samples per batch, whatever their length
    (the last batch may be smaller)."""
    assert batch_size > 0, "batch_size must be positive"
    current: list[Sample] = []
    for s in samples:
        current.append(s)
        if len(current) == batch_size:
            yield current
            current = []
    if current:
        yield current


def pad_batch(samples: list[Sample], pad_to_multiple: int = 1) -> PaddedBatch:
    """Stack samples into (B, N_max, D_in), N_max = the longest sample rounded up to
    ``pad_to_multiple`` (kernels like multiples of 64/128)."""
    assert len(samples) > 0, "cannot pad an empty list of samples"
    n_max = max(s.num_tokens for s in samples)
    n_max = -(-n_max // pad_to_multiple) * pad_to_multiple
    B, D_in = len(samples), samples[0].tokens.shape[1]
    tokens = samples[0].tokens.new_zeros(B, n_max, D_in)  # (B, N_max, D_in)
    positions = torch.zeros(B, n_max, 3, dtype=torch.long)  # (B, N_max, 3)
    token_mask = torch.zeros(B, n_max, dtype=torch.bool)  # (B, N_max)
    for b, s in enumerate(samples):
        tokens[b, : s.num_tokens] = s.tokens
        positions[b, : s.num_tokens] = s.positions
        token_mask[b, : s.num_tokens] = True
    text, mask, index = _pad_text(samples)
    return PaddedBatch(tokens, positions, token_mask, [s.grid for s in samples], text, mask, index, [s.metadata for s in samples])


def padding_fraction(batches: Iterable[list[Sample]], max_tokens: int | None = None) -> float:
    """Fraction of computed token slots that hold no real token, over many batches.

    ``max_tokens`` given (packing): each pack is counted as ``max_tokens`` slots, i.e. as if
    padded to the budget for static shapes - the unused budget. (With a varlen kernel
    nothing is computed for it; this is then the utilisation loss of the batcher.)
    ``max_tokens`` None (pad-to-longest): each batch costs B * N_max slots.
    """
    real = slots = 0
    for batch in batches:
        lengths = [s.num_tokens for s in batch]
        real += sum(lengths)
        slots += max(max_tokens, sum(lengths)) if max_tokens is not None else len(lengths) * max(lengths)
    assert slots > 0, "no batches given"
    return 1.0 - real / slots
