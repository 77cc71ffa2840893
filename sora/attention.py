"""Block-diagonal attention over packed tokens: the DiT's attention backends.

A pack holds the tokens of several videos one after another (NaViT, Dehghani et al. 2023);
a token may attend only to keys of its own video. ``build_attention_mask`` describes that once
per forward (shared by every block) in the form a backend needs, and ``attention`` runs it:

- "sdpa": a dense (Nq, Nk) bool mask for ``F.scaled_dot_product_attention``. Simple, but every
  query is scored against the whole pack, so a pack of 20 videos does ~20x the work it needs.
- "segments": one SDPA call per video on its own keys (:class:`SegmentMask`). On the CPU every
  video's flash kernels run inside ONE autograd node (:class:`_SegmentFlashAttention`);
  "segments_unfused" is the plain way (autograd through each video's slices), kept as a
  baseline. Queries of a video must be contiguous, as packing makes them.
- "varlen": PyTorch's variable-length flash attention (``torch.nn.attention.varlen``) over
  cumulative sequence offsets, on CUDA in half precision; the keys of consecutive videos must
  be consecutive slices. Elsewhere it runs as "segments".
- "flex": a ``BlockMask`` for ``flex_attention``, which skips the empty off-diagonal blocks.
- "auto": flex on CUDA, segments elsewhere.

Where a layout cannot be described by a backend (a video's queries interleaved with another's;
keys not in video order for varlen) the mask falls back to one that can (dense; segments).
Shapes: q (heads, Nq, hd), k and v (heads, Nk, hd); query and key ids (Nq,), (Nk,) int, with a
negative key id for padding, which no query sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "segments", "segments_unfused", "varlen", "flex")


@dataclass
class SegmentMask:
    """Block-diagonal attention as per-video slices.

    q_slices: (start, end) of each video's queries, in order, covering every query once;
    k_index: that video's keys, a ``slice`` when they are contiguous, else an index tensor.
    """

    q_slices: list[tuple[int, int]]
    k_index: list
    # one autograd node over all videos (`_SegmentFlashAttention`) where possible; False: plain
    # autograd through each video's slices (the "segments_unfused" backend, a baseline)
    fused: bool = True


@dataclass
class VarlenMask(SegmentMask):
    """A :class:`SegmentMask` whose videos' keys are consecutive slices, with the cumulative
    offsets the variable-length flash kernel takes: cu_q, cu_k (S + 1,) int32 on the device."""

    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0


def _segments(q_ids: torch.Tensor, kv_ids: torch.Tensor) -> SegmentMask | None:
    """The SegmentMask of a same-video mask, or None when queries of one video are not
    contiguous (then only a dense mask describes it)."""
    ids, counts = torch.unique_consecutive(q_ids, return_counts=True)  # (S,), (S,)
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        return None  # a video's queries come back after another's
    q_slices, k_index, start = [], [], 0
    for vid, n in zip(ids.tolist(), counts.tolist()):
        keys = torch.nonzero(kv_ids == vid).flatten()  # (K,) ascending; padding (-1) never matches
        if keys.numel() and int(keys[-1] - keys[0]) + 1 == keys.numel():
            keys = slice(int(keys[0]), int(keys[-1]) + 1)
        q_slices.append((start, start + n))
        k_index.append(keys)
        start += n
    return SegmentMask(q_slices, k_index)


def _varlen(seg: SegmentMask, device: torch.device) -> VarlenMask | None:
    """``seg`` with cumulative offsets, or None unless video i's keys are one slice that starts
    where video i - 1's end (the kernel reads keys [cu_k[i], cu_k[i + 1]) for video i)."""
    keys = seg.k_index
    if not all(isinstance(k, slice) for k in keys) or keys[0].start != 0:
        return None
    if any(a.stop != b.start for a, b in zip(keys, keys[1:])):
        return None
    cu_q = [0] + [end for _, end in seg.q_slices]
    cu_k = [0] + [k.stop for k in keys]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return VarlenMask(seg.q_slices, keys, True, as_tensor(cu_q), as_tensor(cu_k),
                      max(e - s for s, e in seg.q_slices), max(k.stop - k.start for k in keys))


def build_attention_mask(q_ids: torch.Tensor, kv_ids: torch.Tensor, backend: str = "auto"):
    """Mask letting query i see key j iff ``q_ids[i] == kv_ids[j]`` (same video).

    q_ids: (Nq,) int, kv_ids: (Nk,) int; keys with a negative id (padding) are seen by nobody.
    Returns what :func:`attention` takes for ``backend`` (see the module docstring): a dense
    (Nq, Nk) bool tensor, a :class:`SegmentMask`, a :class:`VarlenMask` or a ``BlockMask``.
    """
    if backend == "auto":
        backend = "flex" if q_ids.is_cuda else "segments"
    if backend in ("segments", "segments_unfused", "varlen"):
        seg = _segments(q_ids, kv_ids)
        if seg is not None:
            seg.fused = backend != "segments_unfused"
            if backend == "varlen":
                return _varlen(seg, q_ids.device) or seg
            return seg
        backend = "sdpa"
    if backend == "sdpa":
        return (q_ids[:, None] == kv_ids[None, :]) & (kv_ids >= 0)[None, :]  # (Nq, Nk)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_video(b, h, q_idx, kv_idx):
            return (q_ids[q_idx] == kv_ids[kv_idx]) & (kv_ids[kv_idx] >= 0)

        # _compile avoids materialising the dense (Nq, Nk) mask while building the block mask
        return create_block_mask(
            same_video, None, None, q_ids.numel(), kv_ids.numel(), device=q_ids.device, _compile=q_ids.is_cuda
        )
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


_compiled_flex = None


def _flex_attention(compiled: bool):
    """flex_attention, compiled once per process on CUDA. Footgun: eager flex materialises
    the full score matrix (slow, warns); it is used on CPU only so tests can check the mask
    logic, because compiled CPU flex fails in inductor's C++ template (torch 2.13)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def _flash_cpu_ops():
    """PyTorch's CPU flash-attention forward/backward ops, or None where this build lacks them."""
    aten = torch.ops.aten
    try:
        return aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
    except (AttributeError, RuntimeError):
        return None


class _SegmentFlashAttention(torch.autograd.Function):
    """Per-video attention as ONE autograd node: each video's forward and backward call the CPU
    flash kernels directly and write into whole-pack buffers. Through plain autograd every
    video's slice of q, k, v would be its own node, whose backward allocates and zero-fills a
    gradient of the WHOLE pack's size, once per video: with many videos a pack, that memory
    traffic costs more than the attention itself. Same kernels, so the same numbers bit for bit.
    Keys of each video must be one contiguous slice."""

    @staticmethod
    def forward(ctx, q, k, v, q_slices, k_slices):
        fwd, _ = _flash_cpu_ops()
        out = q.new_empty(q.shape)  # (heads, Nq, hd)
        lses = []
        for (qs, qe), ks in zip(q_slices, k_slices):
            o, lse = fwd(q[None, :, qs:qe], k[None, :, ks], v[None, :, ks])[:2]  # (1, heads, n, hd), (1, heads, n)
            out[:, qs:qe] = o[0]
            lses.append(lse)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.slices = (q_slices, k_slices)
        return out

    @staticmethod
    def backward(ctx, grad):
        _, bwd = _flash_cpu_ops()
        q, k, v, out, *lses = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)  # keys no query sees: 0
        for ((qs, qe), ks), lse in zip(zip(*ctx.slices), lses):
            gq, gk, gv = bwd(grad[None, :, qs:qe], q[None, :, qs:qe], k[None, :, ks], v[None, :, ks],
                             out[None, :, qs:qe], lse, 0.0, False)
            dq[:, qs:qe] = gq[0]
            dk[:, ks] += gk[0]  # += : two query groups may share keys
            dv[:, ks] += gv[0]
        return dq, dk, dv, None, None


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SegmentMask) -> torch.Tensor:
    """One attention call per video: through `_SegmentFlashAttention` on the CPU when each
    video's keys are one slice, else plain SDPA per video (autograd through the slices)."""
    if (mask.fused and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.dtype == k.dtype == v.dtype
            and all(isinstance(keys, slice) for keys in mask.k_index) and _flash_cpu_ops() is not None):
        return _SegmentFlashAttention.apply(q, k, v, mask.q_slices, mask.k_index)
    outs = [
        F.scaled_dot_product_attention(q[None, :, qs:qe], k[None, :, keys], v[None, :, keys])[0]  # (heads, n, hd)
        for (qs, qe), keys in zip(mask.q_slices, mask.k_index)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (heads, Nq, hd)


def _varlen_dtype(q: torch.Tensor) -> torch.dtype | None:
    """The half dtype the flash kernel would run in for q, or None where it cannot run: under
    autocast the autocast dtype (as SDPA gets it; float32 norms may hand us float32 q and k),
    else q's own dtype when it is float16 / bfloat16."""
    if not q.is_cuda:
        return None
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    else:
        dtype = q.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: VarlenMask,
                      dtype: torch.dtype) -> torch.Tensor:
    """The variable-length flash kernel over the pack: (heads, N, hd) in and out, computed in
    ``dtype``. Keys past cu_k[-1] (trailing padding) are not passed to it."""
    from torch.nn.attention.varlen import varlen_attn

    nk = int(mask.k_index[-1].stop)
    q, k, v = (t.to(dtype).transpose(0, 1) for t in (q, k[:, :nk], v[:, :nk]))  # (N, heads, hd)
    out = varlen_attn(q, k, v, mask.cu_q, mask.cu_k, mask.max_q, mask.max_k)  # (Nq, heads, hd)
    return out.transpose(0, 1)  # (heads, Nq, hd)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Masked multi-head attention over packed tokens.

    q: (heads, Nq, hd), k, v: (heads, Nk, hd), mask from :func:`build_attention_mask`
    -> (heads, Nq, hd). Every query must see at least one key (else SDPA returns NaN);
    the model guarantees it (a token always sees itself / the null text key).
    """
    if isinstance(mask, VarlenMask) and (dtype := _varlen_dtype(q)) is not None:
        return _varlen_attention(q, k, v, mask, dtype)
    if isinstance(mask, SegmentMask):
        return _segment_attention(q, k, v, mask)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]  # (heads, Nq, hd)
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        # autocast casts SDPA's inputs but not flex's: float32 norms would hand it mixed dtypes
        q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
    return _flex_attention(q.is_cuda)(q[None], k[None], v[None], block_mask=mask)[0]  # (heads, Nq, hd)
