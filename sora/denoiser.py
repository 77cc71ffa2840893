"""What the pipeline, the trainer, bulk generation and the endpoint need from a denoiser.

Two implementations: our :class:`sora.dit.DiT` and :class:`sora.wan.WanDenoiser` (diffusers'
``WanTransformer3DModel`` behind the same call). Code above ``sora/`` talks to either one
through this protocol and the :class:`DenoiserSpec` that :func:`spec_of` returns for it.

The call (both implementations, shapes as in :meth:`sora.dit.DiT.forward`)::

    v = model(x, positions, timesteps, seq_ids, text, text_mask, valid=None)

    x          (N, D_in)  patch tokens of B videos (``sora.patches`` layout: t-major, then h,
                          then w; features (C, pt, ph, pw), channel slowest)
    positions  (N, 3)     integer (t, h, w) grid position of each token
    timesteps  (N,)       per-token time in [0, 1] of ``sora.flow``: 0 = data, 1 = noise; a
                          clean conditioning token has t = 0 inside a noisy video
    seq_ids    (N,)       which of the B videos each token belongs to
    text       (B, L, text_dim) text-encoder states; text_mask (B, L) bool. A row with no True
                          is the unconditional prompt (classifier-free guidance and its
                          training dropout), whatever the model's own null prompt is.
    valid      (N,) bool  optional: False on padding tokens, whose outputs are garbage
    v          (N, D_in)  the rectified-flow velocity eps - x0 (``sora.flow.velocity_target``)

So the samplers (``sora.samplers``), the guided velocity and ``sora.flow.flow_matching_loss``
run unchanged on either. What differs between models is declared, not branched on: the
spec says which conditioning modes a model can take, whether one forward may mix videos
of different shapes efficiently (``packed``), and what its latents and text look like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from sora.flow import CONDITIONING_MODES

# Which conditioning frames each generation mode of ``sora.pipeline`` holds clean (t = 0):
# the mechanism of ``sora.flow.conditioning_mask``. Modes with none (text-to-video, SDEdit-style
# edit and draft refinement) run on any denoiser.
MODE_CONDITIONING: dict[str, tuple[str, ...]] = {
    "text-to-video": (),
    "edit": (),
    "draft": (),
    "image-to-video": ("first",),
    "extend-forward": ("first_k",),
    "extend-backward": ("last_k",),
    "join": ("first_k", "last_k"),
    "loop": ("first_last",),
}


@runtime_checkable
class Denoiser(Protocol):
    """A velocity model over packed patch tokens (see the module docstring for the call).

    ``config`` carries ``patch_size``, ``in_channels`` and ``text_dim`` (our ``DiTConfig`` and
    diffusers' Wan config both do); everything else about the model is its
    :class:`DenoiserSpec` (:func:`spec_of`)."""

    config: Any

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, timesteps: torch.Tensor, seq_ids: torch.Tensor,
                 text: torch.Tensor, text_mask: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class DenoiserSpec:
    """What a denoiser is, for checks made before any work starts."""

    name: str  # for error messages, e.g. "sora-dit" or "Wan2.1 T2V (WanTransformer3DModel) at DIR"
    patch_size: tuple[int, int, int]  # (pt, ph, pw) latent cells per token
    latent_channels: int  # C of the latents it denoises (the VAE's latent channels)
    text_dim: int  # width of the text states it reads
    # Length its text states are padded to with zeros (Wan: 512, as its pipeline does); None: any
    # length, padding masked out.
    text_len: int | None
    # True: one forward mixes videos of different shapes at no extra cost (block-diagonal
    # attention over a pack). False: mixed shapes run as one batch per shape; train in buckets.
    packed: bool
    # The ``sora.flow.CONDITIONING_MODES`` it takes: clean frames at t = 0 among noisy ones
    # need per-token timesteps the model was trained with. ("none",) = text-to-video only.
    conditioning_modes: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = set(self.conditioning_modes) - set(CONDITIONING_MODES)
        assert not unknown, f"unknown conditioning modes {sorted(unknown)}; known: {CONDITIONING_MODES}"
        assert "none" in self.conditioning_modes, "every denoiser takes plain (unconditioned) videos"

    @property
    def clean_frames(self) -> bool:
        """Whether the model takes known frames as clean tokens (image-to-video, extension, ...)."""
        return any(m != "none" for m in self.conditioning_modes)

    def generation_modes(self) -> tuple[str, ...]:
        """The ``sora.pipeline`` modes this model can run."""
        return tuple(m for m, needs in MODE_CONDITIONING.items() if set(needs) <= set(self.conditioning_modes))

    def check_generation_mode(self, mode: str) -> None:
        """Raise ValueError naming the mode and the model when the model cannot run ``mode``."""
        if mode not in MODE_CONDITIONING:
            raise ValueError(f"unknown mode {mode!r}; modes: {list(MODE_CONDITIONING)}")
        missing = [c for c in MODE_CONDITIONING[mode] if c not in self.conditioning_modes]
        if missing:
            raise ValueError(
                f"mode {mode!r} holds given frames clean ({', '.join(missing)} conditioning), which {self.name} "
                f"cannot do: it supports {list(self.generation_modes())}. Use a model trained with per-token "
                "timesteps (our DiT, or a Wan 2.2 TI2V directory) for this mode.")

    def check_conditioning(self, probs: dict[str, float]) -> None:
        """Raise ValueError when training would draw a conditioning mode the model cannot take
        (``FlowConfig.cond_mode_probs``)."""
        bad = sorted(m for m, p in probs.items() if p > 0 and m not in self.conditioning_modes)
        if bad:
            raise ValueError(f"conditioning modes {bad} are not supported by {self.name} (it takes "
                             f"{list(self.conditioning_modes)}): set their probability to 0")


def spec_of(model) -> DenoiserSpec:
    """The :class:`DenoiserSpec` of a denoiser: its ``denoiser_spec`` attribute, or for our DiT
    (which predates this protocol) one read from its config. Unwraps DDP (``.module``)."""
    model = getattr(model, "module", model)
    spec = getattr(model, "denoiser_spec", None)
    if spec is not None:
        return spec
    from sora.dit import DiT

    if isinstance(model, DiT):
        cfg = model.config
        return DenoiserSpec(name="sora-dit", patch_size=tuple(int(p) for p in cfg.patch_size),
                           latent_channels=int(cfg.in_channels), text_dim=int(cfg.text_dim), text_len=None,
                           packed=True, conditioning_modes=CONDITIONING_MODES)
    raise TypeError(f"{type(model).__name__} is not a denoiser: expected sora.dit.DiT or a model with a "
                    "`denoiser_spec` (e.g. sora.wan.WanDenoiser)")
