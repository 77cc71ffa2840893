"""Spacetime patches: latent video <-> a flat sequence of tokens.

Sora turns a compressed video into "spacetime patches": the latent
(C, T, H, W) is cut into non-overlapping (pt, ph, pw) boxes and each box is
flattened into one token of width C * pt * ph * pw. The transformer sees only
the tokens plus each token's (t, h, w) grid position, so videos of any
duration, resolution and aspect ratio become sequences of different lengths.

Order conventions (used by every consumer, keep them fixed):
  * tokens are in t-major, then h, then w order (row-major over the grid);
  * inside a token the features are ordered (C, pt, ph, pw), channel slowest.

Everything here is a small pure function; the grid is always an argument.
"""

from __future__ import annotations

import torch

DEFAULT_PATCH_SIZE: tuple[int, int, int] = (1, 2, 2)


def grid_for(latent_shape: tuple[int, ...], patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE) -> tuple[int, int, int]:
    """Token grid (t, h, w) of a latent of shape (C, T, H, W) or (T, H, W).

    Asserts that T, H and W are divisible by the patch size, because a partial
    patch would silently drop the last latent rows/frames.
    """
    assert len(latent_shape) in (3, 4), f"latent_shape must be (C, T, H, W) or (T, H, W), got {tuple(latent_shape)}"
    T, H, W = (int(s) for s in latent_shape[-3:])
    pt, ph, pw = _check_patch(patch_size)
    assert T % pt == 0, f"latent frames T={T} not divisible by temporal patch size {pt}"
    assert H % ph == 0, f"latent height H={H} not divisible by patch height {ph}"
    assert W % pw == 0, f"latent width W={W} not divisible by patch width {pw}"
    return (T // pt, H // ph, W // pw)


def token_dim(channels: int, patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE) -> int:
    """Width D_in of one token: C * pt * ph * pw."""
    pt, ph, pw = _check_patch(patch_size)
    return channels * pt * ph * pw


def patchify(z: torch.Tensor, patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE) -> torch.Tensor:
    """Cut a latent video into tokens.

    Args:
        z: (C, T, H, W) latent.
        patch_size: (pt, ph, pw).
    Returns:
        (N, C * pt * ph * pw) tokens, N = (T/pt) * (H/ph) * (W/pw), in t-major,
        then h, then w order.
    """
    assert z.dim() == 4, f"patchify expects (C, T, H, W), got shape {tuple(z.shape)}"
    C = z.shape[0]
    t, h, w = grid_for(tuple(z.shape), patch_size)
    pt, ph, pw = patch_size
    x = z.reshape(C, t, pt, h, ph, w, pw)  # (C, t, pt, h, ph, w, pw)
    x = x.permute(1, 3, 5, 0, 2, 4, 6)  # (t, h, w, C, pt, ph, pw)
    return x.reshape(t * h * w, C * pt * ph * pw)  # (N, D_in)


def unpatchify(
    tokens: torch.Tensor,
    grid: tuple[int, int, int],
    patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE,
    channels: int | None = None,
) -> torch.Tensor:
    """Inverse of `patchify`.

    Args:
        tokens: (N, C * pt * ph * pw) with N = t * h * w.
        grid: (t, h, w) token grid.
        patch_size: (pt, ph, pw).
        channels: C; inferred from the token width when None.
    Returns:
        (C, t * pt, h * ph, w * pw) latent.
    """
    assert tokens.dim() == 2, f"unpatchify expects (N, D_in), got shape {tuple(tokens.shape)}"
    t, h, w = (int(g) for g in grid)
    pt, ph, pw = _check_patch(patch_size)
    N, D = tokens.shape
    assert N == t * h * w, f"{N} tokens do not fill grid {(t, h, w)} ({t * h * w} tokens)"
    assert D % (pt * ph * pw) == 0, f"token width {D} not divisible by patch volume {pt * ph * pw}"
    C = D // (pt * ph * pw) if channels is None else channels
    assert C * pt * ph * pw == D, f"token width {D} != channels {C} * patch volume {pt * ph * pw}"
    x = tokens.reshape(t, h, w, C, pt, ph, pw)
    x = x.permute(3, 0, 4, 1, 5, 2, 6)  # (C, t, pt, h, ph, w, pw)
    return x.reshape(C, t * pt, h * ph, w * pw)  # (C, T, H, W)


def patchify_batch(z: torch.Tensor, patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE) -> torch.Tensor:
    """Batched `patchify` for same-shape latents: (B, C, T, H, W) -> (B, N, D_in)."""
    assert z.dim() == 5, f"patchify_batch expects (B, C, T, H, W), got shape {tuple(z.shape)}"
    B, C = z.shape[:2]
    t, h, w = grid_for(tuple(z.shape[1:]), patch_size)
    pt, ph, pw = patch_size
    x = z.reshape(B, C, t, pt, h, ph, w, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, t, h, w, C, pt, ph, pw)
    return x.reshape(B, t * h * w, C * pt * ph * pw)  # (B, N, D_in)


def unpatchify_batch(
    tokens: torch.Tensor,
    grid: tuple[int, int, int],
    patch_size: tuple[int, int, int] = DEFAULT_PATCH_SIZE,
    channels: int | None = None,
) -> torch.Tensor:
    """Batched `unpatchify`: (B, N, D_in) -> (B, C, T, H, W)."""
    assert tokens.dim() == 3, f"unpatchify_batch expects (B, N, D_in), got shape {tuple(tokens.shape)}"
    return torch.stack([unpatchify(tok, grid, patch_size, channels) for tok in tokens])


def position_ids(grid: tuple[int, int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """(t, h, w) grid index of every token, in the same order as `patchify`.

    Args:
        grid: (t, h, w) token grid.
    Returns:
        (N, 3) int64; row i is the (t, h, w) position of token i.
    """
    t, h, w = (int(g) for g in grid)
    assert min(t, h, w) >= 1, f"grid must be positive, got {(t, h, w)}"
    tt, hh, ww = torch.meshgrid(
        torch.arange(t, device=device),
        torch.arange(h, device=device),
        torch.arange(w, device=device),
        indexing="ij",  # "ij" keeps t slowest, w fastest: the patchify order
    )
    return torch.stack([tt, hh, ww], dim=-1).reshape(t * h * w, 3)  # (N, 3)


def _check_patch(patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    assert len(patch_size) == 3, f"patch_size must be (pt, ph, pw), got {patch_size}"
    pt, ph, pw = (int(p) for p in patch_size)
    assert min(pt, ph, pw) >= 1, f"patch sizes must be >= 1, got {patch_size}"
    return pt, ph, pw
