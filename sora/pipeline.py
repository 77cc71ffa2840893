"""`SoraPipeline`: every generation mode from one model directory, called like diffusers.

    pipe = SoraPipeline.from_pretrained("model")                     # see sora.model_dir
    out = pipe("A large red circle moves from left to right across a black background.",
               width=160, height=90, num_frames=24, num_inference_steps=30, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0))
    export_to_video(out.frames, "red.mp4", fps=out.fps)              # out.frames: (24, 90, 160, 3) uint8
    out = pipe.generate(GenerationRequest("A red circle.", seconds=2, seed=0))   # the same, as a request

Modes (``mode=``, or the helpers ``image_to_video`` / ``extend`` / ``join`` / ``loop`` / ``edit`` /
``draft_and_refine``), all one mechanism - known latent frames held clean at t = 0 while the rest
is denoised (``sora.conditioning`` plans which):

    text-to-video     prompt only
    image-to-video    image=  is frame 0
    extend-forward    video=  comes first, new frames after it
    extend-backward   video=  comes last, new frames before it
    join              video=(a, b): the end of a, a generated transition, the start of b
    loop              the last frame equals the first (image= or video= optional)
    edit              video=  noised to ``strength`` and denoised with the prompt (SDEdit)
    draft             a fast low-resolution pass, upsampled, re-noised to ``strength``, refined

``num_frames`` is always the length of the whole output, given frames included. Any size and
length: output frames are exactly ``height`` x ``width`` and exactly ``num_frames`` long (see
``sora.conditioning`` for how odd sizes and counts are met). Given frames come back as their VAE
round trip (``round_trip``). A prompt list of one shape is generated as one packed batch, with
the classifier-free-guidance branches in the same forward. The same generator seed gives the
same output; a list of generators (one per prompt) makes each video independent of its batch.
Every call is checked as ``sora.request.GenerationRequest``s (one per prompt) before any work,
and its mode against what the model can do (``sora.denoiser.DenoiserSpec``).

The model directory is ours or a diffusers Wan directory (``sora.wan``, optionally with a LoRA
adapter), local or at a URL: the same calls run on either, on the model's own time grid.

    pipe = SoraPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", lora="adapter", lora_scale=0.8)
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sora import conditioning as plans
from sora.conditioning import Layout, Segment
from sora.denoiser import spec_of
from sora.flow import interpolate, resolution_shift, time_grid
from sora.media import export_to_video, format_frames, to_frames
from sora.model_dir import component_path, fetch_model_dir, load_text_encoder, read_index, write_index
from sora.patches import patchify, position_ids, unpatchify
from sora.request import DEFAULT_SAMPLER, DEFAULT_STRENGTH, NO_LIMITS, GenerationRequest, Limits
from sora.request import SAMPLERS as request_samplers
from sora.samplers import ancestral, euler, guided_velocity, heun, initial_noise
from sora.wan_lora import check_adapter, load_lora

__all__ = ["SoraPipeline", "SoraPipelineOutput", "GenerationRequest", "export_to_video", "to_frames",
           "DEFAULT_SAMPLER", "DEFAULT_STRENGTH", "SAMPLERS"]

SAMPLERS = {"euler": euler, "heun": heun, "ancestral": ancestral}
assert tuple(SAMPLERS) == request_samplers, "sora.request.SAMPLERS must list the samplers defined here"
STOCHASTIC = frozenset({"ancestral"})  # take fresh noise each step (from each video's generator)
# How the Python call names a request's fields in its errors ("mode 'edit' needs video=").
CALL_NAMES = {"image": "image=", "video": "video=", "steps": "num_inference_steps"}

# A step callback: (step, steps, stage) with stage "generate", "draft", "refine" or "first-frame".
StepCallback = Callable[[int, int, str], None]


@dataclass
class SoraPipelineOutput:
    """``frames``: per prompt (T, H, W, 3) uint8 ("np"), a list of PIL images ("pil") or a
    (T, 3, H, W) float tensor in [0, 1] ("pt"); a list of those for a list of prompts.
    ``latents``: (B, C, T', h, w) final latents on the CPU. ``info``: per prompt, what was done
    (mode, generated size, prompt after upsampling, where given frames landed, seconds).
    ``draft_frames``: in mode "draft", the draft itself (same form and size as ``frames``)."""

    frames: Any
    fps: float
    latents: torch.Tensor | None = None
    info: Any = field(default_factory=dict)
    draft_frames: Any = None  # mode "draft": the low-resolution draft, resized like ``frames``

    def first(self) -> "SoraPipelineOutput":
        """The output of a one-prompt batch as a single prompt's (frames, info, draft unwrapped)."""
        return SoraPipelineOutput(self.frames[0], self.fps, self.latents, self.info[0],
                                  None if self.draft_frames is None else self.draft_frames[0])


def _per_prompt(value, B: int) -> list:
    """One value for every prompt, or a list/tuple of exactly B values (None entries allowed)."""
    if isinstance(value, (list, tuple)) and len(value) == B:
        return list(value)
    return [value] * B


# ----------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------


class SoraPipeline:
    """VAE + DiT + text encoder (+ optional prompt upsampler), tied together by a model index
    (``sora.model_dir``)."""

    def __init__(self, vae, dit, text_encoder, index: dict, upsampler=None, source_dir: str | None = None):
        self.vae, self.dit, self.text_encoder, self.index = vae, dit, text_encoder, index
        self.upsampler = upsampler
        self.source_dir = source_dir
        self.patch_size = tuple(index.get("patch_size", dit.config.patch_size))
        assert self.patch_size == tuple(dit.config.patch_size), (
            f"model_index patch_size {self.patch_size} != the DiT's {tuple(dit.config.patch_size)}")
        assert dit.config.in_channels == vae.latent_channels, (
            f"DiT in_channels {dit.config.in_channels} != VAE latent channels {vae.latent_channels}")
        assert dit.config.text_dim == text_encoder.dim, (
            f"DiT text_dim {dit.config.text_dim} != text encoder width {text_encoder.dim}")
        assert vae.temporal_compression == 4, "conditioning layouts assume a x4 causal VAE"
        self.stride = vae.spatial_compression * self.patch_size[1]
        assert self.patch_size[1] == self.patch_size[2] and self.patch_size[0] == 1, "layouts assume (1, p, p) patches"

    # -- checkpoints ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        lora: str | None = None, lora_scale: float = 1.0, cache_dir: str | None = None
                        ) -> "SoraPipeline":
        """Load a model directory: ours (``sora.model_dir`` layout) or a diffusers Wan directory
        (``sora.wan``), a local path or an fsspec URL (copied to ``cache_dir`` first, see
        ``sora.model_dir.fetch_model_dir``). ``dtype`` applies to the denoiser (e.g.
        torch.bfloat16 on a GPU); the VAE and the text encoder stay float32. ``lora``: a LoRA
        adapter directory for this model (``sora.wan_lora``), applied at ``lora_scale``.
        The directory and the adapter are checked before any weights load."""
        from sora.vae import load_vae

        directory = os.path.abspath(fetch_model_dir(directory, cache_dir))
        index = read_index(directory)
        if index.get("lora"):  # the directory applies an adapter of its own (a LoRA fine-tune's)
            if lora is not None:
                raise ValueError(f"{directory} already applies the LoRA adapter {index['lora']['path']}: load its base "
                                 f"{index['wan']['base']} with lora= instead")
            lora, lora_scale = component_path(directory, index["lora"]["path"]), float(index["lora"].get("scale", 1))
        lora_dir = None if lora is None else os.path.abspath(fetch_model_dir(lora, cache_dir))
        if lora_dir is not None:
            check_adapter(directory, lora_dir)
        if index.get("wan"):
            from sora.wan import load_wan

            wan = load_wan(index["wan"]["base"], device=device, dtype=dtype)
            vae, dit, text_encoder = wan.vae, wan.denoiser, wan.text_encoder
        else:
            from sora.dit import DiT

            vae = load_vae(component_path(directory, index["vae"]), device=device)
            dit = DiT.from_pretrained(component_path(directory, index["dit"]), device=device, dtype=dtype).eval()
            text_encoder = load_text_encoder(directory, index, device=device)
        pipe = cls(vae, dit, text_encoder, index, source_dir=directory)
        if lora_dir is not None:
            pipe.load_lora(lora_dir, lora_scale)
        return pipe

    def load_lora(self, directory: str, scale: float = 1.0) -> None:
        """Apply a LoRA adapter directory (diffusers' Wan LoRA layout, ``sora.wan_lora``) at
        ``scale``; an adapter of another base model fails before the model changes."""
        if not np.isfinite(scale):
            raise ValueError(f"lora_scale must be a finite number, got {scale}")
        load_lora(self.dit, directory, scale=float(scale))
        self.index = {**self.index, "lora": {"path": os.path.abspath(directory), "scale": float(scale)}}

    def save_pretrained(self, directory: str) -> None:
        """Write VAE, DiT, the index, and the components the index keeps inside the directory
        (a text encoder or upsampler given by absolute path, or none, stays a reference)."""
        if self.index.get("wan"):
            raise ValueError(f"this pipeline runs the diffusers Wan directory {self.index['wan']['base']}: load that "
                             "directory (and its LoRA adapter) again instead of saving a copy")
        os.makedirs(directory, exist_ok=True)
        index = dict(self.index)
        self.vae.save_pretrained(component_path(directory, index["vae"]))
        self.dit.save_pretrained(component_path(directory, index["dit"]))
        te_ref = (index.get("text_encoder") or {}).get("path")
        if te_ref is not None and not os.path.isabs(te_ref):
            target = component_path(directory, te_ref)
            if os.path.abspath(target) != os.path.abspath(self.text_encoder.name_or_path):
                self.text_encoder.model.save_pretrained(target)
                self.text_encoder.tokenizer.save_pretrained(target)
        up_ref = index.get("upsampler")
        if up_ref is not None and not os.path.isabs(up_ref):
            src = None if self.source_dir is None else component_path(self.source_dir, up_ref)
            dst = component_path(directory, up_ref)
            if src is not None and os.path.isdir(src):
                if os.path.abspath(src) != os.path.abspath(dst):
                    shutil.copytree(src, dst, dirs_exist_ok=True)  # as trained, sidecar included
            elif self.upsampler is not None:
                from sora.upsampler import SIDECAR

                self.upsampler.model.save_pretrained(dst)
                self.upsampler.tokenizer.save_pretrained(dst)
                with open(os.path.join(dst, SIDECAR), "w") as f:
                    json.dump({"lowercase": bool(self.upsampler.sentence_case)}, f)
        write_index(directory, index)

    def to(self, device: str | torch.device) -> "SoraPipeline":
        self.vae.to(device)
        self.dit.to(device)
        self.text_encoder.model.to(device)
        self.text_encoder.device = torch.device(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def defaults(self) -> dict:
        return self.index["defaults"]

    # -- prompts -------------------------------------------------------------------------

    def upsample_prompts(self, prompts: list[str]) -> list[str]:
        """Rewrite short prompts into descriptive captions with the model's prompt upsampler
        (``sora.upsampler``; DALL-E 3 / Sora "prompt upsampling": the DiT was trained on
        descriptive captions). Greedy, so the same prompt always gives the same caption."""
        if self.upsampler is None:
            ref = self.index.get("upsampler")
            if ref is None:
                raise ValueError('this model has no prompt upsampler (model_index.json has "upsampler": null)')
            if not os.path.isabs(ref) and self.source_dir is None:
                raise ValueError(f"upsampler {ref!r} is relative to a model directory, and this pipeline has none")
            from sora.upsampler import PromptUpsampler

            path = ref if os.path.isabs(ref) else component_path(self.source_dir, ref)
            self.upsampler = PromptUpsampler.from_pretrained(path, device=str(self.device))
        return list(self.upsampler.upsample(list(prompts)))

    @torch.no_grad()
    def _encode_text(self, prompts: list[str], negative: list[str | None]):
        """-> cond (B, L, D), mask (B, L); uncond (B, L', D), mask (B, L') or None when no
        negative prompt is given (the unconditional branch is then the empty text mask, the
        same null prompt CFG dropout trained)."""
        text, mask = self.text_encoder.encode(list(prompts))
        if all(n is None for n in negative):
            return text, mask, None, None
        neg, neg_mask = self.text_encoder.encode([n or "" for n in negative])
        neg_mask = neg_mask & torch.tensor([n is not None for n in negative], device=neg_mask.device)[:, None]
        return text, mask, neg, neg_mask

    def _velocity(self, positions, seq_ids, text, mask, neg, neg_mask, guidance_scale: float):
        """Velocity function for the samplers: CFG with cond and uncond in ONE packed forward."""
        dtype = next(self.dit.parameters()).dtype
        if neg is None or guidance_scale == 1.0:
            base = guided_velocity(self.dit, positions, seq_ids, text.to(dtype), mask, guidance_scale)
        else:
            B = text.shape[0]
            L = max(text.shape[1], neg.shape[1])
            pad = lambda s, m: (torch.nn.functional.pad(s, (0, 0, 0, L - s.shape[1])),  # noqa: E731
                                torch.nn.functional.pad(m, (0, L - m.shape[1])))
            (t2, m2), (n2, nm2) = pad(text, mask), pad(neg, neg_mask)
            positions2, seq_ids2 = torch.cat([positions, positions]), torch.cat([seq_ids, seq_ids + B])
            text2, mask2 = torch.cat([t2, n2]).to(dtype), torch.cat([m2, nm2])

            def base(x, t):
                out = self.dit(torch.cat([x, x]), positions2, torch.cat([t, t]), seq_ids2, text2, mask2)  # (2N, D_in)
                v_cond, v_neg = out.chunk(2)
                return v_neg + guidance_scale * (v_cond - v_neg)

        # times stay float32: the model's time embedding scales them (x1000), which bf16 would round
        return lambda x, t: base(x.to(dtype), t.float()).float()

    # -- the VAE side --------------------------------------------------------------------

    def _pixels_in(self, frames: np.ndarray, width: int, height: int) -> torch.Tensor:
        from sora.video_io import resize_frames

        frames = resize_frames(frames, width, height)
        x = torch.from_numpy(frames).to(self.device).float().permute(3, 0, 1, 2)  # (3, T, H, W)
        return x[None] / 127.5 - 1.0  # (1, 3, T, H, W) in [-1, 1]

    @staticmethod
    def _pixels_out(x: torch.Tensor) -> np.ndarray:
        """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8."""
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 4, 1).cpu().numpy()

    @torch.no_grad()
    def _encode_segment(self, seg: Segment, width: int, height: int) -> tuple[torch.Tensor, np.ndarray | None]:
        """Latents (C, k, h, w) of a segment at the generation size, and for a segment after
        latent frame 0 its pixel round trip (4k, H, W, 3) decoded with the same prefix context."""
        if seg.latent_start == 0:
            z = self.vae.encode_latents(self._pixels_in(seg.frames, width, height))  # (1, C, k, h, w)
            return z[0], None
        prefix = np.repeat(seg.frames[:1], 1 + 4 * plans.PREFIX_GROUPS, axis=0)
        z = self.vae.encode_latents(self._pixels_in(np.concatenate([prefix, seg.frames]), width, height))
        decoded = self._pixels_out(self.vae.decode_latents(z))[0]  # (1 + 4p + 4k, H, W, 3)
        return z[0, :, 1 + plans.PREFIX_GROUPS:], decoded[len(prefix):]

    @torch.no_grad()
    def round_trip(self, frames, width: int, height: int, at_start: bool = True) -> np.ndarray:
        """What given frames look like after the VAE, as the pipeline returns them:
        (F, height, width, 3) uint8. ``at_start``: frames placed at the start of a video
        (F = 4k+1, e.g. an image, or the context of a forward extension); else frames placed
        later (F = 4k, e.g. the context of a backward extension or the end of a join)."""
        from sora.video_io import resize_frames

        frames = to_frames(frames)
        gw, gh = plans.plan_size(width, height, self.stride)
        seg = Segment(frames, 0 if at_start else 1, "video", np.arange(len(frames)))
        z, decoded = self._encode_segment(seg, gw, gh)
        if decoded is None:
            decoded = self._pixels_out(self.vae.decode_latents(z[None]))[0]
        return resize_frames(decoded, width, height)

    # -- sampling ------------------------------------------------------------------------

    def _time_grid(self, steps: int, num_tokens: int, strength: float) -> torch.Tensor:
        """The shifted grid from 1 to 0 (``sora.flow.time_grid``; a diffusers model's scheduler
        sigmas, ``sora.wan.flow_match_grid``), started at ``strength`` for SDEdit: the times
        below it, with ``strength`` itself prepended (0 steps at strength 0)."""
        flow = self.index["flow"]
        if flow.get("scheduler"):  # the diffusers scheduler config the model was released with
            from sora.wan import flow_match_grid

            grid = flow_match_grid(steps, flow["scheduler"])
        elif flow.get("base_tokens"):  # the shift training used: grows with the token count
            grid = time_grid(steps, resolution_shift(num_tokens, int(flow["base_tokens"]), float(flow["base_shift"]),
                                                     max_shift=float(flow.get("max_shift", 8.0))))
        else:  # no base size: one fixed shift
            grid = time_grid(steps, float(flow.get("base_shift", 1.0)))
        if strength >= 1.0:
            return grid
        assert strength >= 0.0, f"strength must be in [0, 1], got {strength}"
        return torch.cat([torch.tensor([strength], dtype=grid.dtype), grid[grid < strength]])

    @torch.no_grad()
    def _sample(self, layouts: list[Layout], prompts: list[str], negative: list[str | None], width: int, height: int,
                steps: int, guidance_scale: float, generators: list, sampler: str, strength: float,
                init: torch.Tensor | None, callback: StepCallback | None, stage: str) -> tuple[np.ndarray, torch.Tensor]:
        """Denoise B videos of one shape in one pack. ``init`` (B, C, T', h, w) latents to start
        from at ``strength`` (SDEdit), else pure noise. Returns decoded frames
        (B, G, height, width, 3) uint8 at the generation size and the latents (B, C, T', h, w)."""
        B = len(prompts)
        T = layouts[0].latent_frames
        assert all(lay.latent_frames == T for lay in layouts), "a batch must share one latent length"
        C, sc = self.vae.latent_channels, self.vae.spatial_compression
        shape = (C, T, height // sc, width // sc)
        grid = (T, shape[2] // self.patch_size[1], shape[3] // self.patch_size[2])
        N = grid[0] * grid[1] * grid[2]
        device = self.device

        # known latent frames per video, and their pixel round trips (segments after frame 0)
        known = torch.zeros(B, *shape, device=device)
        known_frames = torch.zeros(B, T, dtype=torch.bool)
        spliced: list[list[tuple[Segment, np.ndarray]]] = []
        for b, lay in enumerate(layouts):
            spliced.append([])
            for seg in lay.segments:
                z, decoded = self._encode_segment(seg, width, height)
                known[b, :, seg.latent_start: seg.latent_start + seg.num_latents] = z
                known_frames[b, seg.latent_frames] = True
                if decoded is not None:
                    spliced[b].append((seg, decoded))

        noise = torch.stack([initial_noise(shape, g) for g in generators]).to(device)  # (B, C, T, h, w)
        x0 = init if init is not None else torch.zeros_like(noise)
        grid_t = self._time_grid(steps, N, strength if init is not None else 1.0).to(device)
        x = interpolate(x0, noise, float(grid_t[0]))  # (B, C, T, h, w)

        tok = lambda v: torch.cat([patchify(v[b], self.patch_size) for b in range(B)])  # noqa: E731  (B*N, D_in)
        known_mask = known_frames.repeat_interleave(grid[1] * grid[2], dim=1).reshape(-1).to(device)  # (B*N,)
        positions = position_ids(grid, device).repeat(B, 1)  # (B*N, 3)
        seq_ids = torch.arange(B, device=device).repeat_interleave(N)  # (B*N,)
        text, mask, neg, neg_mask = self._encode_text(prompts, negative)
        velocity = self._velocity(positions, seq_ids, text, mask, neg, neg_mask, guidance_scale)
        step = SAMPLERS[sampler]
        xt, kt = tok(x), tok(known)
        if sampler in STOCHASTIC:  # each video's step noise from its own generator, as its start
            step = functools.partial(step, noise_fn=lambda: torch.cat(
                [initial_noise((N, xt.shape[1]), g) for g in generators]).to(device))
        n_steps = len(grid_t) - 1
        for i in range(n_steps):
            # one grid interval per call: identical to one call over the whole grid (each step
            # of Euler/Heun/ancestral only reads its own interval), and it lets us report progress
            xt = step(velocity, xt, grid_t[i: i + 2], kt, known_mask)
            if callback is not None:
                callback(i + 1, n_steps, stage)
        xt = torch.where(known_mask[:, None], kt, xt)  # held exactly, even with no steps
        latents = torch.stack([unpatchify(xt[b * N:(b + 1) * N], grid, self.patch_size, C) for b in range(B)])
        frames = self._pixels_out(self.vae.decode_latents(latents))  # (B, G, H, W, 3)
        for b in range(B):
            for seg, decoded in spliced[b]:
                lo, hi = seg.pixel_range
                # given frames come back as their own round trip; a loop's closing still
                # group as the video's first frame
                frames[b, lo:hi] = frames[b, :1] if seg.still_of_first else decoded
        return frames, latents.cpu()

    # -- the diffusers-style call, and requests ------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str | None] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | int | None = None,
        image=None,
        video=None,
        strength: float | None = None,
        mode: str | None = None,
        output_type: str = "np",
        upsample_prompt: bool = False,
        sampler: str | None = None,
        callback: StepCallback | None = None,
        seconds: float | None = None,
        context_frames: int | None = None,
        draft_scale: float = 0.5,
    ) -> SoraPipelineOutput:
        """Generate one video per prompt (see the module docstring for the modes).

        height/width: output size in pixels, any (defaults from the model index). num_frames
        (or seconds at fps): output length, given frames included. image: frame 0 (one for
        all prompts, or a list, None entries allowed). video: the video to extend/edit/loop,
        or (a, b) for join. strength: SDEdit noise level for edit (default 0.7) and draft
        refinement (default 0.4); 0 returns the input's round trip. context_frames: at most
        this many given frames are kept (extend/join/loop). draft_scale: draft side / final.
        generator: a torch.Generator, an int seed, or one per prompt. sampler: "euler", "heun"
        or "ancestral" (stochastic: its step noise also comes from each prompt's generator);
        default: the model index's, else DEFAULT_SAMPLER.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        B = len(prompts)
        requests = [GenerationRequest(
            prompt=p, negative_prompt=neg, mode=mode, width=width, height=height, num_frames=num_frames,
            seconds=seconds, fps=fps, steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
            strength=strength, context_frames=context_frames, draft_scale=draft_scale,
            upsample_prompt=upsample_prompt, image=im, video=video)
            for p, neg, im in zip(prompts, _per_prompt(negative_prompt, B), _per_prompt(image, B))]
        out = self._generate(requests, self._generators(generator, B), NO_LIMITS, callback, output_type)
        return out.first() if single else out

    def generate(self, requests: GenerationRequest | Sequence[GenerationRequest], *, limits: Limits = NO_LIMITS,
                 callback: StepCallback | None = None, output_type: str = "np") -> SoraPipelineOutput:
        """Generate ``sora.request.GenerationRequest``s as one packed batch (they must share one
        ``shape_key()``; group them first). Each request's ``seed`` seeds its own generator;
        image/video references (paths or URLs) are read here. Checked against ``limits`` first.
        One request gives a single prompt's output, a list a batch's."""
        single = isinstance(requests, GenerationRequest)
        reqs = [requests] if single else list(requests)
        if not reqs:
            raise ValueError("no requests to generate")
        generators = [None if r.seed is None else torch.Generator().manual_seed(int(r.seed)) for r in reqs]
        out = self._generate(reqs, generators, limits, callback, output_type)
        return out.first() if single else out

    def _generate(self, requests: list[GenerationRequest], generators: list, limits: Limits,
                  callback: StepCallback | None, output_type: str) -> SoraPipelineOutput:
        t0 = time.perf_counter()
        reqs = [r.validate(limits, names=CALL_NAMES) for r in requests]
        for r in reqs:
            self.check_mode(r.mode, r.image is not None)
        B = len(reqs)
        video = self._load_video(reqs[0].mode, reqs[0].video)  # one video per batch (shape_key holds it)
        reqs = [r.resolve(self.defaults, None if video is None else len(video)) for r in reqs]
        if any(r.shape_key() != reqs[0].shape_key() for r in reqs):
            raise ValueError("requests of one call must share one shape_key() (size, length, steps, mode, ...): "
                             "group them first")
        r0 = reqs[0]
        width, height, num_frames, fps, steps = r0.width, r0.height, r0.num_frames, r0.fps, r0.steps
        guidance, sampler, s = r0.guidance_scale, r0.sampler, 1.0 if r0.strength is None else r0.strength
        images = [None if r.image is None else to_frames(r.image, "image")[:1] for r in reqs]
        negative = [r.negative_prompt for r in reqs]
        prompts = self.upsample_prompts([r.prompt for r in reqs]) if r0.upsample_prompt else [r.prompt for r in reqs]
        gw, gh = plans.plan_size(width, height, self.stride)
        progress = callback

        if r0.mode == "loop":
            firsts = [video if video is not None else images[b] for b in range(B)]
            sources = [None if f is not None else "generated" for f in firsts]
            if any(f is None for f in firsts):  # text-to-loop: draw frame 0 first (a short clip)
                short = self._sample([plans.text_to_video(5)] * B, prompts, negative, gw, gh, steps, guidance,
                                     generators, sampler, 1.0, None, progress, "first-frame")[0]
                firsts = [f if f is not None else short[b, :1] for b, f in enumerate(firsts)]
            layouts = [plans.loop(f, num_frames, r0.context_frames, src) for f, src in zip(firsts, sources)]
        else:
            layouts = [self._layout(r.mode, images[b], video, num_frames, r0.context_frames)
                       for b, r in enumerate(reqs)]
        assert all(lay.keep == layouts[0].keep for lay in layouts), "prompts of one call must share one layout"

        init = small = None
        if r0.mode == "edit":
            init = torch.cat([self.vae.encode_latents(self._pixels_in(lay.init_frames, gw, gh)) for lay in layouts])
        if r0.mode == "draft":
            dw, dh = plans.plan_size(*self._draft_size(gw, gh, r0.draft_scale), self.stride)
            small, _ = self._sample(layouts, prompts, negative, dw, dh, steps, guidance, generators, sampler,
                                    1.0, None, progress, "draft")
            # upsample in pixel space and re-encode: interpolated latents are off the VAE's
            # manifold, re-encoded pixels are not; the refinement then only has to add detail
            init = torch.cat([self.vae.encode_latents(self._pixels_in(small[b], gw, gh)) for b in range(B)])
        frames, latents = self._sample(layouts, prompts, negative, gw, gh, steps, guidance, generators, sampler,
                                       s, init, progress, "refine" if r0.mode == "draft" else "generate")

        from sora.video_io import resize_frames

        keep = layouts[0].keep
        outs = [format_frames(resize_frames(frames[b][keep], width, height), output_type) for b in range(B)]
        drafts = None if small is None else [format_frames(resize_frames(small[b][keep], width, height), output_type)
                                             for b in range(B)]
        seconds_taken = time.perf_counter() - t0
        infos = [{"mode": reqs[b].mode, "prompt": prompts[b], "width": width, "height": height,
                  "num_frames": num_frames, "fps": fps, "generated_size": [gw, gh],
                  "generated_frames": layouts[b].decoded_frames, "latent_frames": layouts[b].latent_frames,
                  "steps": steps, "guidance_scale": guidance, "sampler": sampler, "strength": r0.strength,
                  "given": layouts[b].given(), "seconds": seconds_taken / B} for b in range(B)]
        return SoraPipelineOutput(outs, fps, latents, infos, drafts)

    # -- helpers for the call ------------------------------------------------------------

    def check_mode(self, mode: str, image: bool = False) -> None:
        """ValueError naming the mode and the model when this model cannot run ``mode`` (a
        draft with an image starts as image-to-video)."""
        spec_of(self.dit).check_generation_mode("image-to-video" if mode == "draft" and image else mode)

    @staticmethod
    def _load_video(mode: str, video):
        """The batch's video as (T, H, W, 3) uint8 frames, a pair of them for join, or None."""
        if video is None:
            return None
        if mode == "join":
            return to_frames(video[0], "video a"), to_frames(video[1], "video b")
        return to_frames(video, "video")

    @staticmethod
    def _generators(generator, B: int) -> list:
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        if isinstance(generator, (list, tuple)):
            if len(generator) != B:
                raise ValueError(f"{len(generator)} generators for {B} prompts")
            return [torch.Generator().manual_seed(g) if isinstance(g, int) else g for g in generator]
        return [generator] * B

    @staticmethod
    def _layout(mode: str, image, video, num_frames: int, context_frames: int | None) -> Layout:
        if mode == "text-to-video":
            return plans.text_to_video(num_frames)
        if mode in ("image-to-video", "draft"):
            return plans.image_to_video(image, num_frames) if image is not None else plans.text_to_video(num_frames)
        if mode == "extend-forward":
            return plans.extend_forward(video, num_frames, context_frames)
        if mode == "extend-backward":
            return plans.extend_backward(video, num_frames, context_frames)
        if mode == "join":
            return plans.join(video[0], video[1], num_frames, context_frames)
        if mode == "edit":
            return plans.edit(video, num_frames)
        raise ValueError(f"no layout for mode {mode!r}")

    @staticmethod
    def _draft_size(width: int, height: int, scale: float) -> tuple[int, int]:
        return max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)

    # -- named helpers (the same call, spelled out) --------------------------------------

    def image_to_video(self, prompt, image, **kwargs) -> SoraPipelineOutput:
        return self(prompt, image=image, mode="image-to-video", **kwargs)

    def extend(self, prompt, video, direction: str = "forward", **kwargs) -> SoraPipelineOutput:
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be forward or backward, got {direction!r}")
        return self(prompt, video=video, mode=f"extend-{direction}", **kwargs)

    def join(self, a, b, prompt, **kwargs) -> SoraPipelineOutput:
        return self(prompt, video=(a, b), mode="join", **kwargs)

    def loop(self, prompt, image=None, video=None, **kwargs) -> SoraPipelineOutput:
        return self(prompt, image=image, video=video, mode="loop", **kwargs)

    def edit(self, prompt, video, strength: float = DEFAULT_STRENGTH["edit"], **kwargs) -> SoraPipelineOutput:
        return self(prompt, video=video, strength=strength, mode="edit", **kwargs)

    def draft_and_refine(self, prompt, strength: float = DEFAULT_STRENGTH["draft"], draft_scale: float = 0.5,
                         **kwargs) -> SoraPipelineOutput:
        return self(prompt, strength=strength, draft_scale=draft_scale, mode="draft", **kwargs)
