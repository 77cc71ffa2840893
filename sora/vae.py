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
approximate. There is no self-attention block: it is global in space and costly on a CPU.

Files: this one holds the config, the posterior, the model and its checkpoints; the layers
are in :mod:`sora.vae_layers`, the tiling in :mod:`sora.tiling`, and a pretrained diffusers
video VAE (Wan 2.1, CogVideoX) stands in through :class:`sora.vae_diffusers.DiffusersVideoVAE`;
``load_vae(dir)`` picks the right class from config.json.

Usage (tiny CPU run):
    vae = CausalVideoVAE(VAEConfig.preset("tiny"))
    zn = vae.encode_latents(x)            # x: (B, 3, 17, 64, 112) in [-1, 1]
    x_hat = vae.decode_latents(zn)        # (B, 3, 17, 64, 112)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sora.tiling import tiled_apply
from sora.vae_diffusers import DIFFUSERS_VAES, DiffusersVideoVAE
from sora.vae_layers import (  # noqa: F401  (re-exported: `from sora.vae import ResBlock` etc.)
    BlockMean,
    BlockRepeat,
    Cache,
    CausalConv3d,
    Decoder,
    Downsample,
    Encoder,
    FrameGroupNorm,
    ResBlock,
    Upsample,
)

CLASS_NAME = "CausalVideoVAE"  # written to config.json so `load_vae` can dispatch


# ----------------------------------------------------------------------------- config


@dataclass
class VAEConfig:
    """Size and behaviour of a :class:`CausalVideoVAE`; the sizes to use are ``preset("tiny")``
    and ``preset("base")``."""

    in_channels: int = 3  # pixel channels (RGB)
    latent_channels: int = 16  # channels C of the latent
    base_channels: int = 96  # conv width of the first resolution level
    # Width multiplier of each resolution level; a x2 spatial resampling sits between levels,
    # so spatial_downsample == patch_size * 2 ** (len(channel_multipliers) - 1).
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # residual blocks per level
    temporal_downsample: int = 4  # x4 in time (a power of 2); the x2 steps go on the deepest levels
    spatial_downsample: int = 8  # x8 x8 in space
    # Pixel-unshuffle factor before the first conv (as in Wan 2.2): folds p x p pixels into
    # channels, so no conv runs at full resolution.
    patch_size: int = 1
    # "group": GroupNorm with per-frame statistics (see the module docstring); "none": no
    # normalisation (spatial tiling is then nearly exact).
    norm: str = "group"
    norm_groups: int = 32  # groups of the GroupNorm; must divide every level's width
    # Block-mean shortcut (residual autoencoding, DC-AE, Chen et al. 2024): each latent cell's mean
    # RGB is added to latent channels 0-2, and the decoder adds them back repeated over the cell.
    shortcut: bool = False
    # Normalised latents are (z - shift_factor) * scaling_factor (about unit variance for the
    # diffusion model); set from data with `fit_latent_stats`.
    scaling_factor: float = 1.0
    shift_factor: float = 0.0  # see scaling_factor
    # Per-channel statistics (diffusers' AutoencoderKLWan naming); when set they replace the
    # scalar pair: normalised latents are (z - latents_mean[c]) / latents_std[c].
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None  # see latents_mean; every value > 0

    def __post_init__(self):
        if self.latents_mean is not None or self.latents_std is not None:
            if self.latents_mean is None or self.latents_std is None:
                raise ValueError("set both latents_mean and latents_std, or neither")
            self.latents_mean = [float(v) for v in self.latents_mean]
            self.latents_std = [float(v) for v in self.latents_std]
            if not len(self.latents_mean) == len(self.latents_std) == self.latent_channels:
                raise ValueError(f"per-channel stats need {self.latent_channels} values (latent_channels), got "
                                 f"{len(self.latents_mean)}/{len(self.latents_std)}")
            if not all(v > 0 for v in self.latents_std):
                raise ValueError(f"latents_std must be positive, got {self.latents_std}")
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        levels = len(self.channel_multipliers)
        if levels < 1:
            raise ValueError("channel_multipliers needs at least one level")
        if self.spatial_downsample != self.patch_size * 2 ** (levels - 1):
            raise ValueError(f"spatial_downsample={self.spatial_downsample} must equal patch_size * 2**(levels-1) = "
                             f"{self.patch_size} * 2**{levels - 1}")
        if self.norm not in ("group", "none"):
            raise ValueError(f"norm must be 'group' or 'none', got {self.norm!r}")
        if self.shortcut and self.latent_channels < self.in_channels:
            raise ValueError("the shortcut needs latent_channels >= in_channels")
        for c in (self.base_channels * m for m in self.channel_multipliers):
            if self.norm != "none" and c % self.norm_groups != 0:
                raise ValueError(f"channel count {c} not divisible by norm_groups={self.norm_groups}")
        n_t = int(round(math.log2(self.temporal_downsample)))
        if 2**n_t != self.temporal_downsample:
            raise ValueError(f"temporal_downsample must be a power of 2, got {self.temporal_downsample}")
        if n_t > levels - 1:
            raise ValueError(f"x{self.temporal_downsample} in time needs {n_t} downsample steps, only {levels - 1} exist")

    @property
    def num_temporal_downsamples(self) -> int:
        return int(round(math.log2(self.temporal_downsample)))

    @classmethod
    def preset(cls, name: str) -> "VAEConfig":
        """Named sizes: "tiny" (shapes world on a 2-core CPU) and "base" (production)."""
        presets = {
            # ~0.5M parameters: pixel-unshuffle by 2, then two learned x2 downsamples; no norm,
            # block-mean shortcut
            "tiny": dict(latent_channels=8, base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, patch_size=2,
                         norm="none", shortcut=True),
            "base": dict(latent_channels=16, base_channels=96, channel_multipliers=(1, 2, 4, 4), num_res_blocks=2),
        }
        if name not in presets:
            raise ValueError(f"unknown VAE preset {name!r}; choose from {sorted(presets)}")
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
        if raw.get("_class_name") != CLASS_NAME:
            raise ValueError(f"{d} holds a {raw.get('_class_name')!r}, not a {CLASS_NAME}")
        known = {f.name for f in fields(VAEConfig)}
        model = cls(VAEConfig(**{k: v for k, v in raw.items() if k in known}))
        model.load_state_dict(load_file(str(d / "model.safetensors"), device="cpu"))
        return model.to(device).eval()


def load_vae(directory: str | Path, device: str | torch.device = "cpu") -> VideoVAE:
    """Load whichever VAE a directory holds, dispatching on config.json's `_class_name`."""
    raw = json.loads((Path(directory) / "config.json").read_text())
    name = raw.get("_class_name")
    if name == CLASS_NAME:
        return CausalVideoVAE.from_pretrained(directory, device=device)
    if name in DIFFUSERS_VAES:
        return DiffusersVideoVAE.from_pretrained(directory, device=device)
    raise ValueError(f"{directory}/config.json names {name!r}; expected {CLASS_NAME!r} or one of {DIFFUSERS_VAES}")
