"""The video compression network: a causal 3D convolutional VAE.

Sora compresses raw video into a latent that is smaller in time and space and
trains its diffusion transformer there. This VAE compresses x4 in time and
x8 x8 in space (defaults), with a causal time axis:

    pixels (B, 3, T, H, W), T = 1 + 4k   <->   latents (B, C, 1 + k, H/8, W/8)

Causal means every 3D conv pads time only on the past side, so latent frame j
depends on pixel frames <= 4j only. Consequences we rely on:
  * the first frame is encoded on its own, so an image is a one-frame video
    and image and video share one latent space;
  * a long video can be encoded/decoded in temporal chunks (first frame, then
    4 frames at a time) carrying each conv's last input frames in a cache, and
    the result equals the all-at-once result up to float rounding;
  * large frames can be processed in overlapping spatial tiles blended with
    linear ramps (approximate: a tile sees less context at its border).

Normalisation: GroupNorm computed per frame, over (C/G, H, W) of that frame only.
GroupNorm over (T, H, W) would let future frames change the statistics used for
past frames, breaking causality and chunked == all-at-once. Per-frame statistics
are causal. They are not local in space, so a spatial tile normalises with its own
statistics: that, and the missing context at tile borders, is why tiling is only
approximate. We tried the local alternative (RMS/LayerNorm over channels at each
(t, h, w), as Wan 2.1 does) and it was worse here: on flat-coloured frames the tiny
model collapsed to predicting the background, with vanishing encoder gradients,
while per-frame GroupNorm reached > 30 dB on the same 300 steps.
There is no self-attention block: it is global in space and costly on a CPU.

Usage (tiny CPU run):
    vae = CausalVideoVAE(VAEConfig.preset("tiny"))
    zn = vae.encode_latents(x)            # x: (B, 3, 17, 64, 112) in [-1, 1]
    x_hat = vae.decode_latents(zn)        # (B, 3, 17, 64, 112)

A pretrained diffusers video VAE (Wan 2.1, CogVideoX) can stand in through
`DiffusersVideoVAE`; `load_vae(dir)` picks the right class from config.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CLASS_NAME = "CausalVideoVAE"  # written to config.json so `load_vae` can dispatch

# A temporal cache maps each stateful module to what it carries into the next chunk.
Cache = dict


# ----------------------------------------------------------------------------- config


@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 16
    base_channels: int = 96
    # One entry per resolution level; a x2 spatial downsample sits between levels,
    # so spatial_downsample == patch_size * 2 ** (len(channel_multipliers) - 1).
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: int = 4  # x4 in time; the x2 steps go on the deepest levels
    spatial_downsample: int = 8  # x8 x8 in space
    # Pixel-unshuffle factor before the first conv (as in Wan 2.2): folds p x p pixels into
    # channels so the full-resolution convs, the costliest part on a CPU, disappear.
    patch_size: int = 1
    # "group": GroupNorm with per-frame statistics; "none": no normalisation (see the top of
    # the file: trains faster on flat-coloured shapes and makes tiling nearly exact).
    norm: str = "group"
    norm_groups: int = 32
    # Block-mean shortcut (the residual-autoencoding idea of DC-AE, Chen et al. 2024): the
    # encoder adds each latent cell's mean RGB to latent channels 0-2 and the decoder adds
    # those channels, repeated back over the cell, to its output. From step 0 the model is a
    # coarse colour codec and the networks learn only the detail: on a CPU budget that is
    # the difference between reaching sharp reconstructions and not (see vae_train).
    shortcut: bool = False
    # Latent statistics: normalised latents are (z - shift_factor) * scaling_factor, so the
    # diffusion model sees roughly unit variance. Set from data with `fit_latent_stats`.
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    # Per-channel statistics (diffusers' AutoencoderKLWan naming). When set they replace the
    # scalar pair: normalised latents are (z - latents_mean[c]) / latents_std[c]. Channels of
    # one VAE can differ 4x in spread (the shortcut's colour channels vs its detail channels);
    # with one scalar the detail channels, which carry shape, drown in the diffusion noise at
    # a quarter of the noise level the colour channels survive.
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None

    def __post_init__(self):
        if self.latents_mean is not None or self.latents_std is not None:
            assert self.latents_mean is not None and self.latents_std is not None, "set both latents_mean and latents_std"
            self.latents_mean = [float(v) for v in self.latents_mean]
            self.latents_std = [float(v) for v in self.latents_std]
            assert len(self.latents_mean) == len(self.latents_std) == self.latent_channels, (
                f"per-channel stats need {self.latent_channels} values, got {len(self.latents_mean)}/{len(self.latents_std)}")
            assert all(v > 0 for v in self.latents_std), f"latents_std must be positive, got {self.latents_std}"
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        levels = len(self.channel_multipliers)
        assert levels >= 1, "channel_multipliers needs at least one level"
        assert self.spatial_downsample == self.patch_size * 2 ** (levels - 1), (
            f"spatial_downsample={self.spatial_downsample} must equal patch_size * 2**(levels-1) = "
            f"{self.patch_size} * 2**{levels - 1}"
        )
        assert self.norm in ("group", "none"), f"norm must be 'group' or 'none', got {self.norm!r}"
        assert not self.shortcut or self.latent_channels >= self.in_channels, "the shortcut needs latent_channels >= in_channels"
        for c in (self.base_channels * m for m in self.channel_multipliers):
            assert self.norm == "none" or c % self.norm_groups == 0, f"channel count {c} not divisible by norm_groups={self.norm_groups}"
        n_t = int(round(math.log2(self.temporal_downsample)))
        assert 2**n_t == self.temporal_downsample, f"temporal_downsample must be a power of 2, got {self.temporal_downsample}"
        assert n_t <= levels - 1, f"x{self.temporal_downsample} in time needs {n_t} downsample steps, only {levels - 1} exist"

    @property
    def num_temporal_downsamples(self) -> int:
        return int(round(math.log2(self.temporal_downsample)))

    @classmethod
    def preset(cls, name: str) -> "VAEConfig":
        """Named sizes: "tiny" (shapes world on a 2-core CPU) and "base" (production)."""
        presets = {
            # ~0.5M parameters. Pixel-unshuffle by 2 first, then two learned x2 downsamples.
            # no norm, block-mean shortcut: measured best of our CPU runs (see sora/vae_train.py)
            "tiny": dict(latent_channels=8, base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, patch_size=2,
                         norm="none", shortcut=True),
            "base": dict(latent_channels=16, base_channels=96, channel_multipliers=(1, 2, 4, 4), num_res_blocks=2),
        }
        assert name in presets, f"unknown VAE preset {name!r}; choose from {sorted(presets)}"
        return cls(**presets[name])


# ----------------------------------------------------------------------------- posterior


@dataclass
class DiagonalGaussian:
    """Posterior q(z | x) = N(mean, exp(logvar)); both (B, C, T', H', W')."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def __post_init__(self):
        self.logvar = self.logvar.clamp(-30.0, 20.0)  # keeps exp() finite early in training

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent element, same shape as mean (not reduced)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


# ----------------------------------------------------------------------------- layers


def make_norm(cfg: "VAEConfig", channels: int) -> nn.Module:
    if cfg.norm == "none":
        return nn.Identity()
    return FrameGroupNorm(cfg.norm_groups, channels, eps=1e-6)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame: (B, C, T, H, W) is normalised as (B*T, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        B, C, T, H, W = x.shape
        y = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, C, H, W)
        return y.reshape(B, T, C, H, W).transpose(1, 2)


class CausalConv3d(nn.Module):
    """3D conv that pads time on the past side only, and can run chunk by chunk.

    With kernel kt and stride st, output frame j sees padded input frames
    [st*j, st*j + kt), i.e. original frames <= st*j. The first call pads with
    kt-1 zero frames; afterwards the cache holds the input frames the next
    output window still needs (P[st * n_out:] of the padded input P), which is
    exactly what an all-at-once pass would have used.
    """

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (3, 3, 3), stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel
        assert tuple(stride[1:]) == (1, 1), "CausalConv3d strides time only; downsample space separately"
        self.kt, self.st = kt, stride[0]
        # Space is padded by replicating the border, not with zeros: zero padding lets the
        # network detect borders, so a spatial tile's edge pixels come out different from the
        # same pixels inside the full frame. Replicate padding cut the tiled-vs-untiled
        # difference ~8x in our tests. Time is padded by hand (causally), see forward.
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kh // 2, kw // 2), padding_mode="replicate")

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:  # (B, C, T, H, W)
        if self.kt == 1 and self.st == 1:
            return self.conv(x)
        past = cache.get(self)
        if past is None:
            B, C, _, H, W = x.shape
            past = x.new_zeros(B, C, self.kt - 1, H, W)
        padded = torch.cat([past, x], dim=2)  # (B, C, p + T, H, W)
        n_out = max(0, (padded.shape[2] - self.kt) // self.st + 1)
        cache[self] = padded[:, :, self.st * n_out :]
        if n_out == 0:  # not enough frames for one window yet: everything stays in the cache
            B, _, _, H, W = x.shape
            return x.new_zeros(B, self.conv.out_channels, 0, H, W)
        return self.conv(padded[:, :, : self.st * (n_out - 1) + self.kt])


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: "VAEConfig"):
        super().__init__()
        self.norm1 = make_norm(cfg, cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = make_norm(cfg, cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + h


class Downsample(nn.Module):
    """x2 in space (strided per-frame conv), optionally x2 in time (causal strided conv).

    In time, T = 1 + 2m frames become 1 + m: the first frame alone, then pairs.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), padding_mode="replicate")
        self.temporal = CausalConv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.spatial(x)  # (B, C, T, H/2, W/2)
        if self.temporal is not None:
            x = self.temporal(x, cache)  # (B, C, 1 + (T-1)/2, H/2, W/2)
        return x


class Upsample(nn.Module):
    """x2 in space (nearest + conv), optionally x2 in time (the inverse of Downsample).

    In time each frame becomes two (frame repeat plus a learned causal
    correction, zero at init), and the very first frame of the video keeps
    only its second copy, so 1 + m frames become 1 + 2m.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1), padding_mode="replicate")
        self.temporal = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None
        if self.temporal is not None:
            nn.init.zeros_(self.temporal.conv.weight)
            nn.init.zeros_(self.temporal.conv.bias)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.temporal is not None:
            first_chunk = self not in cache
            cache[self] = True
            B, C, T, H, W = x.shape
            delta = self.temporal(x, cache).reshape(B, 2, C, T, H, W)  # (B, 2, C, T, H, W)
            x = x.unsqueeze(1) + delta
            x = x.permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)  # frames t0a t0b t1a t1b ...
            if first_chunk:
                x = x[:, :, 1:]  # (B, C, 2T - 1, H, W)
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.spatial(x)  # (B, C, T, 2H, 2W)


def _level_channels(cfg: VAEConfig) -> list[int]:
    return [cfg.base_channels * m for m in cfg.channel_multipliers]


def _temporal_flags(cfg: VAEConfig) -> list[bool]:
    """Which of the len(levels)-1 resampling steps also resample time (the deepest ones)."""
    n = len(cfg.channel_multipliers) - 1
    return [i >= n - cfg.num_temporal_downsamples for i in range(n)]


class BlockMean(nn.Module):
    """Pixels (B, 3, T, H, W) -> the mean of each latent cell (B, 3, T', H/s, W/s): frame 0
    on its own, then groups of `tc` frames, as the causal encoder groups them. Stateless
    except for knowing whether this chunk starts the video (`cache`)."""

    def __init__(self, tc: int, sc: int):
        super().__init__()
        self.tc, self.sc = tc, sc

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        first = self not in cache
        cache[self] = True
        x = F.avg_pool3d(x, (1, self.sc, self.sc))  # (B, 3, T, h, w)
        head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (x[:, :, :0], x)
        B, C, T, h, w = rest.shape
        rest = rest.reshape(B, C, T // self.tc, self.tc, h, w).mean(dim=3)  # (B, 3, T/tc, h, w)
        return torch.cat([head, rest], dim=2)


class BlockRepeat(nn.Module):
    """The inverse layout of BlockMean: latent cells (B, 3, T', h, w) repeated to pixels
    (B, 3, T, h*s, w*s); the video's first latent frame gives one frame, the others `tc`."""

    def __init__(self, tc: int, sc: int):
        super().__init__()
        self.tc, self.sc = tc, sc

    def forward(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        first = self not in cache
        cache[self] = True
        x = z.repeat_interleave(self.tc, dim=2)  # (B, 3, T' tc, h, w)
        if first:
            x = x[:, :, self.tc - 1 :]  # the first latent frame stands for one frame
        return x.repeat_interleave(self.sc, dim=3).repeat_interleave(self.sc, dim=4)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.p = cfg.patch_size
        chans = _level_channels(cfg)
        self.conv_in = CausalConv3d(cfg.in_channels * self.p**2, chans[0])
        self.blocks = nn.ModuleList()
        cin = chans[0]
        t_flags = _temporal_flags(cfg)
        for i, c in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResBlock(cin, c, cfg))
                cin = c
            if i < len(chans) - 1:
                self.blocks.append(Downsample(c, temporal=t_flags[i]))
        self.mid = ResBlock(cin, cin, cfg)
        self.norm_out = make_norm(cfg, cin)
        self.conv_out = CausalConv3d(cin, 2 * cfg.latent_channels)
        self.shortcut = BlockMean(cfg.temporal_downsample, cfg.spatial_downsample) if cfg.shortcut else None
        if cfg.shortcut:  # start nearly deterministic: posterior noise would swamp the colour path
            nn.init.constant_(self.conv_out.conv.bias[cfg.latent_channels :], -8.0)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, 3, T, H, W) -> moments (B, 2 * C_latent, T', H/s, W/s)."""
        base = self.shortcut(x, cache) if self.shortcut is not None else None  # (B, 3, T', h, w)
        if self.p > 1:
            B, C, T, H, W = x.shape
            x = F.pixel_unshuffle(x.transpose(1, 2).reshape(B * T, C, H, W), self.p)
            x = x.reshape(B, T, -1, H // self.p, W // self.p).transpose(1, 2)  # (B, C p^2, T, H/p, W/p)
        h = self.conv_in(x, cache)
        for block in self.blocks:
            h = block(h, cache)
        h = self.mid(h, cache)
        moments = self.conv_out(F.silu(self.norm_out(h)), cache)
        if base is not None:
            moments = torch.cat([moments[:, : base.shape[1]] + base, moments[:, base.shape[1] :]], dim=1)
        return moments


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.p = cfg.patch_size
        chans = _level_channels(cfg)[::-1]
        t_flags = _temporal_flags(cfg)[::-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, chans[0])
        self.mid = ResBlock(chans[0], chans[0], cfg)
        self.blocks = nn.ModuleList()
        cin = chans[0]
        for i, c in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResBlock(cin, c, cfg))
                cin = c
            if i < len(chans) - 1:
                self.blocks.append(Upsample(c, temporal=t_flags[i]))
        self.norm_out = make_norm(cfg, cin)
        self.conv_out = CausalConv3d(cin, cfg.in_channels * self.p**2)
        self.shortcut = BlockRepeat(cfg.temporal_downsample, cfg.spatial_downsample) if cfg.shortcut else None
        self.in_channels = cfg.in_channels

    def forward(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, C_latent, T', h, w) -> (B, 3, T, h*s, w*s)."""
        h = self.mid(self.conv_in(z, cache), cache)
        for block in self.blocks:
            h = block(h, cache)
        x = self.conv_out(F.silu(self.norm_out(h)), cache)
        if self.p > 1:
            B, C, T, H, W = x.shape
            x = F.pixel_shuffle(x.transpose(1, 2).reshape(B * T, C, H, W), self.p)
            x = x.reshape(B, T, -1, H * self.p, W * self.p).transpose(1, 2)  # (B, 3, T, H p, W p)
        if self.shortcut is not None:
            x = x + self.shortcut(z[:, : self.in_channels], cache)
        return x


# ----------------------------------------------------------------------------- tiling


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


# ----------------------------------------------------------------------------- the VAE


@runtime_checkable
class VideoVAE(Protocol):
    """What the rest of the system needs from a video VAE (ours or a pretrained one)."""

    temporal_compression: int
    spatial_compression: int
    latent_channels: int

    def encode_latents(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode_latents(self, zn: torch.Tensor) -> torch.Tensor: ...

    def save_pretrained(self, directory: str | Path) -> None: ...


class CausalVideoVAE(nn.Module):
    """Causal 3D conv VAE: (B, 3, 1 + 4k, H, W) <-> (B, C, 1 + k, H/8, W/8)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    # -- the shared small interface
    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_downsample

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_downsample

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a (3, T, H, W) video."""
        self._check_video_shape(num_frames, height, width)
        tc, sc = self.temporal_compression, self.spatial_compression
        return (self.latent_channels, 1 + (num_frames - 1) // tc, height // sc, width // sc)

    def _check_video_shape(self, T: int, H: int, W: int) -> None:
        tc, sc = self.temporal_compression, self.spatial_compression
        assert (T - 1) % tc == 0, f"num_frames must be {tc}k+1 (1, {1 + tc}, {1 + 2 * tc}, ...) for a causal x{tc} VAE, got {T}"
        assert H % sc == 0 and W % sc == 0, f"height and width must be multiples of {sc}, got {H}x{W}"

    # -- encode / decode
    def encode(
        self,
        x: torch.Tensor,
        chunk_latent_frames: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 32,
    ) -> DiagonalGaussian:
        """Encode pixels to the posterior.

        Args:
            x: (B, 3, T, H, W) in [-1, 1], T = 1 + 4k.
            chunk_latent_frames: None = all frames at once; n = the first frame, then
                4n frames at a time through the causal cache (bounded memory, same result).
            tile_size, tile_overlap: spatial tiling in pixels (None = no tiling); both
                multiples of the spatial compression. Approximate at tile borders.
        Returns:
            DiagonalGaussian with mean/logvar (B, C, 1 + k, H/8, W/8).
        """
        assert x.dim() == 5, f"encode expects (B, 3, T, H, W), got {tuple(x.shape)}"
        self._check_video_shape(*x.shape[2:])
        chunk = self.temporal_compression * chunk_latent_frames if chunk_latent_frames else None
        run = lambda v: self._temporal(self.encoder, v, chunk)  # noqa: E731
        if tile_size is None:
            moments = run(x)  # (B, 2C, T', h, w)
        else:
            self._check_tiles(tile_size, tile_overlap)
            moments = tiled_apply(x, run, tile_size, tile_overlap, 1.0 / self.spatial_compression)
        mean, logvar = moments.chunk(2, dim=1)  # 2 x (B, C, T', h, w)
        return DiagonalGaussian(mean, logvar)

    def decode(
        self,
        z: torch.Tensor,
        chunk_latent_frames: int | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 32,
    ) -> torch.Tensor:
        """Decode raw latents (B, C, 1 + k, h, w) to pixels (B, 3, 1 + 4k, 8h, 8w), unclamped.

        chunk_latent_frames / tile_size / tile_overlap as in `encode` (tiles in output pixels).
        """
        assert z.dim() == 5 and z.shape[1] == self.latent_channels, (
            f"decode expects (B, {self.latent_channels}, T', h, w), got {tuple(z.shape)}"
        )
        run = lambda v: self._temporal(self.decoder, v, chunk_latent_frames)  # noqa: E731
        if tile_size is None:
            return run(z)
        self._check_tiles(tile_size, tile_overlap)
        sc = self.spatial_compression
        return tiled_apply(z, run, tile_size // sc, tile_overlap // sc, float(sc))

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Training pass: returns (reconstruction (B, 3, T, H, W), posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    @staticmethod
    def _temporal(net: nn.Module, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
        """Run `net` over time: all at once, or the first frame then `chunk` frames at a time.

        One cache dict per pass; an all-at-once pass is the one-chunk case, so both
        paths run the same code and agree by construction.
        """
        cache: Cache = {}
        if chunk is None:
            return net(x, cache)
        T = x.shape[2]
        pieces = [net(x[:, :, :1], cache)]
        pieces += [net(x[:, :, s : s + chunk], cache) for s in range(1, T, chunk)]
        return torch.cat(pieces, dim=2)

    def _check_tiles(self, tile_size: int, tile_overlap: int) -> None:
        sc = self.spatial_compression
        assert tile_size % sc == 0 and tile_overlap % sc == 0, (
            f"tile_size={tile_size} and tile_overlap={tile_overlap} must be multiples of {sc} (pixels)"
        )
        assert 0 <= tile_overlap < tile_size, f"tile_overlap {tile_overlap} must be in [0, tile_size={tile_size})"

    # -- normalised latents (what the diffusion model sees)
    def encode_latents(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None, **kwargs
    ) -> torch.Tensor:
        """(B, 3, T, H, W) -> normalised latents (z - shift) * scale, (B, C, T', h, w)."""
        posterior = self.encode(x, **kwargs)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.normalize_latents(z)

    def decode_latents(self, zn: torch.Tensor, **kwargs) -> torch.Tensor:
        """Inverse of `encode_latents`: normalised latents -> pixels (B, 3, T, H, W)."""
        return self.decode(self.denormalize_latents(zn), **kwargs)

    def _channel_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) shaped to broadcast over raw latents (B, C, T, H, W) or (C, T, H, W)."""
        shape = [1] * z.dim()
        shape[z.dim() - 4] = -1  # the channel axis: 1 for batched, 0 for one video
        mean = torch.tensor(self.config.latents_mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=z.dtype, device=z.device).view(shape)
        return mean, std

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, T, H, W) or (C, T, H, W) -> what the diffusion model sees."""
        if self.config.latents_mean is not None:
            mean, std = self._channel_stats(z)
            return (z - mean) / std
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def denormalize_latents(self, zn: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_latents`."""
        if self.config.latents_mean is not None:
            mean, std = self._channel_stats(zn)
            return zn * std + mean
        return zn / self.config.scaling_factor + self.config.shift_factor

    @torch.no_grad()
    def fit_latent_stats(self, latents: torch.Tensor, per_channel: bool = False) -> tuple[float, float]:
        """Set the normalisation so that these raw latents become zero-mean, unit-std.

        Args:
            latents: raw (un-normalised) latents, e.g. `encode(x).mode()` over a sample of the
                training set: (..., C, T, H, W) with the channel axis 4th from the end (any
                leading dims), or, with ``per_channel=False`` only, any shape (flattened).
            per_channel: also fit `latents_mean`/`latents_std` per channel (then they are
                what `normalize_latents` uses); otherwise clear them.
        Returns:
            (shift_factor, scaling_factor), the scalar fit, always stored in the config (and so
            in config.json) for reporting and for readers that know only the scalar pair.
        """
        z = latents.detach().double()
        std = z.std().item()
        assert std > 0, "latents have zero variance; cannot fit a scaling factor"
        self.config.shift_factor = float(z.mean().item())
        self.config.scaling_factor = float(1.0 / std)
        if per_channel:
            C = self.config.latent_channels
            assert z.dim() >= 4 and z.shape[-4] == C, f"per-channel fit needs (..., {C}, T, H, W), got {tuple(z.shape)}"
            zc = z.movedim(-4, 0).reshape(C, -1)  # (C, n)
            stds = zc.std(dim=1)
            assert bool((stds > 0).all()), f"a latent channel has zero variance: {stds.tolist()}"
            self.config.latents_mean = zc.mean(dim=1).tolist()
            self.config.latents_std = stds.tolist()
        else:
            self.config.latents_mean = self.config.latents_std = None
        return self.config.shift_factor, self.config.scaling_factor

    # -- checkpoints
    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (no pickle)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": CLASS_NAME, **asdict(self.config)}
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "CausalVideoVAE":
        d = Path(directory)
        raw = json.loads((d / "config.json").read_text())
        assert raw.get("_class_name") == CLASS_NAME, f"{d} holds a {raw.get('_class_name')!r}, not a {CLASS_NAME}"
        known = {f.name for f in fields(VAEConfig)}
        model = cls(VAEConfig(**{k: v for k, v in raw.items() if k in known}))
        model.load_state_dict(load_file(str(d / "model.safetensors"), device="cpu"))
        return model.to(device).eval()


# ----------------------------------------------------------------------------- bring your own VAE


# diffusers video VAE classes we know how to read compression factors and latent statistics from.
_DIFFUSERS_VAES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX")


class DiffusersVideoVAE:
    """A pretrained diffusers video VAE behind the `VideoVAE` interface.

    Supports `AutoencoderKLWan` (Wan 2.1: x4 time, x8 space, 16 channels,
    per-channel latents_mean/latents_std) and `AutoencoderKLCogVideoX`
    (x4 time, x8 space, 16 channels, one scaling_factor). diffusers is an
    optional extra (`pip install diffusers`); nothing is downloaded: point
    `from_pretrained` at a local directory.
    """

    def __init__(self, model):
        name = type(model).__name__
        assert name in _DIFFUSERS_VAES, f"unsupported diffusers VAE {name}; supported: {_DIFFUSERS_VAES}"
        self.model = model.eval()
        self.kind = name
        cfg = model.config
        if name == "AutoencoderKLWan":
            self.temporal_compression = int(cfg.scale_factor_temporal or 2 ** sum(cfg.temperal_downsample))
            self.spatial_compression = int(cfg.scale_factor_spatial or 2 ** (len(cfg.dim_mult) - 1))
            self.latent_channels = int(cfg.z_dim)
            self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
            self._inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        else:  # CogVideoX: temporal_compression_ratio in config, x2 per down block in space
            self.temporal_compression = int(cfg.temporal_compression_ratio)
            self.spatial_compression = 2 ** (len(cfg.block_out_channels) - 1)
            self.latent_channels = int(cfg.latent_channels)
            self._mean = torch.tensor(float(getattr(cfg, "shift_factor", None) or 0.0))
            self._inv_std = torch.tensor(float(cfg.scaling_factor))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "DiffusersVideoVAE":
        import diffusers  # optional extra

        raw = json.loads((Path(directory) / "config.json").read_text())
        name = raw.get("_class_name")
        assert name in _DIFFUSERS_VAES, f"{directory} holds {name!r}; supported diffusers VAEs: {_DIFFUSERS_VAES}"
        # low_cpu_mem_usage=False: the default wants the `accelerate` package, which we do not need.
        model = getattr(diffusers, name).from_pretrained(str(directory), local_files_only=True, low_cpu_mem_usage=False)
        return cls(model.to(device))

    def _stats(self, z: torch.Tensor):
        return self._mean.to(z), self._inv_std.to(z)

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> normalised latents (B, C, 1 + k, H/8, W/8)."""
        dist = self.model.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        mean, inv_std = self._stats(z)
        return (z - mean) * inv_std

    @torch.no_grad()
    def decode_latents(self, zn: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, 1 + k, h, w) -> pixels (B, 3, 1 + 4k, 8h, 8w)."""
        mean, inv_std = self._stats(zn)
        return self.model.decode(zn / inv_std + mean).sample

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(str(directory))


def load_vae(directory: str | Path, device: str | torch.device = "cpu") -> VideoVAE:
    """Load whichever VAE a directory holds, dispatching on config.json's `_class_name`."""
    raw = json.loads((Path(directory) / "config.json").read_text())
    name = raw.get("_class_name")
    if name == CLASS_NAME:
        return CausalVideoVAE.from_pretrained(directory, device=device)
    if name in _DIFFUSERS_VAES:
        return DiffusersVideoVAE.from_pretrained(directory, device=device)
    raise ValueError(f"{directory}/config.json names {name!r}; expected {CLASS_NAME!r} or one of {_DIFFUSERS_VAES}")
