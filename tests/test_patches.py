"""Spacetime patches: exact round trips, token order and position ids."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sora.patches import (
    grid_for,
    patchify,
    patchify_batch,
    position_ids,
    token_dim,
    unpatchify,
    unpatchify_batch,
)

# Random latent shapes built from (channels, grid, patch size), so divisibility always holds.
shapes = st.tuples(
    st.integers(1, 8),  # C
    st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),  # grid (t, h, w)
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),  # patch (pt, ph, pw)
)


def _latent(C, grid, patch, seed=0):
    T, H, W = (g * p for g, p in zip(grid, patch))
    return torch.randn(C, T, H, W, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_patchify_unpatchify_exact_round_trip(shape):
    C, grid, patch = shape
    z = _latent(C, grid, patch)
    tokens = patchify(z, patch)
    assert tokens.shape == (grid[0] * grid[1] * grid[2], token_dim(C, patch))
    assert grid_for(tuple(z.shape), patch) == grid
    assert torch.equal(unpatchify(tokens, grid, patch, channels=C), z)
    assert torch.equal(unpatchify(tokens, grid, patch), z)  # channels inferred from the width


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_token_i_holds_the_patch_at_its_position_id(shape):
    C, grid, patch = shape
    pt, ph, pw = patch
    z = _latent(C, grid, patch, seed=1)
    tokens, pos = patchify(z, patch), position_ids(grid)
    assert pos.dtype == torch.int64 and pos.shape == (tokens.shape[0], 3)
    for i, (t, h, w) in enumerate(pos.tolist()):
        box = z[:, t * pt : (t + 1) * pt, h * ph : (h + 1) * ph, w * pw : (w + 1) * pw]  # (C, pt, ph, pw)
        assert torch.equal(tokens[i], box.reshape(-1)), f"token {i} is not the patch at {(t, h, w)}"


def test_token_order_is_t_major_then_h_then_w():
    pos = position_ids((2, 2, 3))
    expected = [(t, h, w) for t in range(2) for h in range(2) for w in range(3)]
    assert [tuple(p) for p in pos.tolist()] == expected


def test_every_bucket_shape_round_trips():
    """Latents of every shapes-world bucket (all aspect ratios, small classes) patchify exactly."""
    from sora.buckets import assign_bucket

    aspects = [(16, 9), (9, 16), (1, 1), (4, 3), (3, 4), (239, 100)]
    seen = set()
    for res in ("64p", "96p", "144p"):
        for aw, ah in aspects:
            for frames in (1, 9, 17, 33):
                b = assign_bucket(aw * 100, ah * 100, frames, resolution=res)
                # VAE: x4 in time (causal, 4k+1 frames), x8 in space; 16 latent channels.
                latent = (16, 1 + (b.num_frames - 1) // 4, b.height // 8, b.width // 8)
                if latent in seen:
                    continue
                seen.add(latent)
                z = torch.randn(latent)
                grid = grid_for(latent)  # default patch (1, 2, 2)
                assert torch.equal(unpatchify(patchify(z), grid, channels=16), z), f"bucket {b.key}"
    assert len(seen) >= 18


def test_batched_variants_match_per_item():
    z = torch.randn(3, 4, 5, 6, 8)  # (B, C, T, H, W)
    patch = (1, 2, 2)
    tokens = patchify_batch(z, patch)  # (B, N, D_in)
    for b in range(3):
        assert torch.equal(tokens[b], patchify(z[b], patch))
    assert torch.equal(unpatchify_batch(tokens, grid_for(z.shape[1:], patch), patch), z)


def test_divisibility_is_asserted_with_a_clear_message():
    with pytest.raises(AssertionError, match="latent height H=5 not divisible by patch height 2"):
        patchify(torch.zeros(4, 2, 5, 6))
    with pytest.raises(AssertionError, match="do not fill grid"):
        unpatchify(torch.zeros(10, 16), (1, 2, 2))
