"""Packing: positions for every bucket, pack/unpack round trip, the token-budget batcher,
and how much padding packing saves over pad-to-longest on a mixed-aspect set."""

from __future__ import annotations

import random

import pytest
import torch

from sora.buckets import RESOLUTIONS, assign_bucket
from sora.packing import (
    PackedBatch,
    Sample,
    batch_by_count,
    batch_by_token_budget,
    pack,
    pad_batch,
    padding_fraction,
    unpack,
)
from sora.patches import grid_for, patchify, position_ids


ASPECTS = [(16, 9), (9, 16), (1, 1), (4, 3), (3, 4), (239, 100)]
PATCH = (1, 2, 2)


def bucket_grids(resolutions=("64p", "96p", "144p", "240p"), frames=(1, 17, 33)):
    """Token grids of real buckets: aspect x resolution class x length."""
    grids = []
    for res in resolutions:
        for aw, ah in ASPECTS:
            for f in frames:
                b = assign_bucket(aw * 100, ah * 100, f, resolution=res)
                grids.append(grid_for(b.latent_shape(), PATCH))
    return grids


def make_sample(grid, seed=0, d_in=4, text_len=None, text_dim=8):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    text = None if text_len is None else torch.randn(text_len, text_dim, generator=g)
    return Sample(
        tokens=torch.randn(n, d_in, generator=g),
        positions=position_ids(grid),
        grid=grid,
        text=text,
        metadata={"seed": seed},
    )


def test_positions_for_every_bucket_match_a_brute_force_loop():
    grids = set(bucket_grids(resolutions=tuple(RESOLUTIONS)[:5]))
    assert len(grids) > 40
    for grid in grids:
        t, h, w = grid
        expected = torch.tensor([[i, j, k] for i in range(t) for j in range(h) for k in range(w)])
        assert torch.equal(position_ids(grid), expected), grid


def test_packed_positions_and_tokens_follow_each_video_patchify_order():
    """Token n of a packed video is the latent patch at positions[n] of that video."""
    C = 3
    latents = [torch.randn(C, t, 2 * h, 2 * w) for t, h, w in [(3, 4, 5), (2, 3, 2), (1, 5, 4)]]
    samples = []
    for z in latents:
        grid = grid_for(z.shape, PATCH)
        samples.append(Sample(patchify(z, PATCH), position_ids(grid), grid))
    packed = pack(samples)
    for n in range(packed.num_tokens):
        b = int(packed.seq_ids[n])
        t, h, w = packed.positions[n].tolist()
        patch = latents[b][:, t, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2].reshape(-1)  # (C*1*2*2,)
        assert torch.equal(packed.tokens[n], patch)


def test_pack_unpack_round_trip_and_offsets():
    grids = [(3, 4, 5), (1, 2, 2), (2, 7, 3)]
    samples = [make_sample(g, i, text_len=L) for i, (g, L) in enumerate(zip(grids, [5, 9, 2]))]
    packed = pack(samples)
    assert isinstance(packed, PackedBatch)
    assert packed.num_tokens == 60 + 4 + 42 and packed.num_samples == 3
    assert packed.cu_seqlens.tolist() == [0, 60, 64, 106] and packed.max_seqlen == 60
    assert packed.seq_ids.tolist() == [0] * 60 + [1] * 4 + [2] * 42
    for s, tok, pos in zip(samples, unpack(packed.tokens, packed), unpack(packed.positions, packed)):
        assert torch.equal(tok, s.tokens) and torch.equal(pos, s.positions)
    # text padded to the longest prompt, with a mask that marks the real tokens
    assert packed.text.shape == (3, 9, 8) and packed.text_mask.sum(1).tolist() == [5, 9, 2]
    assert torch.equal(packed.text[0, :5], samples[0].text) and torch.all(packed.text[2, 2:] == 0)
    assert [m["seed"] for m in packed.metadata] == [0, 1, 2]


def test_pack_with_text_index():
    samples = [make_sample((1, 2, 2), i) for i in range(3)]
    for i, s in enumerate(samples):
        s.text_index = 10 + i
    packed = pack(samples)
    assert packed.text is None and packed.text_index.tolist() == [10, 11, 12]


def test_sample_rejects_a_grid_that_does_not_match_its_tokens():
    with pytest.raises(AssertionError, match="grid"):
        Sample(torch.zeros(10, 4), position_ids((1, 2, 5)), (1, 3, 5))


def test_token_budget_batcher_never_exceeds_and_keeps_every_sample_once():
    rng = random.Random(0)
    grids = bucket_grids(("64p", "96p"))
    samples = [Sample(torch.zeros(g[0] * g[1] * g[2], 1), position_ids(g), g, metadata={"i": i})
               for i, g in enumerate(rng.choices(grids, k=300))]
    budget = max(s.num_tokens for s in samples) + 37
    batches = list(batch_by_token_budget(iter(samples), budget))
    assert all(sum(s.num_tokens for s in b) <= budget for b in batches)
    assert [s.metadata["i"] for b in batches for s in b] == list(range(300))  # each once, in order
    # greedy: a batch was closed only because the next sample did not fit
    for b, nxt in zip(batches, batches[1:]):
        assert sum(s.num_tokens for s in b) + nxt[0].num_tokens > budget
    capped = list(batch_by_token_budget(samples, budget, max_samples=2))
    assert max(len(b) for b in capped) == 2 and sum(len(b) for b in capped) == 300


def test_token_budget_batcher_oversize_sample():
    small, big = make_sample((1, 2, 2)), make_sample((4, 4, 4))  # 4 and 64 tokens
    with pytest.raises(ValueError, match="exceeds the token budget"):
        list(batch_by_token_budget([small, big], 16))
    batches = list(batch_by_token_budget([small, big, small], 16, oversize="alone"))
    assert [[s.num_tokens for s in b] for b in batches] == [[4], [64], [4]]


def test_pad_batch_layout():
    samples = [make_sample(g, i, text_len=3) for i, g in enumerate([(2, 2, 3), (1, 2, 2)])]
    padded = pad_batch(samples, pad_to_multiple=8)
    assert padded.tokens.shape == (2, 16, 4) and padded.token_mask.sum(1).tolist() == [12, 4]
    assert torch.equal(padded.tokens[1, :4], samples[1].tokens) and torch.all(padded.tokens[1, 4:] == 0)
    assert torch.equal(padded.positions[0, :12], samples[0].positions)
    assert padded.padding_fraction == pytest.approx(1 - 16 / 32)
    assert padding_fraction([samples]) == pytest.approx(1 - 16 / 24)  # pad to longest, no multiple


def test_packing_wastes_far_less_than_padding_on_mixed_aspects():
    """A shuffled mixed-aspect, mixed-length set: pad-to-longest in batches of 8 versus
    packs with the same average token count per step."""
    rng = random.Random(0)
    grids = rng.choices(bucket_grids(("64p", "96p", "144p"), frames=(1, 9, 17, 33)), k=400)
    samples = [Sample(torch.zeros(g[0] * g[1] * g[2], 1), position_ids(g), g) for g in grids]
    pad_frac = padding_fraction(batch_by_count(samples, 8))
    budget = 8 * max(s.num_tokens for s in samples) // 2
    pack_frac = padding_fraction(batch_by_token_budget(samples, budget), max_tokens=budget)
    print(f"padding fraction: pad-to-longest {pad_frac:.1%}, token-budget packing {pack_frac:.1%}")
    assert pad_frac > 0.4 and pack_frac < 0.1 and pack_frac < pad_frac / 4
