"""The diffusion transformer (DiT) over packed spacetime patch tokens.

Reads top to bottom like facebookresearch/DiT ``models.py``: the config, helpers, embedders,
the block, the final layer, the model, then the size presets. The attention backends that keep
packed videos apart live in :mod:`sora.attention`. What differs from image DiT:

- **Packed sequences (NaViT, Dehghani et al. 2023).** The input is a flat list of tokens
  from several videos of any size and duration; ``seq_ids`` says which video each token
  belongs to, and attention is block-diagonal over videos. No padding, no learned position
  table.
- **3D rotary position embedding** (RoPE, Su et al. 2021, split over t/h/w as in video DiTs
  such as HunyuanVideo/Wan): q and k of every head are rotated by angles from the token's
  integer (t, h, w) grid position, so attention depends only on *relative* positions and any
  size or duration works. Presets also add a **fractional absolute position** embedding
  (NaViT's factorised fractional embeddings: where the token sits as a fraction of its own
  video's extent per axis): with relative positions alone a model cannot tell left from
  right of the frame, nor early from late, so it cannot bind a prompt's direction of motion.
- **Per-token timesteps with adaLN-Zero.** Each token carries its own t: clean conditioning
  frames have t = 0 inside a noisy video (image-to-video, extension, interpolation all use
  this). The timestep embedding drives a per-token shift/scale/gate (Peebles & Xie 2023);
  the modulation and the final layer start at zero, so the untrained model outputs exactly 0.
- **Text by cross-attention** (PixArt-alpha, Chen et al. 2023): each video attends to its own
  text tokens only, plus one learned "null" key every video always sees. The null key makes
  an empty prompt (all-False text mask: classifier-free-guidance dropout) well defined.
  Optionally the prompt's pooled states also join the timestep embedding (as SD3 does).
- **QK-norm** (RMSNorm on q and k, Dehghani et al. 2023 "ViT-22B"): keeps attention logits
  bounded, which matters for stable bf16 training at scale.

The model knows nothing about parallelism (torchtitan style): blocks live in an ``nn.ModuleList``
named ``blocks`` so FSDP / activation checkpointing can wrap them one by one.
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

from sora.attention import attention, build_attention_mask
from sora.text_encoder import pooled

# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------

# Options that were removed, each with the value that meant "off": a saved config.json that
# carries one at that value loads (the key is dropped); one that switches it on is refused.
REMOVED_OPTIONS: dict[str, object] = {"text_refiner_layers": 0, "aspect_cond": False, "parameterization": "velocity"}


@dataclass
class DiTConfig:
    """Size and behaviour of a :class:`DiT`. The sizes to use are the ``PRESETS``; a field's
    default is what a config.json saved before that field existed means."""

    in_channels: int = 16  # latent channels C of the VAE
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) latent cells per token
    hidden_size: int = 768  # model width D
    depth: int = 12  # number of DiT blocks
    num_heads: int = 12  # attention heads; head_dim = hidden_size / num_heads
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of D
    text_dim: int = 384  # width of the text encoder's hidden states (384 for MiniLM-L6)
    qk_norm: bool = True  # RMSNorm on queries and keys of every attention (ViT-22B)
    rope_theta: float = 10000.0  # base period of the rotary frequencies
    # Head dims of the (t, h, w) rotary axes, even, summing to head_dim (None: ~1/4 to t, the rest h/w)
    rope_dims: tuple[int, int, int] | None = None
    timestep_scale: float = 1000.0  # t in [0, 1] times this before the sinusoids (DiT's steps 0..999)
    frequency_embedding_size: int = 256  # sinusoid features of the timestep embedding
    # Pooled prompt added to each video's adaLN conditioning (as SD3): "none", or "mean" (the
    # masked mean of the text states through an MLP; an empty prompt gets a learnt null vector).
    pooled_text: str = "none"
    # Absolute position beside RoPE: "none", or "fractional" (each token's place as a fraction
    # of its own video's extent along t, h and w: NaViT's factorised fractional embedding).
    abs_pos: str = "none"

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        if self.rope_dims is not None:
            self.rope_dims = tuple(self.rope_dims)
        if self.abs_pos not in ("none", "fractional"):
            raise ValueError(f"abs_pos must be 'none' or 'fractional', got {self.abs_pos!r}")
        if self.pooled_text not in ("none", "mean"):
            raise ValueError(f"pooled_text must be 'none' or 'mean', got {self.pooled_text!r}"
                             + (" (attention pooling was removed)" if self.pooled_text == "attention" else ""))
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        dims = self.axes_dims
        if sum(dims) != self.head_dim or any(d % 2 for d in dims):
            raise ValueError(f"rope_dims {dims} must be even and sum to head_dim {self.head_dim}")

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

    @classmethod
    def from_dict(cls, raw: dict) -> "DiTConfig":
        """A config from a saved dict (config.json): removed options at their "off" value are
        dropped, a removed option switched on or an unknown field raises ValueError."""
        raw = dict(raw)
        for key, off in REMOVED_OPTIONS.items():
            if key in raw and raw.pop(key) != off:
                raise ValueError(f"this config sets {key}, an option DiTConfig no longer has (only {key}={off!r} "
                                 f"loads); load the checkpoint with the sora-ray version that trained it")
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"config has fields this DiTConfig does not know: {sorted(unknown)}")
        return cls(**raw)


# ----------------------------------------------------------------------------------------
# Helpers: modulation, rotary embedding
# ----------------------------------------------------------------------------------------


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
    multiply (cheaper there than the cos/sin form, forward and backward); elsewhere the angles
    themselves (compilers on GPUs handle complex tensors poorly)."""
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


class PooledTextEmbedder(nn.Module):
    """One vector per video from its text states: the masked mean through an MLP,
    (B, L, text_dim) -> (B, D), added to the timestep embedding of every token of that video.
    Videos with no text token (the unconditional branch of CFG) get the learnt ``null`` vector."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.null = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        has_text = text_mask.any(dim=1, keepdim=True)  # (B, 1)
        out = self.proj(pooled(text, text_mask))  # (B, D)
        return torch.where(has_text, out, self.null.to(out.dtype))  # (B, D)


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

    def forward(self, positions: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
        """positions (N, 3); seq_ids (N,) in [0, num_seqs), or -1 for padding (which takes no
        part in any video's extent; its output is garbage, as everywhere for padding) -> (N, D)."""
        pos = positions.to(torch.float32)  # (N, 3)
        ids = torch.where(seq_ids < 0, num_seqs, seq_ids)  # padding -> an extra, ignored bucket
        lo, hi = video_extents(positions, seq_ids, num_seqs)  # (B + 1, 3)
        lo, hi = lo[ids], hi[ids]  # (N, 3)
        frac = (pos - lo + 0.5) / (hi - lo + 1)  # (N, 3) in (0, 1): cell centres over the extent
        angles = frac[:, :, None] * self.freqs  # (N, 3, F)
        feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (N, 6F)
        return self.proj(feats.to(self.proj.weight.dtype))  # (N, D)


# ----------------------------------------------------------------------------------------
# Attention modules, the block, the final layer
# ----------------------------------------------------------------------------------------


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
        self.pooled_embedder = PooledTextEmbedder(config.text_dim, D) if config.pooled_text == "mean" else None
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
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

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
        keys = torch.cat([text_states, self.null_text.expand(B, 1, -1).to(text_states.dtype)], dim=1)  # (B, L + 1, D)
        key_mask = F.pad(text_mask, (0, 1), value=True)  # (B, L + 1): the null key is always there
        text_emb = keys[key_mask]  # (M, D)
        text_ids = torch.arange(B, device=x.device)[:, None].expand(B, L + 1)[key_mask]  # (M,)
        cross_mask = build_attention_mask(seq_ids, text_ids, self.attention_backend)  # (N, M)

        angles = rope_rotation(rope_angles(positions, self.config.axes_dims, self.config.rope_theta))  # (N, hd/2)
        # footgun: unique() syncs with the host on CUDA and breaks torch.compile graphs here;
        # fine, since only the blocks need compiling (they take c_unique/inverse as inputs).
        if self.pooled_embedder is None:
            t_unique, inverse = torch.unique(timesteps, return_inverse=True)  # (U,), (N,)
            c_unique = self.t_embedder(t_unique)  # (U, D)
        else:  # the conditioning differs per (video, t) pair: embed each distinct pair once
            # one integer key per (video, t) pair, ordered as the pairs (cheaper than unique()
            # over rows, which compares them one by one)
            t_unique, t_index = torch.unique(timesteps, return_inverse=True)  # (T,), (N,)
            pair_keys, inverse = torch.unique(seq_ids * t_unique.numel() + t_index, return_inverse=True)  # (U,), (N,)
            video = pair_keys // t_unique.numel()  # (U,)
            c_unique = self.t_embedder(t_unique[pair_keys % t_unique.numel()])  # (U, D)
            c_unique = c_unique + self.pooled_embedder(text, text_mask)[video]  # (U, D)

        h = self.x_embedder(x)  # (N, D)
        if self.pos_embedder is not None:
            h = h + self.pos_embedder(positions, kv_ids, B).to(h.dtype)  # kv_ids: padding is -1
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, c_unique, inverse, angles, self_mask, text_emb, cross_mask, use_reentrant=False)
            else:
                h = block(h, c_unique, inverse, angles, self_mask, text_emb, cross_mask)  # (N, D)
        return self.final_layer(h, c_unique, inverse)  # (N, D_in) velocity

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
        if model_type != "sora-dit":
            raise ValueError(f"{directory} holds a {model_type!r}, not a sora-dit")
        try:
            config = DiTConfig.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{directory}/config.json: {e}") from None
        model = cls(config)
        model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=True)
        return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Size presets and FLOPs
# ----------------------------------------------------------------------------------------


# Parameter counts with in_channels=16, text_dim=384 (checked by tests/test_dit.py).
# Each block holds ~22 D^2 weights: self-attn 4, cross-attn 4, MLP 8, adaLN 6.
PRESETS: dict[str, DiTConfig] = {
    # ~1.6M params: sized for the shapes world on a 2-core CPU
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


def pack_flops(samples, config: DiTConfig, training: bool = True) -> float:
    """FLOPs of a pack of ``sora.packing.Sample``: each video's tokens cost flops_per_token at its own length."""
    return sum(s.num_tokens * flops_per_token(config, s.num_tokens, int(s.text_mask.sum()), training) for s in samples)


# Dense bf16 peak FLOP/s by CUDA device name (first match wins; vendor data sheets, no sparsity).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
                   "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def peak_bf16_flops(name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by its name, or None when unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
