"""`SoraPipeline`: every generation mode from one model directory, called like diffusers.

    pipe = SoraPipeline.from_pretrained("model")                     # see sora.model_dir
    out = pipe("A large red circle moves from left to right across a black background.",
               width=160, height=90, num_frames=24, num_inference_steps=30, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0))
    export_to_video(out.frames, "red.mp4", fps=out.fps)              # out.frames: (24, 90, 160, 3) uint8

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
from sora.flow import interpolate, resolution_shift, time_grid
from sora.model_dir import component_path, read_index, write_index
from sora.patches import patchify, position_ids, unpatchify
from sora.samplers import ancestral, euler, guided_velocity, heun, initial_noise

SAMPLERS = {"euler": euler, "heun": heun, "ancestral": ancestral}
STOCHASTIC = frozenset({"ancestral"})  # take fresh noise each step (from each video's generator)
# Euler stays the default: the ancestral sampler (and a grid shifted towards noise) read held-out
# shape 0.741 against Euler's 0.732 over four demo models x four prompt draws (docs/experiments.md,
# Sampling and guidance), inside the noise of a 100-prompt draw.
DEFAULT_SAMPLER = "euler"
# Draft refinement at 0.4: on three demo models (100 held-out prompts drafted at the trained
# sizes, refined at twice them; docs/experiments.md, Sampling and guidance) 0.4 kept the draft's shape
# 0.74 / 0.79 / 0.80 of the time against 0.73 / 0.65 / 0.75 at 0.6, its size and motion more
# often too, and read refined shape 0.75 / 0.70 / 0.65 against 0.80 / 0.58 / 0.55. A higher
# strength lets the refinement pass (at a size the model may never have trained on) redraw the
# layout, e.g. add a second object; 0.3 reads about as 0.4 but leaves less to refine.
DEFAULT_STRENGTH = {"edit": 0.7, "draft": 0.4}

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


# ----------------------------------------------------------------------------------------
# Inputs and outputs
# ----------------------------------------------------------------------------------------


def to_frames(media, name: str = "input") -> np.ndarray:
    """Any image/video input -> (T, H, W, 3) uint8: a path or URL (image or video file), a PIL
    image, a list of PIL images, a (H, W, 3) / (T, H, W, 3) uint8 array or float array in [0, 1],
    or a (3, H, W) / (T, 3, H, W) float tensor in [0, 1]."""
    if isinstance(media, (str, os.PathLike)):
        path = os.fspath(media)
        if path.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")):
            import fsspec
            from PIL import Image

            with fsspec.open(path, "rb") as f:
                return np.asarray(Image.open(f).convert("RGB"))[None]
        from sora.video_io import read_frames

        return read_frames(path)
    if isinstance(media, torch.Tensor):
        t = media.detach().cpu().float()
        t = t[None] if t.dim() == 3 else t
        assert t.dim() == 4 and t.shape[1] == 3, f"{name}: a tensor must be (3, H, W) or (T, 3, H, W), got {tuple(media.shape)}"
        return (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if isinstance(media, (list, tuple)) and media and not isinstance(media[0], (int, float)):
        return np.concatenate([to_frames(m, name) for m in media])
    if hasattr(media, "convert"):  # a PIL image
        return np.asarray(media.convert("RGB"))[None]
    a = np.asarray(media)
    a = a[None] if a.ndim == 3 else a
    assert a.ndim == 4 and a.shape[-1] == 3, f"{name}: frames must be (H, W, 3) or (T, H, W, 3), got {a.shape}"
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    assert len(a) >= 1, f"{name}: no frames"
    return a


def export_to_video(frames, path: str, fps: float = 12.0, **kwargs) -> str:
    """Write frames (any form ``to_frames`` accepts, e.g. ``output.frames``) to a video file or
    fsspec URL (container from the extension; H.264 for .mp4). Returns ``path``."""
    from sora.video_io import write_video

    write_video(path, to_frames(frames, "frames"), fps, **kwargs)
    return path


def _format(frames: np.ndarray, output_type: str):
    if output_type == "np":
        return frames
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(f) for f in frames]
    if output_type == "pt":
        return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
    raise ValueError(f"output_type must be 'np', 'pil' or 'pt', got {output_type!r}")


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
    def from_pretrained(cls, directory: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "SoraPipeline":
        """Load a model directory (``sora.model_dir`` layout). ``dtype`` applies to the DiT
        (e.g. torch.bfloat16 on a GPU); the VAE and the text encoder stay float32."""
        from sora.dit import DiT
        from sora.text_encoder import TextEncoder
        from sora.vae import load_vae

        index = read_index(directory)
        vae = load_vae(component_path(directory, index["vae"]), device=device)
        dit = DiT.from_pretrained(component_path(directory, index["dit"]), device=device, dtype=dtype).eval()
        te = index.get("text_encoder") or {}
        text_encoder = TextEncoder.from_pretrained(component_path(directory, te.get("path")),
                                                   max_length=int(te.get("max_length", 64)), device=device)
        return cls(vae, dit, text_encoder, index, source_dir=os.path.abspath(directory))

    def save_pretrained(self, directory: str) -> None:
        """Write VAE, DiT, the index, and the components the index keeps inside the directory
        (a text encoder or upsampler given by absolute path, or none, stays a reference)."""
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

        return lambda x, t: base(x.to(dtype), t.to(dtype)).float()

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
        """The shifted grid from 1 to 0 (``sora.flow.time_grid``), started at ``strength`` for
        SDEdit: the times below it, with ``strength`` itself prepended (0 steps at strength 0)."""
        flow = self.index["flow"]
        if flow.get("base_tokens"):  # the shift training used: grows with the token count
            shift = resolution_shift(num_tokens, int(flow["base_tokens"]), float(flow["base_shift"]),
                                     max_shift=float(flow.get("max_shift", 8.0)))
        else:  # no base size: one fixed shift
            shift = float(flow.get("base_shift", 1.0))
        grid = time_grid(steps, shift)
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

    # -- the diffusers-style call --------------------------------------------------------

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
        t0 = time.perf_counter()
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        assert prompts and all(isinstance(p, str) for p in prompts), "prompt must be a string or a list of strings"
        B = len(prompts)
        d = self.defaults
        width, height = int(width or d["width"]), int(height or d["height"])
        fps = float(fps or d["fps"])
        steps = int(num_inference_steps or d["num_inference_steps"])
        guidance = float(d["guidance_scale"] if guidance_scale is None else guidance_scale)
        sampler = sampler or d.get("sampler", DEFAULT_SAMPLER)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        mode = self._resolve_mode(mode, image, video)
        if seconds is not None:
            if num_frames is not None:
                raise ValueError("give num_frames or seconds, not both")
            num_frames = plans.frames_for(seconds, fps)
        videos = self._videos(mode, video, B)
        if num_frames is None:
            num_frames = len(videos[0]) if mode == "edit" else int(d["num_frames"])
        num_frames = int(num_frames)
        images = [None if im is None else to_frames(im, "image")[:1] for im in _per_prompt(image, B)]
        negative = _per_prompt(negative_prompt, B)
        generators = self._generators(generator, B)
        if upsample_prompt:
            prompts = self.upsample_prompts(prompts)
        gw, gh = plans.plan_size(width, height, self.stride)
        progress = callback
        if mode in ("edit", "draft"):
            s = DEFAULT_STRENGTH[mode] if strength is None else float(strength)
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"strength must be in [0, 1], got {s}")
        elif strength is not None:
            raise ValueError(f"strength applies to modes 'edit' and 'draft', not {mode!r}")
        else:
            s = 1.0

        if mode == "loop":
            firsts = [videos[b] if videos[b] is not None else images[b] for b in range(B)]
            sources = [None if f is not None else "generated" for f in firsts]
            if any(f is None for f in firsts):  # text-to-loop: draw frame 0 first (a short clip)
                short = self._sample([plans.text_to_video(5)] * B, prompts, negative, gw, gh, steps, guidance,
                                     generators, sampler, 1.0, None, progress, "first-frame")[0]
                firsts = [f if f is not None else short[b, :1] for b, f in enumerate(firsts)]
            layouts = [plans.loop(f, num_frames, context_frames, src) for f, src in zip(firsts, sources)]
        else:
            layouts = [self._layout(mode, images[b], videos[b], num_frames, context_frames) for b in range(B)]
        assert all(lay.keep == layouts[0].keep for lay in layouts), "prompts of one call must share one layout"

        init = small = None
        if mode == "edit":
            init = torch.cat([self.vae.encode_latents(self._pixels_in(lay.init_frames, gw, gh)) for lay in layouts])
        if mode == "draft":
            dw, dh = plans.plan_size(*self._draft_size(gw, gh, draft_scale), self.stride)
            small, _ = self._sample(layouts, prompts, negative, dw, dh, steps, guidance, generators, sampler,
                                    1.0, None, progress, "draft")
            # upsample in pixel space and re-encode: interpolated latents are off the VAE's
            # manifold, re-encoded pixels are not; the refinement then only has to add detail
            init = torch.cat([self.vae.encode_latents(self._pixels_in(small[b], gw, gh)) for b in range(B)])
        frames, latents = self._sample(layouts, prompts, negative, gw, gh, steps, guidance, generators, sampler,
                                       s, init, progress, "refine" if mode == "draft" else "generate")

        from sora.video_io import resize_frames

        keep = layouts[0].keep
        outs = [_format(resize_frames(frames[b][keep], width, height), output_type) for b in range(B)]
        drafts = None if small is None else [_format(resize_frames(small[b][keep], width, height), output_type)
                                             for b in range(B)]
        seconds_taken = time.perf_counter() - t0
        infos = [{"mode": mode, "prompt": prompts[b], "width": width, "height": height, "num_frames": num_frames,
                  "fps": fps, "generated_size": [gw, gh], "generated_frames": layouts[b].decoded_frames,
                  "latent_frames": layouts[b].latent_frames, "steps": steps, "guidance_scale": guidance,
                  "sampler": sampler, "strength": s if mode in ("edit", "draft") else None,
                  "given": layouts[b].given(), "seconds": seconds_taken / B} for b in range(B)]
        if single:
            return SoraPipelineOutput(outs[0], fps, latents, infos[0], None if drafts is None else drafts[0])
        return SoraPipelineOutput(outs, fps, latents, infos, drafts)

    # -- helpers for the call ------------------------------------------------------------

    @staticmethod
    def _resolve_mode(mode: str | None, image, video) -> str:
        if mode is None:
            mode = "image-to-video" if image is not None else "extend-forward" if video is not None else "text-to-video"
        aliases = {"t2v": "text-to-video", "i2v": "image-to-video", "extend": "extend-forward",
                   "forward": "extend-forward", "backward": "extend-backward", "interpolate": "join"}
        mode = aliases.get(mode, mode)
        if mode not in plans.MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {list(plans.MODES)}")
        if mode in ("extend-forward", "extend-backward", "edit", "join") and video is None:
            raise ValueError(f"mode {mode!r} needs video=" + (" (a, b)" if mode == "join" else ""))
        if mode == "image-to-video" and image is None:
            raise ValueError("mode 'image-to-video' needs image=")
        if image is not None and mode not in ("image-to-video", "loop", "draft"):
            raise ValueError(f"image= does not apply to mode {mode!r}")
        return mode

    @staticmethod
    def _videos(mode: str, video, B: int) -> list:
        if video is None:
            return [None] * B
        if mode == "join":
            assert isinstance(video, (list, tuple)) and len(video) == 2, "join needs video=(a, b)"
            pair = (to_frames(video[0], "video a"), to_frames(video[1], "video b"))
            return [pair] * B
        return [to_frames(video, "video")] * B

    @staticmethod
    def _generators(generator, B: int) -> list:
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        if isinstance(generator, (list, tuple)):
            assert len(generator) == B, f"{len(generator)} generators for {B} prompts"
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
        assert 0 < scale <= 1, f"draft_scale must be in (0, 1], got {scale}"
        return max(16, round(width * scale / 16) * 16), max(16, round(height * scale / 16) * 16)

    # -- named helpers (the same call, spelled out) --------------------------------------

    def image_to_video(self, prompt, image, **kwargs) -> SoraPipelineOutput:
        return self(prompt, image=image, mode="image-to-video", **kwargs)

    def extend(self, prompt, video, direction: str = "forward", **kwargs) -> SoraPipelineOutput:
        assert direction in ("forward", "backward"), f"direction must be forward or backward, got {direction!r}"
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
