"""The request side of the OpenAI-style videos API: parse, validate, and turn into a job plan.

Pure functions over bytes and dicts (no Ray, no web framework), so every rule here is tested
directly and the ingress stays thin. Every rejection is an `APIError`: an HTTP status in the
4xx range and an OpenAI-style body

    {"error": {"message": "...", "type": "invalid_request_error", "param": "size", "code": "invalid_value"}}

with a message written for the client, never a traceback.

Accepted bodies: application/json, multipart/form-data (what the `openai` client sends for
`videos.create`, files or not) and application/x-www-form-urlencoded. Multipart is parsed with
the standard library's MIME parser over a body whose size was already bounded, so no extra
dependency (python-multipart) is needed and nothing is streamed to disk.

A create or remix becomes a `sora.request.GenerationRequest`, checked by its own `validate`
against `sora.request.Limits` (what a request may ask for); `HTTPLimits` bounds what only HTTP
carries (body and upload sizes). Sizes: any even WxH within the limits; OpenAI's preset sizes
(720x1280, 1280x720, 1024x1792, 1792x1024) are scaled down, keeping their aspect, to the
model's pixel budget (its default width x height, or `HTTPLimits.preset_pixels`). `seconds` is
a string or a number. Extensions beyond OpenAI's fields (send them with the client's
`extra_body`): `seed`, `num_inference_steps`, `guidance_scale`, and `strength` for remix.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any

from pipelines.video_jobs import ID_RE, VARIANTS
from sora.request import GenerationRequest, Limits, RequestError

OPENAI_SIZES = ("720x1280", "1280x720", "1024x1792", "1792x1024")
OPENAI_MODELS = ("sora-2", "sora-2-pro", "sora-2-2025-10-06", "sora-2-pro-2025-10-06", "sora-2-2025-12-08")
CREATE_FIELDS = frozenset({"prompt", "model", "seconds", "size", "input_reference", "seed", "num_inference_steps",
                           "guidance_scale"})
REMIX_FIELDS = frozenset({"prompt", "seed", "num_inference_steps", "guidance_scale", "strength"})
LIST_PARAMS = frozenset({"after", "limit", "order"})
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# How the API names a request's fields (in messages and an error's "param").
API_NAMES = {"steps": "num_inference_steps", "num_frames": "seconds", "image": "input_reference",
             "video": "video_id"}
# A created image-to-video request's image until the ingress has stored it (`JobStore.input_url`).
UPLOADED_IMAGE = "input_reference"


class APIError(Exception):
    """An HTTP error with an OpenAI-style JSON body. ``headers`` e.g. Retry-After for 429."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class HTTPLimits:
    """What only an HTTP request carries; what it may ask for is `sora.request.Limits`."""

    max_body_bytes: int = 8 << 20  # the whole request body (JSON or multipart), in bytes
    max_image_bytes: int = 6 << 20  # the input_reference file, in bytes
    max_image_pixels: int = 4096 * 4096  # input_reference width x height, read from its header before decoding
    preset_pixels: int | None = None  # OpenAI preset sizes are scaled to this area (None: the model's default area)

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            if v is not None and not (isinstance(v, int) and v > 0):
                raise ValueError(f"HTTPLimits.{k} must be a positive integer, got {v!r}")


@dataclass
class ModelInfo:
    """What the API needs to know of the served model (from its model_index.json)."""

    name: str
    width: int
    height: int
    fps: float
    num_frames: int
    steps: int
    guidance_scale: float
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_index(cls, index: dict[str, Any], name: str) -> "ModelInfo":
        d = index["defaults"]
        return cls(name=name, width=int(d["width"]), height=int(d["height"]), fps=float(d["fps"]),
                   num_frames=int(d["num_frames"]), steps=int(d["num_inference_steps"]),
                   guidance_scale=float(d["guidance_scale"]), aliases=(name, *OPENAI_MODELS))


@dataclass
class Upload:
    filename: str | None
    content_type: str
    data: bytes


# ----------------------------------------------------------------------------------------
# Bodies
# ----------------------------------------------------------------------------------------


def parse_body(content_type: str | None, body: bytes) -> tuple[dict[str, Any], dict[str, Upload]]:
    """Request body -> (fields, files). JSON fields keep their JSON types; form fields are
    strings. Raises APIError 400 (malformed) or 415 (a content type we do not read)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in ("application/json", ""):
        if not body.strip():
            raise bad("the request body is empty; send a JSON object", code="invalid_json")
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise bad("the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise bad("the request body must be a JSON object", code="invalid_json")
        return obj, {}
    if media == "multipart/form-data":
        return parse_multipart(content_type or "", body)
    if media == "application/x-www-form-urlencoded":
        from urllib.parse import parse_qsl

        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body),
                              max_num_fields=64)
        except (ValueError, UnicodeDecodeError):
            raise bad("the form body is malformed", code="invalid_form") from None
        return _unique(pairs), {}
    raise APIError(415, f"unsupported content type {media!r}; send application/json or multipart/form-data",
                   code="unsupported_media_type")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise bad(f"parameter {k!r} is given more than once", param=k, code="duplicate_parameter")
        out[k] = v
    return out


def parse_multipart(content_type: str, body: bytes, max_parts: int = 32) -> tuple[dict[str, str], dict[str, Upload]]:
    """multipart/form-data -> (text fields, file parts), by the standard MIME parser. Parts
    with a filename (or a non-text content type) are files; the rest are UTF-8 text."""
    from email import policy
    from email.parser import BytesParser
    from email.utils import collapse_rfc2231_value

    if "boundary=" not in content_type.lower():
        raise bad("multipart/form-data needs a boundary parameter", code="invalid_form")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    try:
        msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
        parts = list(msg.iter_parts()) if msg.is_multipart() else []
    except Exception:  # noqa: BLE001 - the MIME parser's error types are not documented
        raise bad("the multipart body is malformed", code="invalid_form") from None
    if not parts:
        raise bad("the multipart body has no parts (or a wrong boundary)", code="invalid_form")
    if len(parts) > max_parts:
        raise bad(f"too many multipart parts ({len(parts)} > {max_parts})", code="invalid_form")
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, Upload]] = []
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise bad("a multipart part has no name", code="invalid_form")
        name = collapse_rfc2231_value(name)
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):  # a nested multipart
            raise bad(f"multipart part {name!r} is not a plain value or file", param=name, code="invalid_form")
        filename = part.get_filename()
        ctype = part.get_content_type()
        if filename is not None or not ctype.startswith("text/"):
            files.append((name, Upload(filename, ctype, data)))
            continue
        try:
            fields.append((name, data.decode("utf-8")))
        except UnicodeDecodeError:
            raise bad(f"multipart field {name!r} is not UTF-8 text", param=name, code="invalid_form") from None
    text, uploads = _unique(fields), _unique(files)
    both = set(text) & set(uploads)
    if both:
        raise bad(f"parameter {sorted(both)[0]!r} is given more than once", param=sorted(both)[0],
                  code="duplicate_parameter")
    return text, uploads


# ----------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------

_INT = re.compile(r"[+-]?\d{1,19}", re.ASCII)
_FLOAT = re.compile(r"[+-]?(\d{1,12}(\.\d{0,12})?|\.\d{1,12})([eE][+-]?\d{1,3})?", re.ASCII)


def number(value: Any, name: str, lo: float | None = None, hi: float | None = None, *,
           integer: bool = False) -> float | int:
    """A JSON number or a decimal string, finite (and within [lo, hi] when given); bools are not
    numbers. What a generation request may ask for is checked later, by the request itself."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, str) and len(value) <= 48:
        text = value.strip()
        if not (_INT if integer else _FLOAT).fullmatch(text):
            raise bad(f"{name} must be {kind}, got {value!r}", param=name, code="invalid_type")
        value = int(text) if integer else float(text)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be {kind}, got {type(value).__name__}", param=name, code="invalid_type")
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise bad(f"{name} must be {kind}, got {value!r}", param=name, code="invalid_type")
        value = int(value)
    if not math.isfinite(value):
        raise bad(f"{name} must be a finite number, got {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(f"{name} must be between {lo:g} and {hi:g}, got {value!r}", param=name)
    return value


def text_field(value: Any, name: str) -> str:
    """A string parameter, stripped (its length and content are the request's to check)."""
    if not isinstance(value, str):
        raise bad(f"{name} must be a string, got {type(value).__name__}", param=name, code="invalid_type")
    return value.strip()


def checked(request: GenerationRequest, limits: Limits) -> GenerationRequest:
    """``request.validate(limits)``, its RequestError answered as a 400 naming the API's parameter."""
    try:
        return request.validate(limits, names=API_NAMES)
    except RequestError as e:
        code = "invalid_type" if e.code == "invalid_type" else "invalid_value"
        raise bad(str(e), param=API_NAMES.get(e.field, e.field), code=code) from None


def resolve_size(value: Any, limits: Limits, model: ModelInfo, http: HTTPLimits | None = None) -> tuple[str, int, int]:
    """``size`` -> (the size string to report, width, height to generate)."""
    if value is None:
        return f"{model.width}x{model.height}", model.width, model.height
    if not isinstance(value, str):
        raise bad(f"size must be a string like '1280x720', got {type(value).__name__}", param="size",
                  code="invalid_type")
    m = re.fullmatch(r"\s*(\d{1,6})\s*x\s*(\d{1,6})\s*", value, flags=re.IGNORECASE | re.ASCII)
    if not m:
        raise bad(f"size must look like WIDTHxHEIGHT (e.g. '1280x720'), got {value[:40]!r}", param="size")
    w, h = int(m.group(1)), int(m.group(2))
    label = f"{w}x{h}"
    if label in OPENAI_SIZES:
        budget = (http.preset_pixels if http is not None else None) or model.width * model.height
        budget = min(budget, limits.max_pixels or budget)
        scale = min(1.0, math.sqrt(budget / (w * h)))
        # floor to even sides: the area stays within the budget, and H.264 4:2:0 needs even sides
        gw, gh = (max(limits.min_side, int(s * scale) // 2 * 2) for s in (w, h))
        return label, gw, gh
    try:
        limits.check_size(w, h, API_NAMES)
    except RequestError as e:
        raise bad(str(e), param="size") from None
    return label, w, h


def resolve_seconds(value: Any, limits: Limits, model: ModelInfo) -> tuple[str, int]:
    """``seconds`` (string or number) -> (the seconds string to report, frames at the model's fps)."""
    if value is None:
        return format(model.num_frames / model.fps, "g"), model.num_frames
    s = number(value, "seconds")
    try:
        limits.check_seconds(s, API_NAMES)
    except RequestError as e:
        raise bad(str(e), param="seconds") from None
    return format(s, "g"), max(1, int(round(s * model.fps)))


def decode_image(data: bytes, limits: HTTPLimits, param: str = "input_reference") -> tuple[bytes, tuple[int, int]]:
    """Untrusted image bytes -> (a clean RGB PNG, (width, height)). Only PNG, JPEG and WebP;
    the pixel count is checked from the header before decoding (decompression bombs), and any
    decoder failure is a 400."""
    from PIL import Image

    if not data:
        raise bad(f"{param} is empty", param=param, code="invalid_image")
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"{param} is {len(data)} bytes, more than the limit of {limits.max_image_bytes}",
                       param=param, code="image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
            w, h = im.size
            if w < 1 or h < 1 or w * h > limits.max_image_pixels:
                raise APIError(400, f"{param} is {w}x{h}; at most {limits.max_image_pixels} pixels are accepted",
                               param=param, code="image_too_large")
            im.seek(0)  # the first frame of an animated WebP
            rgb = im.convert("RGB")
    except APIError:
        raise
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError...)
        raise bad(f"{param} is not a readable PNG, JPEG or WebP image", param=param, code="invalid_image") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue(), (w, h)


def reference_bytes(fields: dict[str, Any], files: dict[str, Upload]) -> bytes | None:
    """The raw bytes of ``input_reference``: an uploaded file, or {"image_url": "data:..."}
    (JSON, or the form keys input_reference[image_url]). URLs are never fetched."""
    if "input_reference" in files:
        return files["input_reference"].data
    ref = fields.get("input_reference")
    form_keys = {k[len("input_reference["):-1]: v for k, v in fields.items()
                 if k.startswith("input_reference[") and k.endswith("]")}
    if ref is None and form_keys:
        ref = form_keys
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise bad("input_reference must be an image file upload or {\"image_url\": \"data:image/...;base64,...\"}",
                  param="input_reference", code="invalid_type")
    if set(ref) - {"image_url", "file_id"}:
        raise bad(f"input_reference has unknown keys {sorted(set(ref) - {'image_url', 'file_id'})}",
                  param="input_reference", code="unknown_parameter")
    if "file_id" in ref:
        raise bad("input_reference.file_id is not supported here; upload the image or send a data: URL",
                  param="input_reference", code="unsupported_parameter")
    url = ref.get("image_url")
    if not isinstance(url, str):
        raise bad("input_reference.image_url must be a string", param="input_reference", code="invalid_type")
    m = re.fullmatch(r"data:image/(png|jpeg|jpg|webp);base64,([A-Za-z0-9+/=\s]*)", url, flags=re.IGNORECASE)
    if not m:
        raise bad("input_reference.image_url must be a base64 data: URL of a PNG, JPEG or WebP image "
                  "(this server does not fetch URLs)", param="input_reference")
    try:
        return base64.b64decode("".join(m.group(2).split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad("input_reference.image_url has invalid base64", param="input_reference",
                  code="invalid_image") from None


# ----------------------------------------------------------------------------------------
# Requests -> job plans
# ----------------------------------------------------------------------------------------


def _known(fields: dict[str, Any], files: dict[str, Upload], allowed: frozenset[str]) -> None:
    for k in list(fields) + list(files):
        base = k.split("[", 1)[0] if k.startswith("input_reference[") else k
        if base not in allowed:
            raise bad(f"unknown parameter {k[:60]!r}", param=k[:60], code="unknown_parameter")
    if "prompt" not in fields:
        raise bad("prompt is required", param="prompt", code="missing_required_parameter")


def _sampling(fields: dict[str, Any], model: ModelInfo) -> dict[str, Any]:
    """steps, guidance and seed as numbers (the model's defaults; a fresh seed, stored with the job)."""
    steps, guidance, seed = fields.get("num_inference_steps"), fields.get("guidance_scale"), fields.get("seed")
    return {
        "steps": model.steps if steps is None else number(steps, "num_inference_steps", integer=True),
        "guidance_scale": model.guidance_scale if guidance is None else float(number(guidance, "guidance_scale")),
        "seed": secrets.randbelow(2 ** 31) if seed is None else number(seed, "seed", integer=True),
    }


def parse_create(fields: dict[str, Any], files: dict[str, Upload], limits: Limits, model: ModelInfo,
                 http: HTTPLimits | None = None) -> tuple[dict[str, Any], bytes | None]:
    """POST /v1/videos fields -> (record fields for `video_jobs.new_record` with the checked
    ``request``, the reference PNG or None). An image-to-video request's image is
    `UPLOADED_IMAGE` until the ingress has stored the PNG."""
    http = http or HTTPLimits()
    _known(fields, files, CREATE_FIELDS)
    prompt = text_field(fields["prompt"], "prompt")
    name = fields.get("model")
    if name is None:
        name = model.name
    elif not isinstance(name, str):
        raise bad("model must be a string", param="model", code="invalid_type")
    elif name not in model.aliases:
        raise APIError(404, f"model {name[:64]!r} does not exist; this server offers {list(model.aliases)}",
                       param="model", code="model_not_found")
    size, width, height = resolve_size(fields.get("size"), limits, model, http)
    seconds, num_frames = resolve_seconds(fields.get("seconds"), limits, model)
    raw = reference_bytes(fields, files)
    image = None if raw is None else decode_image(raw, http)[0]
    request = checked(GenerationRequest(
        prompt=prompt, mode="image-to-video" if image is not None else "text-to-video", width=width, height=height,
        num_frames=num_frames, fps=model.fps, image=None if image is None else UPLOADED_IMAGE,
        **_sampling(fields, model)), limits)
    return {"model": name, "prompt": request.prompt, "size": size, "seconds": seconds,
            "output_size": f"{width}x{height}", "request": request}, image


def parse_remix(fields: dict[str, Any], files: dict[str, Upload], limits: Limits, model: ModelInfo,
                source: dict[str, Any], source_request: GenerationRequest, source_video: str,
                default_strength: float) -> dict[str, Any]:
    """POST /v1/videos/{id}/remix fields + the finished source record (its request, and the URL
    of its video) -> record fields of an edit (SDEdit of the source video at ``strength``),
    same size and length as the source."""
    _known(fields, files, REMIX_FIELDS)
    prompt = text_field(fields["prompt"], "prompt")
    if source.get("status") != "completed":
        raise bad(f"video {source['id']} is {source.get('status')}; only a completed video can be remixed",
                  param="video_id", code="video_not_ready")
    strength = fields.get("strength")
    src = source_request
    request = checked(GenerationRequest(
        prompt=prompt, mode="edit", width=src.width, height=src.height, num_frames=src.num_frames, fps=src.fps,
        strength=default_strength if strength is None else float(number(strength, "strength")), video=source_video,
        **_sampling(fields, model)), limits)
    return {"model": source["model"], "prompt": request.prompt, "size": source["size"], "seconds": source["seconds"],
            "output_size": source.get("output_size"), "request": request, "remixed_from": source["id"]}


def parse_list_query(params: dict[str, str]) -> tuple[str | None, int, str]:
    """GET /v1/videos query -> (after, limit, order)."""
    for k in params:
        if k not in LIST_PARAMS:
            raise bad(f"unknown query parameter {k[:60]!r}", param=k[:60], code="unknown_parameter")
    after = params.get("after")
    if after is not None and not ID_RE.fullmatch(after):
        raise bad("after must be a video id from a previous page", param="after")
    limit = int(number(params.get("limit", "20"), "limit", 1, 100, integer=True))
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad(f"order must be 'asc' or 'desc', got {order[:20]!r}", param="order")
    return after, limit, order


def parse_variant(params: dict[str, str]) -> str:
    for k in params:
        if k != "variant":
            raise bad(f"unknown query parameter {k[:60]!r}", param=k[:60], code="unknown_parameter")
    variant = params.get("variant", "video")
    if variant not in VARIANTS:
        raise bad(f"variant must be one of {list(VARIANTS)}, got {variant[:20]!r}", param="variant")
    return variant
