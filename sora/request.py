"""One generation request, its validation, and the limits on what a request may ask for.

Every way in - the Python API (``SoraPipeline``), ``sora generate``, bulk prompt rows and the
HTTP API - builds a :class:`GenerationRequest` and checks it with ``validate(limits)`` against
one :class:`Limits`. Each caller names the fields its own way in error messages (``--frames``
on the command line, ``seconds`` in the HTTP API), so ``validate`` takes a ``names`` map and
raises :class:`RequestError` (a ValueError) that also says which field was wrong.

    req = GenerationRequest("A red circle moves left.", width=160, height=90, seconds=2, seed=0)
    req = req.validate(BULK_LIMITS)              # the checked request, its mode resolved
    out = pipe.generate(req)                     # sora.pipeline.SoraPipeline
    GenerationRequest.from_dict(req.to_dict())   # a JSON round trip (media given as paths/URLs)

``None`` means "the model's default" (its model_index.json ``defaults``); ``resolve(defaults)``
fills those in. Requests with equal ``shape_key()`` can run as one packed pipeline call.

Pure Python (no torch, no numpy at import), so an HTTP ingress validates without loading a
model and the command line builds its flags from these fields quickly.
"""

from __future__ import annotations

import functools
import math
import numbers
from copy import deepcopy
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

MODES = ("text-to-video", "image-to-video", "extend-forward", "extend-backward", "join", "loop", "edit", "draft")
SAMPLERS = ("euler", "heun", "ancestral")
DEFAULT_SAMPLER = "euler"  # sampler when neither the request nor the model index names one
DEFAULT_STRENGTH = {"edit": 0.7, "draft": 0.4}  # SDEdit noise level of an edit / a draft's refinement
MODE_ALIASES = {"t2v": "text-to-video", "i2v": "image-to-video", "extend": "extend-forward",
                "forward": "extend-forward", "backward": "extend-backward", "interpolate": "join"}
NEEDS_VIDEO = ("extend-forward", "extend-backward", "edit", "join")
TAKES_IMAGE = ("image-to-video", "loop", "draft")
TAKES_VIDEO = NEEDS_VIDEO + ("loop",)
MAX_SEED = 2 ** 63 - 1


class RequestError(ValueError):
    """A request that cannot be generated. ``field``: the request field at fault ("size" for
    width/height); ``code``: a short machine-readable reason ("invalid_value", "odd_size")."""

    def __init__(self, field: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.field, self.code = field, code


@dataclass(frozen=True)
class Limits:
    """What one generation request may ask for; None is no bound. The defaults suit a public
    endpoint on a GPU (``sora serve``); `BULK_LIMITS` (a trusted prompts file) and `NO_LIMITS`
    (the Python API: only what makes sense at all; ``sora generate`` adds a non-empty prompt and,
    for video files, even sides) are wider."""

    max_prompt_chars: int | None = 4000  # characters of the prompt, and of the negative prompt
    empty_prompt: bool = False  # whether a blank prompt (the unconditional branch alone) is allowed
    min_side: int = 16  # pixels, width and height each: the VAE's stride (a smaller frame holds no latent pixel)
    max_side: int | None = 1920  # pixels, width and height each
    max_pixels: int | None = 1280 * 720  # width x height of one frame
    max_frames: int | None = None  # frames of the output
    max_seconds: float | None = 20.0  # duration of the output, when asked for in seconds
    max_fps: float | None = 120.0  # frame rate of the output
    max_steps: int | None = 100  # sampling steps
    max_guidance: float | None = 20.0  # classifier-free guidance scale
    even_sides: bool = True  # width and height must be even: H.264 (mp4) with 4:2:0 chroma needs it

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type != "bool" and v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"Limits.{f.name} must be a positive number or None, got {v!r}")

    # -- the checks, one per quantity (callers that parse a field themselves use these) -----

    def check_size(self, width: int, height: int, names: dict[str, str] | None = None) -> None:
        size = _name(names, "size")
        label = f"{width}x{height}"
        lo, hi = self.min_side, self.max_side
        if not (lo <= width and lo <= height and (hi is None or (width <= hi and height <= hi))):
            need = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise RequestError("size", f"{size} sides must be {need}, got {label}")
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise RequestError("size", f"{size} {label} has {width * height} pixels, more than the limit of "
                                       f"{self.max_pixels}")
        if self.even_sides and (width % 2 or height % 2):
            raise RequestError("size", f"{size} {label}: H.264 video (4:2:0 chroma) needs even width and height",
                               code="odd_size")

    def check_seconds(self, seconds: float, names: dict[str, str] | None = None) -> None:
        _range("seconds", _name(names, "seconds"), seconds, 0, self.max_seconds, lo_open=True)


NO_LIMITS = Limits(max_prompt_chars=None, empty_prompt=True, min_side=1, max_side=None, max_pixels=None,
                   max_seconds=None, max_fps=None, max_steps=None, max_guidance=None, even_sides=False)
BULK_LIMITS = Limits(max_prompt_chars=None, min_side=1, max_side=4096, max_pixels=None, max_frames=1024,
                     max_seconds=600.0, max_fps=240.0, max_steps=1000, max_guidance=None, even_sides=True)


@dataclass
class GenerationRequest:
    """One video to generate. None means the model's default (see ``resolve``)."""

    prompt: str  # what the video shows
    negative_prompt: str | None = None  # what to steer away from (the other branch of classifier-free guidance)
    # text-to-video, image-to-video, extend-forward, extend-backward, join, loop, edit or draft
    # (or an alias such as i2v); None: image-to-video with an image, extend-forward with a video, else text-to-video
    mode: str | None = None
    width: int | None = None  # output width in pixels, any (None: the model's)
    height: int | None = None  # output height in pixels, any (None: the model's)
    num_frames: int | None = None  # output length in frames, given frames included (None: the model's)
    seconds: float | None = None  # output length in seconds instead of frames (frames = seconds x fps)
    fps: float | None = None  # frame rate (None: the model's)
    steps: int | None = None  # sampling steps (None: the model's)
    guidance_scale: float | None = None  # classifier-free guidance scale (None: the model's)
    # the ODE samplers euler, heun or the stochastic ancestral (None: the model's, else euler)
    sampler: Literal["euler", "heun", "ancestral"] | None = None
    seed: int | None = None  # random seed: the same seed gives the same video (None: unseeded)
    strength: float | None = None  # edit / draft refinement noise level in [0, 1] (None: edit 0.7, draft 0.4)
    context_frames: int | None = None  # keep at most this many given frames (extend, join, loop)
    draft_scale: float = 0.5  # mode draft: the draft's side as a fraction of the output's
    upsample_prompt: bool = False  # rewrite the prompt with the model's prompt upsampler first
    image: Any = None  # frame 0: a path or URL (in process also an array or PIL image)
    video: Any = None  # the video to extend, edit or loop, or a pair (a, b) to join: paths or URLs (or arrays)

    # -- validation ----------------------------------------------------------------------

    def validate(self, limits: Limits = NO_LIMITS, names: dict[str, str] | None = None) -> "GenerationRequest":
        """Check everything that needs no model against ``limits``; raise RequestError naming
        the field (as ``names`` spells it: e.g. {"num_frames": "--frames"}). Returns the checked
        request with its mode resolved and numbers as plain int/float."""
        n = lambda f: _name(names, f)  # noqa: E731
        for f in ("prompt", "negative_prompt"):
            value = getattr(self, f)
            if value is None and f == "negative_prompt":
                continue
            if not isinstance(value, str):
                raise RequestError(f, f"{n(f)} must be a string, got {type(value).__name__}")
            if f == "prompt" and not value.strip() and not limits.empty_prompt:
                raise RequestError(f, f"{n(f)} must not be empty")
            if limits.max_prompt_chars is not None and len(value) > limits.max_prompt_chars:
                raise RequestError(f, f"{n(f)} is too long ({len(value)} > {limits.max_prompt_chars} characters)")
            if "\x00" in value:
                raise RequestError(f, f"{n(f)} contains a NUL character")
        mode = resolve_mode(self.mode, self.image is not None, self.video is not None, names)
        video = self.video
        if mode == "join":
            if not (isinstance(video, (list, tuple)) and len(video) == 2):
                raise RequestError("video", f"{n('mode')} 'join' needs {n('video')} as a pair (a, b)")
            video = tuple(video)
        out = replace(self, mode=mode, video=video)

        if (self.width is None) != (self.height is None):
            raise RequestError("size", f"give both {n('width')} and {n('height')}, or neither")
        if self.width is not None:
            out.width, out.height = _int("size", n("size"), self.width), _int("size", n("size"), self.height)
            limits.check_size(out.width, out.height, names)
        if self.num_frames is not None and self.seconds is not None:
            raise RequestError("num_frames", f"give {n('num_frames')} or {n('seconds')}, not both")
        if self.num_frames is not None:
            out.num_frames = _int("num_frames", n("num_frames"), self.num_frames)
            _range("num_frames", n("num_frames"), out.num_frames, 1, limits.max_frames)
        if self.seconds is not None:
            out.seconds = _float("seconds", n("seconds"), self.seconds)
            limits.check_seconds(out.seconds, names)
        if self.fps is not None:
            out.fps = _float("fps", n("fps"), self.fps)
            _range("fps", n("fps"), out.fps, 0, limits.max_fps, lo_open=True)
        if self.steps is not None:
            out.steps = _int("steps", n("steps"), self.steps)
            _range("steps", n("steps"), out.steps, 1, limits.max_steps)
        if self.guidance_scale is not None:
            out.guidance_scale = _float("guidance_scale", n("guidance_scale"), self.guidance_scale)
            _range("guidance_scale", n("guidance_scale"), out.guidance_scale, 0, limits.max_guidance)
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise RequestError("sampler", f"{n('sampler')} must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.seed is not None:
            out.seed = _int("seed", n("seed"), self.seed)
            if not 0 <= out.seed <= MAX_SEED:
                raise RequestError("seed", f"{n('seed')} must be a non-negative 64-bit integer, got {self.seed!r}")
        if self.strength is not None:
            if mode not in DEFAULT_STRENGTH:
                raise RequestError("strength", f"{n('strength')} applies to modes 'edit' and 'draft', not {mode!r}")
            out.strength = _float("strength", n("strength"), self.strength)
            _range("strength", n("strength"), out.strength, 0, 1)
        if self.context_frames is not None:
            out.context_frames = _int("context_frames", n("context_frames"), self.context_frames)
            _range("context_frames", n("context_frames"), out.context_frames, 1, None)
        out.draft_scale = _float("draft_scale", n("draft_scale"), self.draft_scale)
        _range("draft_scale", n("draft_scale"), out.draft_scale, 0, 1, lo_open=True)
        return out

    def resolve(self, defaults: dict[str, Any], video_frames: int | None = None) -> "GenerationRequest":
        """Every None filled in from a model index's ``defaults`` (a validated request):
        size, fps, steps, guidance, sampler, strength, and num_frames (from seconds at fps; an
        edit without one keeps its video's length, ``video_frames``). ``seconds`` becomes None."""
        from sora.conditioning import frames_for

        mode = self.mode or resolve_mode(None, self.image is not None, self.video is not None)
        fps = float(self.fps or defaults["fps"])
        if self.seconds is not None:
            num_frames = frames_for(self.seconds, fps)
        elif self.num_frames is not None:
            num_frames = int(self.num_frames)
        else:
            num_frames = int(video_frames if mode == "edit" and video_frames else defaults["num_frames"])
        return replace(
            self, mode=mode, width=int(self.width or defaults["width"]), height=int(self.height or defaults["height"]),
            num_frames=num_frames, seconds=None, fps=fps, steps=int(self.steps or defaults["num_inference_steps"]),
            guidance_scale=float(defaults["guidance_scale"] if self.guidance_scale is None else self.guidance_scale),
            sampler=self.sampler or defaults.get("sampler", DEFAULT_SAMPLER),
            strength=(DEFAULT_STRENGTH[mode] if self.strength is None else float(self.strength))
            if mode in DEFAULT_STRENGTH else None)

    # -- batching and storage ------------------------------------------------------------

    def shape_key(self) -> tuple:
        """Requests with equal keys can run as one packed pipeline call: everything but the
        prompt, negative prompt, seed and image (text- and image-to-video share one layout), and
        the video too where the mode does not use it. JSON-serialisable when media are paths."""
        mode = self.mode or resolve_mode(None, self.image is not None, self.video is not None)
        family = "text-to-video" if mode == "image-to-video" else MODE_ALIASES.get(mode, mode)
        video = _reference(self.video) if family in TAKES_VIDEO else None
        return (family, self.width, self.height, self.num_frames, self.seconds, self.fps, self.steps,
                self.guidance_scale, self.sampler, self.strength, self.context_frames, self.draft_scale,
                self.upsample_prompt, video)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (media must be paths or URLs; a join's pair becomes a list)."""
        # every field but the media is a scalar: copy only those (dataclasses.asdict deep-copies
        # all); a subclass's own fields (a bulk row's id) are fields of its class
        d = {name: getattr(self, name) for name in _field_names(type(self))}
        for key in ("image", "video"):
            if not isinstance(d[key], (str, type(None))):
                d[key] = deepcopy(d[key])
        if isinstance(d["video"], tuple):
            d["video"] = list(d["video"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationRequest":
        """Inverse of ``to_dict``; unknown keys are a ValueError (a record of another version)."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("video"), list):
            d["video"] = tuple(d["video"])
        return cls(**d)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def resolve_mode(mode: str | None, has_image: bool, has_video: bool, names: dict[str, str] | None = None) -> str:
    """The mode a request means (aliases resolved, inferred from its inputs when None), after
    checking that its inputs fit it; RequestError otherwise."""
    n = lambda f: _name(names, f)  # noqa: E731
    if mode is None:
        mode = "image-to-video" if has_image else "extend-forward" if has_video else "text-to-video"
    if not isinstance(mode, str) or MODE_ALIASES.get(mode, mode) not in MODES:
        raise RequestError("mode", f"unknown {n('mode')} {mode!r}; modes: {list(MODES)}")
    mode = MODE_ALIASES.get(mode, mode)
    if mode in NEEDS_VIDEO and not has_video:
        raise RequestError("video", f"{n('mode')} {mode!r} needs {n('video')}" + (" (a, b)" if mode == "join" else ""))
    if mode == "image-to-video" and not has_image:
        raise RequestError("image", f"{n('mode')} 'image-to-video' needs {n('image')}")
    if has_image and mode not in TAKES_IMAGE:
        raise RequestError("image", f"{n('image')} does not apply to {n('mode')} {mode!r}")
    if has_video and mode not in TAKES_VIDEO:
        raise RequestError("video", f"{n('video')} does not apply to {n('mode')} {mode!r}")
    return mode


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def _name(names: dict[str, str] | None, field: str) -> str:
    return (names or {}).get(field, field)


def _reference(media: Any) -> Any:
    """A hashable, JSON-ready stand-in for media: paths as they are, in-memory objects by identity."""
    if media is None or isinstance(media, str):
        return media
    if isinstance(media, (list, tuple)):  # a join's pair (or a video given as a list of frames)
        return tuple(_reference(m) for m in media)
    return f"object@{id(media):x}"


def _int(field: str, name: str, value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))
            or float(value) != int(value)):
        raise RequestError(field, f"{name} must be a whole number, got {value!r}", code="invalid_type")
    return int(value)


def _float(field: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise RequestError(field, f"{name} must be a finite number, got {value!r}", code="invalid_type")
    return float(value)


def _range(field: str, name: str, value: float, lo: float, hi: float | None, *, lo_open: bool = False) -> None:
    """``value`` within [lo, hi] ((lo, hi] with ``lo_open``; no upper bound when hi is None)."""
    if (value > lo if lo_open else value >= lo) and (hi is None or value <= hi):
        return
    if hi is None:
        need = ("positive" if lo == 0 else f"greater than {lo:g}") if lo_open else f"at least {lo:g}"
    else:
        need = f"in ({lo:g}, {hi:g}]" if lo_open else f"between {lo:g} and {hi:g}"
    raise RequestError(field, f"{name} must be {need}, got {value!r}")
