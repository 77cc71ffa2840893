"""The layers of the causal video VAE (:mod:`sora.vae`): causal 3D convolutions that run chunk
by chunk through a cache, per-frame GroupNorm, residual blocks, space/time resampling, the
block-mean shortcut, and the encoder and decoder built from them.

A temporal cache (``Cache``) maps each stateful module to what it carries into the next chunk;
one dict per pass, so an all-at-once pass is the one-chunk case of a chunked one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from sora.vae import VAEConfig

Cache = dict  # a temporal cache: stateful module -> what it carries into the next chunk


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
        # network detect borders, so a spatial tile's edge pixels would come out different from
        # the same pixels inside the full frame. Time is padded by hand (causally), see forward.
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
