"""A pretrained diffusers video VAE (Wan 2.1, CogVideoX) behind the same small interface as
:class:`sora.vae.CausalVideoVAE` (``sora.vae.VideoVAE``); ``sora.vae.load_vae`` picks it from a
directory's config.json. diffusers is an optional dependency, imported only to load one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# diffusers video VAE classes we know how to read compression factors and latent statistics from.
DIFFUSERS_VAES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX")


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
        if name not in DIFFUSERS_VAES:
            raise ValueError(f"unsupported diffusers VAE {name}; supported: {DIFFUSERS_VAES}")
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
        if name not in DIFFUSERS_VAES:
            raise ValueError(f"{directory} holds {name!r}; supported diffusers VAEs: {DIFFUSERS_VAES}")
        # low_cpu_mem_usage=False: the default wants the `accelerate` package, which we do not need.
        model = getattr(diffusers, name).from_pretrained(str(directory), local_files_only=True, low_cpu_mem_usage=False)
        return cls(model.to(device))

    def _stats(self, z: torch.Tensor):
        return self._mean.to(z), self._inv_std.to(z)

    def to(self, device: str | torch.device) -> "DiffusersVideoVAE":
        """Move the model and its latent statistics to ``device``."""
        self.model.to(device)
        self._mean, self._inv_std = self._mean.to(device), self._inv_std.to(device)
        return self

    def _tiling(self, tile_size: int | None, tile_overlap: int | None) -> None:
        """diffusers' own spatial tiling for frames larger than ``tile_size`` pixels (None: off)."""
        if tile_size is None:
            self.model.disable_tiling()
            return
        if tile_size % self.spatial_compression:
            raise ValueError(f"tile_size must be a multiple of the VAE's spatial compression "
                             f"{self.spatial_compression}, got {tile_size}")
        if self.kind == "AutoencoderKLWan":
            overlap = tile_size // 4 if tile_overlap is None else tile_overlap
            stride = max(self.spatial_compression, (tile_size - overlap) // self.spatial_compression
                         * self.spatial_compression)
            self.model.enable_tiling(tile_size, tile_size, stride, stride)
        else:  # CogVideoX: tiles overlap by its default factor
            self.model.enable_tiling(tile_size, tile_size)

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
                       chunk_latent_frames: int | None = None, tile_size: int | None = None,
                       tile_overlap: int | None = None) -> torch.Tensor:
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> normalised latents (B, C, 1 + k, H/s, W/s).

        ``chunk_latent_frames`` is accepted for :class:`sora.vae.CausalVideoVAE`'s signature and
        not needed: these VAEs already encode causally a few frames at a time with a feature
        cache, so memory does not grow with the clip's length. ``tile_size``: encode frames
        in overlapping spatial tiles of that many pixels (diffusers' ``enable_tiling``)."""
        del chunk_latent_frames
        self._tiling(tile_size, tile_overlap)
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
