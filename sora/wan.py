"""Open-weight Wan models (Wan 2.1 T2V, Wan 2.2 TI2V) behind our denoiser protocol.

A diffusers-format Wan directory::

    DIR/model_index.json   {"_class_name": "WanPipeline", "expand_timesteps": false, ...}
    DIR/transformer/       WanTransformer3DModel          -> WanDenoiser (sora.denoiser protocol)
    DIR/vae/               AutoencoderKLWan               -> sora.vae.DiffusersVideoVAE
    DIR/text_encoder/      UMT5EncoderModel  } together   -> WanTextEncoder (512 tokens)
    DIR/tokenizer/         T5 tokenizer      }
    DIR/scheduler/         its shift gives the Euler time grid (flow_match_grid)

    model = load_wan("Wan2.1-T2V-1.3B-Diffusers")        # local, offline; checked before loading
    v = model.denoiser(x, positions, t, seq_ids, text, text_mask)   # as our DiT

How Wan's conventions map onto ours (``sora.flow``), checked against diffusers' ``WanPipeline``
and ``FlowMatchEulerDiscreteScheduler`` in tests/test_wan.py:

- **Time.** Ours: t in [0, 1], 0 = data, 1 = noise, x_t = (1 - t) x0 + t eps. diffusers' flow-match
  sigma is the same number, and Wan's ``timestep`` is sigma x ``num_train_timesteps`` (1000).
- **Velocity.** Wan predicts eps - x0, our target: the scheduler's Euler step
  x <- x + (sigma_next - sigma) * output is our ``sora.samplers.euler`` step. No sign change.
- **Latents.** Our tokens are ``sora.patches.patchify`` of the VAE-normalised latent
  ((z - latents_mean) / latents_std, as WanPipeline), patch (1, 2, 2). Wan takes the (B, C, T, H, W)
  latent and patchifies it with its own Conv3d; its token order (t, then h, then w) is ours.
- **Per-token timesteps.** Wan 2.2 TI2V (``expand_timesteps``) takes one timestep per token: a
  clean first frame has timestep 0 - our clean conditioning tokens at t = 0. Wan 2.1 takes one
  timestep per video, so it runs text-to-video (and SDEdit-style edit/draft) only.
- **Text.** UMT5 states of the cleaned prompt, zero beyond its tokens, padded to 512 with zeros.
  The unconditional prompt (an all-False text mask here) is Wan's: the states of the empty
  prompt "", which is what WanPipeline's classifier-free guidance feeds.
- **Packing.** Wan attends over one video of one shape: a pack is run as one batch per shape.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sora.denoiser import DenoiserSpec
from sora.flow import CONDITIONING_MODES
from sora.patches import patchify_batch, position_ids, unpatchify_batch
from sora.text_encoder import TextEncoder

TEXT_LEN = 512  # Wan's text length: UMT5 states padded with zeros to 512 tokens
PIPELINES = ("WanPipeline",)  # model_index.json _class_name values we load
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
COMPONENT_CLASSES = {"transformer": ("WanTransformer3DModel",), "vae": ("AutoencoderKLWan",),
                     "text_encoder": ("UMT5EncoderModel",)}
# Schedulers whose config gives the flow shift Wan samples with: key holding it.
SHIFT_KEYS = {"FlowMatchEulerDiscreteScheduler": "shift", "UniPCMultistepScheduler": "flow_shift",
              "DPMSolverMultistepScheduler": "flow_shift"}
# Generation defaults of the released checkpoints (Wan 2.1 T2V 480p, Wan 2.2 TI2V-5B 720p): size,
# frames and fps from their model cards; 50 steps and guidance 5.0 as WanPipeline's own defaults.
DEFAULTS = {
    "t2v": {"width": 832, "height": 480, "num_frames": 81, "fps": 16, "num_inference_steps": 50,
            "guidance_scale": 5.0, "sampler": "euler"},
    "ti2v": {"width": 1280, "height": 704, "num_frames": 121, "fps": 24, "num_inference_steps": 50,
             "guidance_scale": 5.0, "sampler": "euler"},
}


# ----------------------------------------------------------------------------------------
# The directory, checked before anything loads
# ----------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def is_wan_dir(path: str) -> bool:
    """True when ``path`` holds a diffusers model_index.json naming a Wan pipeline class (the
    dispatch test; :func:`inspect_wan_dir` says what is wrong with one)."""
    index = os.path.join(str(path), "model_index.json")
    if not os.path.isfile(index):
        return False
    try:
        return str(_read_json(index).get("_class_name", "")).startswith("Wan")
    except (OSError, ValueError):
        return False


def inspect_wan_dir(path: str) -> dict[str, Any]:
    """Read and check a diffusers Wan directory's JSON files; no weights are touched.

    Returns ``{"index", "transformer", "vae", "text_encoder", "scheduler"}`` (the parsed
    model_index.json and component configs). Raises FileNotFoundError for a missing directory
    or file and ValueError for a directory of another architecture or an unsupported Wan
    variant, naming what it found and what would work."""
    path = str(path)
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a local directory (a Wan model is a diffusers directory; nothing "
                                "is downloaded)")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{path} is not a diffusers model directory: no model_index.json")
    index = _read_json(index_path)
    cls = index.get("_class_name")
    if cls is None:
        hint = (" It is a sora-ray model directory: load it with SoraPipeline.from_pretrained."
                if "format" in index else "")
        raise ValueError(f"{index_path} names no diffusers pipeline (_class_name).{hint}")
    if cls not in PIPELINES:
        what = ("a Wan variant with image-encoder conditioning (Wan 2.1 I2V/FLF2V, VACE, Animate)"
                if cls.startswith("Wan") else "another architecture")
        raise ValueError(f"{path} holds a {cls} ({what}); supported: {list(PIPELINES)} directories "
                         "(Wan 2.1 T2V, Wan 2.2 TI2V)")
    if index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0] is not None:
        raise ValueError(f"{path} is a two-expert Wan 2.2 model (transformer_2, boundary_ratio "
                         f"{index.get('boundary_ratio')}); supported: single-transformer Wan 2.1 T2V and Wan 2.2 TI2V")
    configs: dict[str, Any] = {"index": index}
    for name in COMPONENTS:
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise ValueError(f"{index_path} has no {name!r} component; a Wan directory needs {list(COMPONENTS)}")
        allowed = COMPONENT_CLASSES.get(name)
        if allowed and entry[1] not in allowed:
            raise ValueError(f"{path}/{name} is a {entry[1]}, expected {' or '.join(allowed)}")
        if not os.path.isdir(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}/{name}/ is missing (model_index.json lists it)")
        if name == "tokenizer":
            continue
        cfg_file = "scheduler_config.json" if name == "scheduler" else "config.json"
        cfg_path = os.path.join(path, name, cfg_file)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path} is missing")
        configs[name] = _read_json(cfg_path)
    tr, vae, te = configs["transformer"], configs["vae"], configs["text_encoder"]
    if tr.get("image_dim") is not None or tr.get("in_channels", 16) != tr.get("out_channels", 16):
        raise ValueError(f"{path}/transformer takes image latents concatenated on channels or CLIP image states "
                         f"(in_channels {tr.get('in_channels')}, out_channels {tr.get('out_channels')}, image_dim "
                         f"{tr.get('image_dim')}): a Wan I2V transformer; supported: T2V and TI2V transformers")
    if int(vae.get("z_dim", 16)) != int(tr.get("in_channels", 16)):
        raise ValueError(f"{path}: the VAE has {vae.get('z_dim')} latent channels, the transformer takes "
                         f"{tr.get('in_channels')}")
    if int(te.get("d_model", -1)) != int(tr.get("text_dim", 4096)):
        raise ValueError(f"{path}: the text encoder is {te.get('d_model')} wide, the transformer reads "
                         f"{tr.get('text_dim')}-wide text states")
    sched = configs["scheduler"].get("_class_name")
    if sched not in SHIFT_KEYS:
        raise ValueError(f"{path}/scheduler is a {sched}; its flow shift is read from {list(SHIFT_KEYS)}")
    return configs


def wan_index(path: str) -> dict[str, Any]:
    """A Wan directory as a ``sora.model_dir`` index (checked by :func:`inspect_wan_dir`; no
    weights read): components at their diffusers places (absolute paths), UMT5's 512 tokens, the
    scheduler config as ``flow`` (sampled on :func:`flow_match_grid`), the released checkpoints'
    ``defaults``, and under ``"wan"`` the directory and whether it takes per-token timesteps."""
    from sora.model_dir import FORMAT

    path = os.path.abspath(str(path))
    configs = inspect_wan_dir(path)
    expand = bool(configs["index"].get("expand_timesteps", False))
    return {
        "format": FORMAT, "vae": os.path.join(path, "vae"), "dit": os.path.join(path, "transformer"),
        "upsampler": None, "text_encoder": {"path": os.path.join(path, "text_encoder"), "max_length": TEXT_LEN},
        "patch_size": [int(p) for p in configs["transformer"].get("patch_size", (1, 2, 2))],
        "flow": {"scheduler": configs["scheduler"]},
        "defaults": dict(DEFAULTS["ti2v" if expand else "t2v"]),
        "training": {},
        "wan": {"base": path, "pipeline": configs["index"]["_class_name"], "expand_timesteps": expand},
    }


# ----------------------------------------------------------------------------------------
# The denoiser
# ----------------------------------------------------------------------------------------


class WanDenoiser(nn.Module):
    """diffusers' ``WanTransformer3DModel`` as a :class:`sora.denoiser.Denoiser`.

    ``expand_timesteps``: the model takes one timestep per token (Wan 2.2 TI2V), so clean
    conditioning frames work; else one per video. ``null_text`` (L0, text_dim): the text states of
    the empty prompt, used for rows with an all-False text mask (None: such rows are an error).
    ``num_train_timesteps``: Wan's timestep is t x this (the scheduler's, 1000)."""

    def __init__(self, transformer: nn.Module, expand_timesteps: bool = False, null_text: torch.Tensor | None = None,
                 text_len: int = TEXT_LEN, num_train_timesteps: int = 1000, name: str = "Wan"):
        super().__init__()
        cfg = transformer.config
        assert cfg.in_channels == (cfg.out_channels or cfg.in_channels), "Wan I2V transformers are not denoisers here"
        self.transformer = transformer
        self.expand_timesteps = bool(expand_timesteps)
        self.text_len = int(text_len)
        self.num_train_timesteps = int(num_train_timesteps)
        self.name = name
        if null_text is not None:
            assert null_text.dim() == 2 and null_text.shape[1] == cfg.text_dim, (
                f"null_text must be (L, {cfg.text_dim}), got {tuple(null_text.shape)}")
            null_text = self._pad_text(null_text[None].float())[0]  # (text_len, text_dim)
        self.register_buffer("null_text", null_text, persistent=False)

    # -- what the rest of the system reads --------------------------------------------

    @property
    def config(self):
        """The transformer's config: ``patch_size``, ``in_channels``, ``text_dim`` as DiTConfig."""
        return self.transformer.config

    @property
    def denoiser_spec(self) -> DenoiserSpec:
        cfg = self.transformer.config
        modes = CONDITIONING_MODES if self.expand_timesteps else ("none",)
        return DenoiserSpec(name=self.name, patch_size=tuple(int(p) for p in cfg.patch_size),
                            latent_channels=int(cfg.in_channels), text_dim=int(cfg.text_dim), text_len=self.text_len,
                            packed=False, conditioning_modes=tuple(modes))

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, for per-block FSDP / compile (as ``DiT.blocks``)."""
        return self.transformer.blocks

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self.transformer.gradient_checkpointing)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        """``model.gradient_checkpointing = True`` as on our DiT: diffusers' per-block checkpointing."""
        if on:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def save_pretrained(self, directory: str) -> None:
        """The transformer in diffusers' layout (config.json + diffusion_pytorch_model.safetensors)."""
        self.transformer.save_pretrained(directory)

    # -- text ------------------------------------------------------------------------

    def _pad_text(self, states: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, text_len, D): zero-padded, or trimmed when only zeros are cut."""
        B, L, D = states.shape
        if L >= self.text_len:
            assert not bool(states[:, self.text_len:].any()), (
                f"text has real tokens beyond {self.name}'s {self.text_len}: encode with max_length {self.text_len}")
            return states[:, : self.text_len]
        return torch.cat([states, states.new_zeros(B, self.text_len - L, D)], dim=1)

    def text_states(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Our (text (B, L, D), mask (B, L)) -> Wan's encoder_hidden_states (B, text_len, D):
        masked positions zero, zero-padded to ``text_len``; all-False rows get the empty prompt's."""
        assert text_mask.shape == text.shape[:2] and text_mask.dtype == torch.bool, (
            f"text_mask must be bool {tuple(text.shape[:2])}, got {text_mask.dtype} {tuple(text_mask.shape)}")
        states = self._pad_text(text * text_mask[..., None].to(text.dtype))  # (B, text_len, D)
        uncond = ~text_mask.any(dim=1)  # (B,)
        if bool(uncond.any()):
            if self.null_text is None:
                raise ValueError(f"{self.name} was given an empty text mask (the unconditional prompt) but has no "
                                 "empty-prompt text states: load it with sora.wan.load_wan, or pass null_text=")
            states = torch.where(uncond[:, None, None], self.null_text.to(states), states)
        return states

    # -- the call ------------------------------------------------------------------------

    def forward_latents(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                        text_mask: torch.Tensor) -> torch.Tensor:
        """Velocity on same-shape latents, Wan's own layout.

        latents (B, C, T, H, W) normalised; timesteps (B,) or per token (B, N) in [0, 1], N the
        token count of one video; text (B, L, text_dim), text_mask (B, L). Returns (B, C, T, H, W)."""
        B = latents.shape[0]
        if timesteps.dim() == 2 and not self.expand_timesteps:
            if not bool((timesteps == timesteps[:, :1]).all()):
                raise ValueError(f"{self.name} takes one timestep per video, not clean conditioning frames: "
                                 f"it supports {list(self.denoiser_spec.generation_modes())}")
            timesteps = timesteps[:, 0]  # (B,)
        if timesteps.dim() == 1 and self.expand_timesteps:
            pt, ph, pw = self.transformer.config.patch_size
            n = math.prod(s // p for s, p in zip(latents.shape[2:], (pt, ph, pw)))
            timesteps = timesteps[:, None].expand(B, n)  # (B, N): as WanPipeline does for TI2V
        # float32 before scaling: t x 1000 in bf16 would round the timestep to a few values
        timestep = timesteps.float() * self.num_train_timesteps  # (B,) or (B, N)
        dtype = self.transformer.dtype
        out = self.transformer(hidden_states=latents.to(dtype), timestep=timestep,
                               encoder_hidden_states=self.text_states(text, text_mask).to(dtype),
                               return_dict=False)[0]  # (B, C, T, H, W)
        return out

    def forward(self, x: torch.Tensor, positions: torch.Tensor, timesteps: torch.Tensor, seq_ids: torch.Tensor,
                text: torch.Tensor, text_mask: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The :class:`sora.denoiser.Denoiser` call: (N, D_in) tokens of B videos -> (N, D_in) velocity.

        Each video's tokens must be a whole (t, h, w) grid in patchify order (what
        ``position_ids`` gives); videos of one shape run as one Wan batch, each shape once.
        Padding tokens (``valid`` False) take no part and get 0."""
        N, D_in = x.shape
        B = text.shape[0]
        assert positions.shape == (N, 3) and timesteps.shape == (N,) and seq_ids.shape == (N,), (
            f"per-token inputs disagree: x {tuple(x.shape)}, positions {tuple(positions.shape)}, "
            f"timesteps {tuple(timesteps.shape)}, seq_ids {tuple(seq_ids.shape)}")
        cfg = self.transformer.config
        patch = tuple(int(p) for p in cfg.patch_size)
        C = int(cfg.in_channels)
        assert D_in == C * math.prod(patch), f"tokens are {D_in} wide; {self.name} takes {C} x {patch} patches"
        rows = torch.arange(N, device=x.device) if valid is None else valid.nonzero()[:, 0]  # (M,)
        ids = seq_ids[rows].long()
        rows = rows[torch.argsort(ids, stable=True)]  # grouped by video, token order kept
        counts = torch.bincount(ids, minlength=B).tolist()
        groups: dict[tuple[int, int, int], list[tuple[int, torch.Tensor]]] = {}
        start = 0
        for b, n in enumerate(counts):
            if n == 0:
                continue
            idx = rows[start: start + n]  # (n,) this video's rows
            start += n
            pos = positions[idx]  # (n, 3)
            grid = tuple(int(g) for g in pos.amax(dim=0) + 1)
            if math.prod(grid) != n or not torch.equal(pos, position_ids(grid, pos.device).to(pos.dtype)):
                raise ValueError(f"video {b} of the pack is not a whole token grid in patchify order: {self.name} "
                                 "runs each video as a (C, T, H, W) latent")
            groups.setdefault(grid, []).append((b, idx))
        out = x.new_zeros(N, D_in)
        for grid, members in groups.items():
            idx = torch.stack([i for _, i in members])  # (G, n)
            videos = torch.tensor([b for b, _ in members], device=x.device)  # (G,)
            latents = unpatchify_batch(x[idx], grid, patch, C)  # (G, C, T, H, W)
            v = self.forward_latents(latents, timesteps[idx], text[videos], text_mask[videos])  # (G, C, T, H, W)
            out[idx] = patchify_batch(v, patch).to(out.dtype)  # (G, n, D_in)
        return out


# ----------------------------------------------------------------------------------------
# Text encoder and time grid
# ----------------------------------------------------------------------------------------


class WanTextEncoder(TextEncoder):
    """UMT5 with Wan's prompt handling: the prompt cleaned as WanPipeline does (ftfy when
    installed, HTML unescaping, whitespace collapsed), at most 512 tokens with the end-of-sequence
    token, states zero beyond the prompt. :class:`sora.text_encoder.TextEncoder` otherwise."""

    def __init__(self, model, tokenizer, name_or_path: str, max_length: int = TEXT_LEN,
                 device: str | torch.device = "cpu"):
        super().__init__(model, tokenizer, name_or_path, max_length=max_length, device=device)

    @torch.no_grad()
    def encode(self, texts: list[str], fixed_length: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        assert isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts), "texts: a list of str"
        return super().encode([prompt_clean(t) for t in texts], fixed_length=fixed_length)


def flow_shift(scheduler_config: dict[str, Any]) -> float:
    """The flow shift of a Wan scheduler config (``shift`` or ``flow_shift`` by class)."""
    key = SHIFT_KEYS.get(scheduler_config.get("_class_name"))
    if key is None:
        raise ValueError(f"no flow shift in a {scheduler_config.get('_class_name')} config; known: {list(SHIFT_KEYS)}")
    return float(scheduler_config.get(key, 1.0))


def flow_match_grid(steps: int, scheduler_config: dict[str, Any] | None = None, shift: float | None = None
                    ) -> torch.Tensor:
    """Euler sampling times (steps + 1,) float32 from 1 towards 0, ending at 0: exactly the sigmas
    of diffusers' ``FlowMatchEulerDiscreteScheduler`` (a linspace from sigma_max to the shifted
    sigma_min over ``steps`` points, SD3-shifted, then 0). Walk it with ``sora.samplers.euler``.

    ``scheduler_config``: a FlowMatchEulerDiscreteScheduler config used as is, or another Wan
    scheduler's config whose flow shift is taken; ``shift`` overrides the shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    cfg = dict(scheduler_config or {"_class_name": "FlowMatchEulerDiscreteScheduler"})
    if cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        if cfg.get("use_dynamic_shifting"):
            raise ValueError("a scheduler with use_dynamic_shifting needs a per-resolution mu; Wan uses a fixed shift")
        if shift is not None:
            cfg["shift"] = float(shift)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
            shift=flow_shift(cfg) if shift is None else float(shift))
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.to(torch.float32).clone()  # (steps + 1,)


# ----------------------------------------------------------------------------------------
# Loading a directory
# ----------------------------------------------------------------------------------------


@dataclass
class WanModel:
    """A loaded Wan directory: denoiser, VAE and text encoder, plus its scheduler settings."""

    path: str
    denoiser: WanDenoiser
    vae: Any  # sora.vae.DiffusersVideoVAE (normalised latents, as WanPipeline)
    text_encoder: WanTextEncoder | None
    scheduler_config: dict[str, Any]
    index: dict[str, Any]  # model_index.json
    defaults: dict[str, Any] = field(default_factory=dict)  # generation defaults (DEFAULTS)

    @property
    def spec(self) -> DenoiserSpec:
        return self.denoiser.denoiser_spec

    def time_grid(self, steps: int) -> torch.Tensor:
        """(steps + 1,) Euler times of this model's scheduler shift (:func:`flow_match_grid`)."""
        return flow_match_grid(steps, self.scheduler_config)


def load_text_encoder(path: str, device: str | torch.device = "cpu") -> WanTextEncoder:
    """The UMT5 encoder and tokenizer of a Wan directory (``text_encoder/``, ``tokenizer/``)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    model = UMT5EncoderModel.from_pretrained(os.path.join(path, "text_encoder"), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
    return WanTextEncoder(model, tokenizer, os.path.join(path, "text_encoder"), device=device)


def load_wan(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             text_encoder: bool = True, null_text: torch.Tensor | None = None) -> WanModel:
    """Load a diffusers Wan directory from a local path, offline (checked first by
    :func:`inspect_wan_dir`: a directory of another architecture fails before any weights load).

    ``dtype`` applies to the transformer (e.g. torch.bfloat16 on a GPU); the VAE and the text
    encoder stay as stored. ``text_encoder=False`` skips UMT5 (training on encoded latents): pass
    the empty prompt's states as ``null_text`` (L0, text_dim) so dropped prompts work."""
    from diffusers import WanTransformer3DModel

    from sora.vae import DiffusersVideoVAE

    path = os.path.abspath(str(path))
    configs = inspect_wan_dir(path)
    index = configs["index"]
    expand = bool(index.get("expand_timesteps", False))
    te = load_text_encoder(path, device) if text_encoder else None
    if te is not None and null_text is None:
        states, mask = te.encode([""])  # WanPipeline's unconditional prompt
        null_text = states[0][mask[0]]  # (L0, text_dim)
    transformer = WanTransformer3DModel.from_pretrained(os.path.join(path, "transformer"), local_files_only=True,
                                                        torch_dtype=dtype).to(device).eval()
    kind = "TI2V, per-token timesteps" if expand else "T2V, one timestep per video"
    denoiser = WanDenoiser(transformer, expand_timesteps=expand, null_text=null_text,
                           num_train_timesteps=int(configs["scheduler"].get("num_train_timesteps", 1000)),
                           name=f"the Wan model at {path} ({kind})").to(device)
    vae = DiffusersVideoVAE.from_pretrained(os.path.join(path, "vae"), device=device)
    return WanModel(path=path, denoiser=denoiser, vae=vae, text_encoder=te, scheduler_config=configs["scheduler"],
                    index=index, defaults=dict(DEFAULTS["ti2v" if expand else "t2v"]))
