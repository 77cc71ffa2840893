"""Spatial tiling: apply a function to overlapping tiles of a video and blend the outputs.

The VAE encodes and decodes large frames tile by tile to bound memory (diffusers' VAEs do the
same). Overlaps are blended with linear ramps, so the seams are smooth; the result is exact for
a function that is local in space, approximate for one that sees context (a tile sees less of
it at its border).
"""

from __future__ import annotations

import torch



def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size); the last one is flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool, device) -> torch.Tensor:
    """1D blend weights: 1 inside, linear ramps over `overlap` on sides that meet a neighbour."""
    w = torch.ones(length, device=device)
    if overlap > 0:
        r = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
        if ramp_start:
            w[:overlap] = torch.minimum(w[:overlap], r)
        if ramp_end:
            w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0))
    return w


def tiled_apply(x: torch.Tensor, fn, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply `fn` to overlapping spatial tiles of x and blend the outputs.

    Args:
        x: (B, C, T, H, W) input.
        fn: maps a (B, C, T, th, tw) tile to (B, C', T', th*scale, tw*scale).
        tile, overlap: tile size and overlap in input pixels.
        scale: output/input spatial ratio (1/8 for an encoder, 8 for a decoder).
    Returns:
        (B, C', T', H*scale, W*scale): the normalised weighted sum of tile outputs,
        with weights ramping linearly across each overlap.
    """
    H, W = x.shape[-2:]
    th, tw = min(tile, H), min(tile, W)
    out = weight = None
    o_over = int(round(overlap * scale))
    for y0 in _tile_starts(H, th, overlap):
        for x0 in _tile_starts(W, tw, overlap):
            y = fn(x[..., y0 : y0 + th, x0 : x0 + tw])  # (B, C', T', th*s, tw*s)
            oy, ox, oh, ow = int(y0 * scale), int(x0 * scale), y.shape[-2], y.shape[-1]
            if out is None:
                out = y.new_zeros(*y.shape[:3], int(H * scale), int(W * scale))
                weight = y.new_zeros(int(H * scale), int(W * scale))
            wy = _ramp(oh, o_over, y0 > 0, y0 + th < H, y.device)
            wx = _ramp(ow, o_over, x0 > 0, x0 + tw < W, y.device)
            w2 = (wy[:, None] * wx[None, :]).to(y.dtype)  # (th*s, tw*s)
            out[..., oy : oy + oh, ox : ox + ow] += y * w2
            weight[oy : oy + oh, ox : ox + ow] += w2
    return out / weight
