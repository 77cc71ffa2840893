"""The diffusion transformer (DiT) over packed spacetime patch tokens.

Reads top to bottom like facebookresearch/DiT ``models.py``: helpers, attention, embedders,
the block, the final layer, the model, then the size presets. What differs from image DiT:

- **Packed sequences (NaViT, Dehghani et al. 2023).** The input is a flat list of tokens
  from several videos of any size and duration; ``seq_ids`` says which video each token
  belongs to, and attention is block-diagonal over videos. No padding, no learned position
  table.
- **3D rotary position embedding** (RoPE, Su et al. 2021, split over t/h/w as in video DiTs
  such as HunyuanVideo/Wan): q and k of every head are rotated by angles from the token's
  integer (t, h, w) grid position, so attention depends only on *relative* positions and any
  size or duration works. Presets also add a **fractional absolute position** embedding
  (NaViT's factorised fractional embeddings: where the token sits as a fraction of its own
  video's extent per axis), without which the model could not tell left from right of the
  frame, nor early from late, and never learnt motion direction (see ``DiTConfig.abs_pos``).
- **Per-token timesteps with adaLN-Zero.** Each token carries its own t: clean conditioning
  frames have t = 0 inside a noisy video (image-to-video, extension, interpolation all use
  this). The timestep embedding drives a per-token shift/scale/gate (Peebles & Xie 2023);
  the modulation and the final layer start at zero, so the untrained model outputs exactly 0.
- **Optional aspect-ratio micro-condition** (PixArt-alpha; ``DiTConfig.aspect_cond``, off in
  the presets): log(W / H) of each video's token grid embedded and added to its timestep
  embedding, so a model need not infer the frame's proportions from positions.
- **Text by cross-attention** (PixArt-alpha, Chen et al. 2023): each video attends to its own
  text tokens only, plus one learned "null" key every video always sees. The null key makes
  an empty prompt (all-False text mask: classifier-free-guidance dropout) well defined.
- **QK-norm** (RMSNorm on q and k, Dehghani et al. 2023 "ViT-22B"): keeps attention logits
  bounded, which matters for stable bf16 training at scale.

The model knows nothing about parallelism (torchtitan style): blocks live in an
``nn.ModuleList`` named ``blocks`` so FSDP / activation checkpointing can wrap them one by one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sora.text_encoder import pooled

# ----------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    """Size and behaviour of a :class:`DiT`. Production defaults are the ``base`` preset."""

    in_channels: int = 16  # latent channels C of the VAE
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) latent cells per token
    hidden_size: int = 768  # D
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    text_dim: int = 384  # width of the text encoder's hidden states (384 for MiniLM-L6)
    qk_norm: bool = True
    rope_theta: float = 10000.0
    # Head dim given to the (t, h, w) rotary axes; must sum to head_dim, each even.
    # None: a quarter (rounded to even) to time, the rest split between h and w.
    rope_dims: tuple[int, int, int] | None = None
    # Timesteps t in [0, 1] are multiplied by this before the sinusoidal embedding, so the
    # frequencies see the same range as DiT's integer steps 0..999.
    timestep_scale: float = 1000.0
    frequency_embedding_size: int = 256
    # What the last layer's output F means. "velocity": F is v itself (SD3, Open-Sora).
    # "edm": EDM-style preconditioning (Karras et al. 2022, Sec. 5) carried over to the straight
    # path: x0_hat = c_skip(t) x_t + c_out(t) F with c_skip, c_out chosen so F's target has unit
    # variance at every t for unit-variance data; the model still returns the velocity
    # v = (x_t - x0_hat) / t = ((2t - 1) x_t - sqrt(n) F) / n, n = (1 - t)^2 + t^2 (finite at
    # t = 0). Near pure noise a plain velocity net must copy its noisy input almost exactly
    # (v = eps - x0, eps ~ x_t), and a small net trained briefly cannot: its x0 estimate at
    # t = 0.9 was noise-like, and sampling from pure noise scattered blobs over every frame.
    # With "edm" the copy is analytic and F is a smooth x0 estimate there. Measured on the
    # shapes world (64 clips, 800 steps, each clip's own caption regenerated and scored):
    # no better than "velocity" (colour 0.79 vs 0.90, shape 0.31 both, motion 0.15 vs 0.21),
    # so the presets keep "velocity"; the option stays for larger models and longer runs.
    parameterization: str = "velocity"
    # Also condition the adaLN modulation on the masked mean of the text states (the pooled
    # prompt, as SD3 / Open-Sora add a pooled text vector to the timestep embedding), besides
    # cross-attention. A global, per-video path: the prompt's attributes reach every token's
    # shift/scale/gate directly instead of only through learnt query-key matches. An empty
    # prompt (CFG's unconditional branch) gets a learnt null vector. "none" (off), "mean" or
    # "attention" (see PooledTextEmbedder). Off in configs saved before it existed, so old
    # checkpoints load unchanged.
    pooled_text: str = "none"
    # Absolute position besides RoPE: "fractional" adds an embedding of each token's place as a
    # fraction of its own video's extent along t, h and w (NaViT's factorised fractional
    # embeddings), so any size and duration still works. RoPE alone is relative, and with axis-
    # split RoPE a head's positional logit is a sum of a Δt term and a Δw term, so no single head
    # can prefer "one frame back and v cells left"; nor can a relative-only model put a prompt's
    # "from left to right" mean path (left early, right late) into its high-noise x0 estimate.
    # "none" (off) in configs saved before it existed.
    abs_pos: str = "none"
    # Transformer layers over each prompt's projected text states before the DiT uses them
    # (a "token refiner", as HunyuanVideo puts over its text encoder): self-attention among the
    # prompt's own words with 1D RoPE over their order. A frozen sentence encoder like MiniLM
    # embeds "from left to right" and "from right to left" almost alike (same words; pooled
    # cosine 0.996 for "leftward" / "rightward"), and those phrasings scored worst in eval; the
    # refiner can learn which word order means which direction. With pooled_text, the pooled
    # vector is taken from the refined states. 0 (off) in configs saved before it existed.
    # Off in the presets: inconclusive on the shapes world (dit_recipes, 800 steps: 2 layers
    # colour 1.00 / shape 0.60 / size 0.88 / motion 0.48 vs 0.98 / 0.52 / 0.90 / 0.60 without;
    # a 20-minute retrain of the demo's DiT with a job beside it, 3,840 steps: held-out motion
    # 0.58, "from X to Y" prompts 13/28 right vs 8/28 for 5,927 steps without).
    text_refiner_layers: int = 0
    # Condition the adaLN modulation on each video's aspect ratio, log(W / H) of its token grid
    # (PixArt-alpha's aspect-ratio micro-condition), added per video like the pooled prompt.
    # Why one would: with fractional positions a model may draw shapes in fractions of the frame
    # (stretched with it), and a stretched square reads as a circle; the shapes world sizes
    # objects by the short side, so in fractional units every extent depends on the aspect
    # ratio only - and the ratio, unlike the grid size, is the same for a draft and its
    # refinement at twice the size. Measured (docs/experiments.md, DiT recipe): the demo DiTs
    # stretch little (log object w/h against log frame w/h: slope ~0.14), and the demo recipe
    # retrained with it on three demos' data read held-out shape 0.82 / 0.78, 0.71 / 0.65 and
    # 0.68 / 0.66 against 0.75 / 0.74, 0.69 / 0.71 and 0.69 / 0.73 without: no gain shown, so
    # the presets leave it off. False in configs saved before it existed.
    aspect_cond: bool = False

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        assert isinstance(self.aspect_cond, bool), f"aspect_cond must be true or false, got {self.aspect_cond!r}"
        assert self.text_refiner_layers >= 0, f"text_refiner_layers must be >= 0, got {self.text_refiner_layers}"
        assert self.abs_pos in ("none", "fractional"), (
            f"abs_pos must be 'none' or 'fractional', got {self.abs_pos!r}"
        )
        assert self.pooled_text in ("none", "mean", "attention"), (
            f"pooled_text must be 'none', 'mean' or 'attention', got {self.pooled_text!r}"
        )
        assert self.parameterization in ("velocity", "edm"), (
            f"parameterization must be 'velocity' or 'edm', got {self.parameterization!r}"
        )
        if self.rope_dims is not None:
            self.rope_dims = tuple(self.rope_dims)
        assert self.hidden_size % self.num_heads == 0, (
            f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
        )
        dims = self.axes_dims
        assert sum(dims) == self.head_dim and all(d % 2 == 0 for d in dims), (
            f"rope_dims {dims} must be even and sum to head_dim {self.head_dim}"
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def in_dim(self) -> int:
        """Width of one input token: C * pt * ph * pw."""
        pt, ph, pw = self.patch_size
        return self.in_channels * pt * ph * pw

    @property
    def axes_dims(self) -> tuple[int, int, int]:
        """Head dims of the rotary (t, h, w) axes."""
        if self.rope_dims is not None:
            return self.rope_dims
        d = self.head_dim
        dt = 2 * max(1, round(d / 8))  # ~d/4, even
        dh = 2 * ((d - dt) // 4)
        return (dt, dh, d - dt - dh)

    @staticmethod
    def preset(name: str, **overrides) -> "DiTConfig":
        """A named size (see ``PRESETS``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; known: {list(PRESETS)}")
        return replace(PRESETS[name], **overrides)


# Parameter counts with in_channels=16, text_dim=384 (checked by tests/test_dit.py).
# Each block holds ~22 D^2 weights: self-attn 4, cross-attn 4, MLP 8, adaLN 6.
PRESETS: dict[str, DiTConfig] = {
    # ~1.6M params. Sized for the shapes world on a 2-core CPU: one fwd+bwd of a
    # ~1k-token pack costs ~0.1 s, so 20 min trains on a few million tokens.
    "tiny": DiTConfig(hidden_size=128, depth=4, num_heads=4, pooled_text="mean", abs_pos="fractional"),
    "small": DiTConfig(hidden_size=384, depth=12, num_heads=6, abs_pos="fractional"),  # ~39M
    "base": DiTConfig(hidden_size=768, depth=12, num_heads=12, abs_pos="fractional"),  # ~156M
    "large": DiTConfig(hidden_size=1024, depth=24, num_heads=16, abs_pos="fractional"),  # ~554M
    "xl": DiTConfig(hidden_size=1536, depth=24, num_heads=24, abs_pos="fractional"),  # ~1.25B
}


def flops_per_token(config: DiTConfig, seq_len: int, text_len: int = 0, training: bool = True) -> float:
    """Matmul FLOPs per video token, for MFU reporting.

    ``seq_len`` is the length of the token's *own video* (attention is block-diagonal, so
    a pack's cost depends on its videos' lengths, not on the pack length); ``text_len`` is
    the number of text keys. Counts 2 FLOPs per multiply-add; training = 3x forward
    (backward is ~2x forward), as in the PaLM / Chinchilla accounting. Not counted: the
    adaLN modulation (computed once per distinct timestep, not per token), the text
    projections (per text token), norms and elementwise ops.
    """
    D, L = config.hidden_size, config.depth
    linear = 2 * (L * 14 * D * D + 2 * D * config.in_dim)  # qkv+o 4, cross q+o 2, mlp 8 (D^2 each)
    attn = 2 * L * 2 * D * (seq_len + text_len + 1)  # QK^T and AV against own video + text + null
    return float((3 if training else 1) * (linear + attn))


# ----------------------------------------------------------------------------------------
# Helpers: output parameterization, modulation, rotary embedding, attention
# ----------------------------------------------------------------------------------------


def edm_velocity(x_t: torch.Tensor, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Velocity from the network output F under the "edm" parameterization (see DiTConfig).

    x_t, f: (N, D_in); t: (N,) in [0, 1]. x0_hat = c_skip x_t + c_out F with
    c_skip = (1 - t) / n, c_out = t / sqrt(n), n = (1 - t)^2 + t^2, and v = (x_t - x0_hat) / t
    simplifies to ((2t - 1) x_t - sqrt(n) F) / n: no division by t."""
    t = t.to(f.dtype)[:, None]  # (N, 1)
    n = (1 - t) ** 2 + t**2  # (N, 1) in [0.5, 1]
    return ((2 * t - 1) * x_t.to(f.dtype) - n.sqrt() * f) / n


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation. x, shift, scale: (N, D) -> (N, D)."""
    return x * (1 + scale) + shift


def rope_angles(positions: torch.Tensor, axes_dims: tuple[int, int, int], theta: float) -> torch.Tensor:
    """Rotary angles for integer (t, h, w) positions.

    positions: (N, 3) int -> angles (N, head_dim / 2) float32. Axis a with d_a dims gets
    d_a / 2 frequencies theta^(-2i / d_a), i = 0 .. d_a/2 - 1 (Su et al. 2021, per axis).
    Computed in float32: bf16 angles would lose the position at a few hundred tokens.
    """
    assert positions.dim() == 2 and positions.shape[1] == 3, f"positions must be (N, 3), got {tuple(positions.shape)}"
    parts = []
    for axis, d in enumerate(axes_dims):
        inv_freq = theta ** (-torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d)  # (d/2,)
        parts.append(positions[:, axis, None].float() * inv_freq)  # (N, d/2)
    return torch.cat(parts, dim=-1)  # (N, head_dim/2)


def rope_rotation(angles: torch.Tensor) -> torch.Tensor:
    """What :func:`apply_rope` takes, computed once per forward for every block: on the CPU the
    unit complex numbers exp(i * angles) (N, hd/2) complex64, so each rotation is one complex
    multiply (forward + backward ~0.6 ms against ~1.7 ms for the cos/sin form on a 2,048-token
    pack); elsewhere the angles themselves (compilers on GPUs handle complex tensors poorly)."""
    if angles.device.type != "cpu":
        return angles
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the last dim by ``angles[..., i]``.

    x: (..., N, head_dim), angles: (N, head_dim/2) real angles, or complex exp(i * angles)
    from :func:`rope_rotation` -> (..., N, head_dim), same dtype as x.
    """
    if angles.is_complex():
        xf = x.float()
        if xf.stride(-1) != 1:
            xf = xf.contiguous()
        xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (..., N, hd/2): pairs as (re, im)
        return torch.view_as_real(xc * angles).flatten(-2).type_as(x)  # (..., N, hd)
    xf = x.float().unflatten(-1, (-1, 2))  # (..., N, hd/2, 2)
    x1, x2 = xf[..., 0], xf[..., 1]  # (..., N, hd/2)
    cos, sin = angles.cos(), angles.sin()  # (N, hd/2)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., N, hd/2, 2)
    return out.flatten(-2).type_as(x)  # (..., N, hd)


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


@dataclass
class SegmentMask:
    """Block-diagonal attention as per-video slices (the CPU path, see `build_attention_mask`).

    q_slices: (start, end) of each video's queries, in order, covering every query once;
    k_index: that video's keys, a ``slice`` when they are contiguous, else an index tensor.
    """

    q_slices: list[tuple[int, int]]
    k_index: list
    # one autograd node over all videos (`_SegmentFlashAttention`) where possible; False: plain
    # autograd through each video's slices (the "segments_unfused" backend, a baseline)
    fused: bool = True


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


def build_attention_mask(q_ids: torch.Tensor, kv_ids: torch.Tensor, backend: str = "auto"):
    """Mask letting query i see key j iff ``q_ids[i] == kv_ids[j]`` (same video).

    q_ids: (Nq,) int, kv_ids: (Nk,) int. Keys with a negative id (padding) are seen by
    nobody. Built once per forward and shared by every block (not once per layer).
    backend: "sdpa" -> dense bool (Nq, Nk): simple, but every query is scored against the
    whole pack, so a pack of 20 videos does ~20x the attention work it needs;
    "segments" -> a :class:`SegmentMask`: one SDPA call per video on its own keys (queries
    of a video must be contiguous, as packing makes them; else it falls back to dense), all
    in one autograd node on the CPU ("segments_unfused": autograd through every slice, the
    way before that node; a benchmark baseline).
    Measured on 2 CPU cores, tiny DiT, 4096-token packs: see benchmarks/bench_attention.py;
    "flex" -> a ``BlockMask`` for ``flex_attention`` (CUDA), which skips the empty
    off-diagonal blocks entirely; "auto" -> flex on CUDA, else segments.
    A varlen/flash kernel would take ``cu_seqlens`` here instead; only this function and
    :func:`attention` would change.
    """
    if backend == "auto":
        backend = "flex" if q_ids.is_cuda else "segments"
    if backend in ("segments", "segments_unfused"):
        seg = _segments(q_ids, kv_ids)
        if seg is not None:
            seg.fused = backend == "segments"
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
    raise ValueError(f"unknown attention backend {backend!r}")


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
    gradient of the WHOLE pack's size: with ~14 videos a pack that memory traffic cost more than
    the attention itself (per block: fwd+bwd 12.8 ms -> 7.8 ms, the same numbers bit for bit).
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Masked multi-head attention over packed tokens.

    q: (heads, Nq, hd), k, v: (heads, Nk, hd), mask from :func:`build_attention_mask`
    -> (heads, Nq, hd). Every query must see at least one key (else SDPA returns NaN);
    the model guarantees it (a token always sees itself / the null text key).
    """
    if isinstance(mask, SegmentMask):
        return _segment_attention(q, k, v, mask)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]  # (heads, Nq, hd)
    return _flex_attention(q.is_cuda)(q[None], k[None], v[None], block_mask=mask)[0]  # (heads, Nq, hd)


# ----------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (U, D) via sinusoids + MLP (DiT, as in ADM / "Attention is all you need")."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, scale: float = 1000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.scale = scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t: (U,) float -> (U, dim) [cos | sin] features."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (U, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (U, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoid(t * self.scale, self.frequency_embedding_size)  # (U, F)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (U, D)


class TextEmbedder(nn.Module):
    """Text encoder states (B, L, text_dim) -> (B, L, D) (PixArt-alpha's caption projection)."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(text_dim, hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.proj(text)  # (B, L, D)


class TextRefiner(nn.Module):
    """Pre-norm transformer layers over each prompt's own text states: (B, L, D) -> (B, L, D).
    Words attend to the valid words of their prompt (a masked word only to itself, so an empty
    prompt stays finite), with 1D RoPE over word order. Residual branches start at zero, so a
    fresh refiner is the identity."""

    def __init__(self, hidden_size: int, num_heads: int, layers: int, mlp_ratio: float = 4.0, theta: float = 10000.0):
        super().__init__()
        self.num_heads = num_heads
        self.rope_axes = (hidden_size // num_heads, 0, 0)  # the whole head rotates with word order
        self.theta = theta
        hidden = int(hidden_size * mlp_ratio)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
            layer.qkv = nn.Linear(hidden_size, 3 * hidden_size)
            layer.proj = nn.Linear(hidden_size, hidden_size)
            layer.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
            layer.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"),
                                      nn.Linear(hidden, hidden_size))
            self.layers.append(layer)

    def zero_init(self) -> None:
        for layer in self.layers:
            for out in (layer.proj, layer.mlp[-1]):
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        eye = torch.eye(L, dtype=torch.bool, device=x.device)
        attn_mask = (mask[:, None, None, :] | eye)  # (B, 1, L, L): valid keys, and always itself
        order = F.pad(torch.arange(L, device=x.device)[:, None], (0, 2))  # (L, 3): word index as "t"
        angles = rope_rotation(rope_angles(order, self.rope_axes, self.theta))  # (L, hd/2)
        for layer in self.layers:
            q, k, v = layer.qkv(layer.norm1(x)).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(q, angles), apply_rope(k, angles)  # (B, heads, L, hd)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, L, hd)
            x = x + layer.proj(out.transpose(1, 2).reshape(B, L, D))
            x = x + layer.mlp(layer.norm2(x))
        return x  # (B, L, D)


class PooledTextEmbedder(nn.Module):
    """One vector per video from its text states (B, L, text_dim) -> (B, D), added to the
    timestep embedding of every token of that video.

    mode "mean": the masked mean of the states. "attention": ``heads`` learnt queries each
    take a softmax-weighted sum of the projected states (attention pooling), so single words
    can dominate: MiniLM's mean-pooled states of two captions that differ only in "leftward"
    / "rightward" have cosine 0.996 (0.90 for circle / square), so a mean barely carries the
    direction. Videos with no text token (the unconditional branch of CFG) get the learnt
    ``null`` vector."""

    def __init__(self, text_dim: int, hidden_size: int, mode: str = "mean", heads: int = 4):
        super().__init__()
        assert mode in ("mean", "attention"), f"pooled text mode must be 'mean' or 'attention', got {mode!r}"
        self.mode = mode
        if mode == "mean":
            self.proj = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        else:
            self.value = nn.Linear(text_dim, hidden_size)
            self.score = nn.Linear(text_dim, heads)  # one logit per head per text token
            self.proj = nn.Sequential(nn.SiLU(), nn.Linear(heads * hidden_size, hidden_size))
        self.null = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        has_text = text_mask.any(dim=1, keepdim=True)  # (B, 1)
        if self.mode == "mean":
            out = self.proj(pooled(text, text_mask))  # (B, D)
        else:
            logits = self.score(text).masked_fill(~text_mask[..., None], float("-inf"))  # (B, L, heads)
            weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # (B, L, heads); empty prompt: 0
            per_head = torch.einsum("blh,bld->bhd", weights, self.value(text))  # (B, heads, D)
            out = self.proj(per_head.flatten(1))  # (B, D)
        return torch.where(has_text, out, self.null.to(out.dtype))  # (B, D)


# ----------------------------------------------------------------------------------------
# Attention modules and the block
# ----------------------------------------------------------------------------------------


def video_extents(positions: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest (t, h, w) position of each video: positions (N, 3), seq_ids (N,) in
    [0, num_seqs) or -1 for padding (counted in no video) -> lo, hi (num_seqs + 1, 3) float32;
    row num_seqs is the padding bucket (+-inf where there is none)."""
    pos = positions.to(torch.float32)  # (N, 3)
    ids = torch.where(seq_ids < 0, num_seqs, seq_ids)  # padding -> an extra, ignored bucket
    index = ids[:, None].expand(-1, 3)
    lo = torch.full((num_seqs + 1, 3), float("inf"), device=pos.device).scatter_reduce(
        0, index, pos, reduce="amin")  # (B + 1, 3)
    hi = torch.full((num_seqs + 1, 3), float("-inf"), device=pos.device).scatter_reduce(
        0, index, pos, reduce="amax")  # (B + 1, 3)
    return lo, hi


class FractionalPositionEmbedder(nn.Module):
    """Each token's (t, h, w) as a fraction of its video's extent, through sinusoids, to D."""

    def __init__(self, hidden_size: int, num_freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32),
                             persistent=False)  # (F,) pi * 1, 2, 4, ...
        self.proj = nn.Linear(3 * 2 * num_freqs, hidden_size)

    def forward(self, positions: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int,
                extents: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """positions (N, 3); seq_ids (N,) in [0, num_seqs), or -1 for padding (which takes no
        part in any video's extent; its output is garbage, as everywhere for padding);
        extents: :func:`video_extents` of the same, when the caller already has them."""
        pos = positions.to(torch.float32)  # (N, 3)
        ids = torch.where(seq_ids < 0, num_seqs, seq_ids)  # padding -> an extra, ignored bucket
        lo, hi = extents if extents is not None else video_extents(positions, seq_ids, num_seqs)  # (B + 1, 3)
        lo, hi = lo[ids], hi[ids]  # (N, 3)
        frac = (pos - lo + 0.5) / (hi - lo + 1)  # (N, 3) in (0, 1): cell centres over the extent
        angles = frac[:, :, None] * self.freqs  # (N, 3, F)
        feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (N, 6F)
        return self.proj(feats.to(self.proj.weight.dtype))  # (N, D)


class AspectEmbedder(nn.Module):
    """Each video's aspect ratio log(W / H) (of its token grid) -> (B, D), through sinusoids and
    an MLP, as the timestep. Scale-free: 112 x 64 and 224 x 128 get the same vector."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 64, scale: float = 100.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.scale = scale  # log ratios lie in about [-1.5, 1.5]; DiT's sinusoids expect ~0..1000
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """lo, hi: (B, 3) from :func:`video_extents` -> (B, D)."""
        extent = (hi - lo + 1).clamp(min=1.0)  # (B, 3) tokens along t, h, w
        log_ratio = torch.log(extent[:, 2] / extent[:, 1])  # (B,)
        freq = TimestepEmbedder.sinusoid(log_ratio * self.scale, self.frequency_embedding_size)  # (B, F)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK-norm and 3D RoPE, over packed tokens."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, mask) -> torch.Tensor:
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).permute(1, 2, 0, 3)  # 3 x (heads, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)  # (heads, N, hd)
        q, k = apply_rope(q, angles), apply_rope(k, angles)  # (heads, N, hd)
        out = attention(q, k, v, mask)  # (heads, N, hd)
        return self.proj(out.transpose(0, 1).reshape(N, D))  # (N, D)


class CrossAttention(nn.Module):
    """Video tokens (queries) attend to their own video's text tokens (keys/values). No RoPE:
    text order is already encoded by the text encoder."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.kv = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask) -> torch.Tensor:
        N, D = x.shape
        M = text.shape[0]
        q = self.q(x).view(N, self.num_heads, -1).transpose(0, 1)  # (heads, N, hd)
        k, v = self.kv(text).view(M, 2, self.num_heads, -1).permute(1, 2, 0, 3)  # 2 x (heads, M, hd)
        q, k = self.q_norm(q), self.k_norm(k)  # (heads, N, hd), (heads, M, hd)
        out = attention(q, k, v, mask)  # (heads, N, hd)
        return self.proj(out.transpose(0, 1).reshape(N, D))  # (N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attn (gated), cross-attn to text (ungated, as PixArt), MLP (gated)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=True, eps=1e-6)
        self.cross_attn = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        hidden = int(D * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c_unique, inverse, angles, self_mask, text, cross_mask):
        """x: (N, D); c_unique: (U, D) embeddings of the U distinct timesteps, inverse: (N,)
        index of each token's timestep in c_unique; angles: (N, hd/2); text: (M, D)."""
        # The modulation depends only on t, which takes a handful of distinct values in a
        # pack (one per video, plus 0 for clean frames): compute it per distinct t, then
        # gather. Per token it would cost 6 D^2 per token per block, as much as attention.
        # Split before gathering: the backward of a chunk of the gathered (N, 6D) tensor is a
        # concatenation of six (N, D) gradients; of the (U, 6D) one, of six tiny ones.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            part[inverse] for part in self.adaLN_modulation(c_unique).chunk(6, dim=-1))  # 6 x (N, D)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), angles, self_mask)  # (N, D)
        x = x + self.cross_attn(self.norm2(x), text, cross_mask)  # (N, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))  # (N, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear back to the token width D_in."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.hidden_size, cfg.in_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))

    def forward(self, x, c_unique, inverse):
        shift, scale = (part[inverse] for part in self.adaLN_modulation(c_unique).chunk(2, dim=-1))  # 2 x (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, D_in)


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Text-conditioned diffusion transformer predicting the rectified-flow velocity."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.gradient_checkpointing = False  # recompute each block in backward (saves activations)
        self.attention_backend = "auto"  # see build_attention_mask
        self.x_embedder = nn.Linear(config.in_dim, D)  # tokens are already patchified
        self.pos_embedder = FractionalPositionEmbedder(D) if config.abs_pos == "fractional" else None
        self.t_embedder = TimestepEmbedder(D, config.frequency_embedding_size, config.timestep_scale)
        self.text_embedder = TextEmbedder(config.text_dim, D)
        self.text_refiner = (TextRefiner(D, config.num_heads, config.text_refiner_layers, config.mlp_ratio,
                                         config.rope_theta) if config.text_refiner_layers else None)
        # the pooled vector comes from the refined states (width D) when there is a refiner
        pooled_dim = D if self.text_refiner is not None else config.text_dim
        self.pooled_embedder = (PooledTextEmbedder(pooled_dim, D, config.pooled_text)
                                if config.pooled_text != "none" else None)
        self.aspect_embedder = AspectEmbedder(D) if config.aspect_cond else None
        # One learned key/value every video sees besides its text: makes the empty prompt
        # (CFG's unconditional branch) well defined and acts as an attention sink.
        self.null_text = nn.Parameter(torch.zeros(D))
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(config)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier linears, N(0, 0.02) timestep MLP, adaLN-Zero (modulation,
        cross-attn output and final layer all zero: every block is the identity and the
        output is exactly 0 at step 0)."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_text, std=0.02)
        if self.pooled_embedder is not None:
            nn.init.normal_(self.pooled_embedder.null, std=0.02)
        if self.aspect_embedder is not None:  # as the timestep MLP
            nn.init.normal_(self.aspect_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.aspect_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.text_refiner is not None:
            self.text_refiner.zero_init()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        timesteps: torch.Tensor,
        seq_ids: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for a pack of B videos.

        x: (N, D_in) noisy tokens; positions: (N, 3) int (t, h, w); timesteps: (N,) float
        in [0, 1] per token (0 = clean conditioning token); seq_ids: (N,) int in [0, B);
        text: (B, L, text_dim); text_mask: (B, L) bool (all False = unconditional);
        valid: optional (N,) bool, False for padding tokens, which no token attends to
        (their outputs are garbage and must be ignored). Returns (N, D_in).
        """
        N = x.shape[0]
        B, L, _ = text.shape
        assert positions.shape == (N, 3) and timesteps.shape == (N,) and seq_ids.shape == (N,), (
            f"per-token inputs disagree: x {tuple(x.shape)}, positions {tuple(positions.shape)}, "
            f"timesteps {tuple(timesteps.shape)}, seq_ids {tuple(seq_ids.shape)}"
        )
        assert text_mask.shape == (B, L), f"text_mask {tuple(text_mask.shape)} != text {(B, L)}"
        assert text_mask.dtype == torch.bool, f"text_mask must be bool, got {text_mask.dtype}"
        seq_ids = seq_ids.long()  # (N,)
        kv_ids = seq_ids if valid is None else torch.where(valid, seq_ids, -1)  # (N,) padding keys: -1
        self_mask = build_attention_mask(seq_ids, kv_ids, self.attention_backend)  # (N, N) or BlockMask

        # Text keys of the whole pack, flattened video by video: its valid text tokens, then its
        # null key, so each video's keys are one contiguous slice (cheaper to attend to).
        text_states = self.text_embedder(text)  # (B, L, D)
        if self.text_refiner is not None:
            text_states = self.text_refiner(text_states, text_mask)  # (B, L, D)
        keys = torch.cat([text_states, self.null_text.expand(B, 1, -1).to(text_states.dtype)], dim=1)  # (B, L + 1, D)
        key_mask = F.pad(text_mask, (0, 1), value=True)  # (B, L + 1): the null key is always there
        text_emb = keys[key_mask]  # (M, D)
        text_ids = torch.arange(B, device=x.device)[:, None].expand(B, L + 1)[key_mask]  # (M,)
        cross_mask = build_attention_mask(seq_ids, text_ids, self.attention_backend)  # (N, M)

        angles = rope_rotation(rope_angles(positions, self.config.axes_dims, self.config.rope_theta))  # (N, hd/2)
        # each video's (t, h, w) extent, once for both embedders that read it; padding takes no part
        extents = (video_extents(positions, kv_ids, B)
                   if self.pos_embedder is not None or self.aspect_embedder is not None else None)
        # footgun: unique() syncs with the host on CUDA and breaks torch.compile graphs here;
        # fine, since only the blocks need compiling (they take c_unique/inverse as inputs).
        if self.pooled_embedder is None and self.aspect_embedder is None:
            t_unique, inverse = torch.unique(timesteps, return_inverse=True)  # (U,), (N,)
            c_unique = self.t_embedder(t_unique)  # (U, D)
        else:  # the conditioning differs per (video, t) pair: embed each distinct pair once
            # one integer key per (video, t) pair, ordered as the pairs: unique() over rows
            # (dim=0) compares them one by one and cost ~6 ms a 2,048-token pack on a CPU
            t_unique, t_index = torch.unique(timesteps, return_inverse=True)  # (T,), (N,)
            pair_keys, inverse = torch.unique(seq_ids * t_unique.numel() + t_index, return_inverse=True)  # (U,), (N,)
            video = pair_keys // t_unique.numel()  # (U,)
            c_unique = self.t_embedder(t_unique[pair_keys % t_unique.numel()])  # (U, D)
            if self.pooled_embedder is not None:
                prompt = self.pooled_embedder(text if self.text_refiner is None else text_states, text_mask)  # (B, D)
                c_unique = c_unique + prompt[video]
            if self.aspect_embedder is not None:
                lo, hi = extents  # (B + 1, 3) each
                c_unique = c_unique + self.aspect_embedder(lo[:B], hi[:B]).to(c_unique.dtype)[video]

        h = self.x_embedder(x)  # (N, D)
        if self.pos_embedder is not None:
            h = h + self.pos_embedder(positions, kv_ids, B, extents).to(h.dtype)  # kv_ids: padding is -1
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, c_unique, inverse, angles, self_mask, text_emb, cross_mask, use_reentrant=False)
            else:
                h = block(h, c_unique, inverse, angles, self_mask, text_emb, cross_mask)  # (N, D)
        out = self.final_layer(h, c_unique, inverse)  # (N, D_in)
        if self.config.parameterization == "edm":
            out = edm_velocity(x, out, timesteps)
        return out  # (N, D_in) velocity

    def forward_padded(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        timesteps: torch.Tensor,
        token_mask: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The pad-to-longest baseline: x (B, N, D_in), positions (B, N, 3), timesteps (B, N)
        or (B,), token_mask (B, N) bool (False = padding) -> (B, N, D_in), zero at padding.

        Design: the padded batch is flattened into one pack whose padding tokens are keys
        nobody sees (``valid``). Padding still costs full compute - that is what the
        baseline measures - and valid tokens get exactly the packed result."""
        B, N, _ = x.shape
        if timesteps.dim() == 1:
            timesteps = timesteps[:, None].expand(B, N)  # (B, N)
        seq_ids = torch.arange(B, device=x.device)[:, None].expand(B, N)  # (B, N)
        out = self.forward(
            x.reshape(B * N, -1),
            positions.reshape(B * N, 3),
            timesteps.reshape(B * N),
            seq_ids.reshape(B * N),
            text,
            text_mask,
            valid=token_mask.reshape(B * N),
        )  # (B*N, D_in)
        return out.view(B, N, -1) * token_mask[..., None]  # (B, N, D_in)

    # -- checkpoints: a directory with config.json + model.safetensors (never pickle) --

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"model_type": "sora-dit", **asdict(self.config)}, f, indent=2)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"))

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> "DiT":
        from safetensors.torch import load_file

        with open(os.path.join(directory, "config.json")) as f:
            raw = json.load(f)
        model_type = raw.pop("model_type", "sora-dit")
        assert model_type == "sora-dit", f"{directory} holds a {model_type!r}, not a sora-dit"
        known = {f.name for f in fields(DiTConfig)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"config.json has fields this DiTConfig does not know: {sorted(unknown)}")
        model = cls(DiTConfig(**raw))
        model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=True)
        return model.to(device=device, dtype=dtype)
