"""The model directory: what training writes and generation loads.

    MODEL/
      model_index.json     which components, where, and the settings that tie them together
      vae/                 config.json + model.safetensors (sora.vae.load_vae reads it)
      dit/                 config.json + model.safetensors (the EMA weights)
      text_encoder/        optional: a Hugging Face encoder dir; else a reference (see below)
      upsampler/           optional: the prompt upsampler (a Hugging Face text model dir)

`model_index.json`:

    {"format": "sora-ray/1",
     "vae": "vae", "dit": "dit", "upsampler": null,
     "text_encoder": {"path": null, "max_length": 64},   # null path = the offline MiniLM;
                                                          # a relative path = inside MODEL/;
                                                          # an absolute path = installed elsewhere
     "patch_size": [1, 2, 2],
     "flow": {"base_shift": 1.0, "max_shift": 8.0, "base_tokens": 256, "max_tokens": 4096},
     "defaults": {"fps": 12, "width": 128, "height": 72, "num_frames": 17,
                  "num_inference_steps": 30, "guidance_scale": 4.0},
     "training": {...free-form provenance: data, steps, loss...}}

Nothing is pickled: every weight file is safetensors, every setting JSON.

A diffusers Wan directory (``sora.wan``) is a model directory too: ``read_index`` gives the
equivalent index, built from its configs (``"wan"`` says so; its ``"flow"`` holds the scheduler
config whose time grid it samples on). A directory of ours may reference a Wan base instead of
copying it, e.g. a LoRA fine-tune:

    {"format": "sora-ray/1", "wan": {"base": BASE}, "lora": {"path": "lora", "scale": 1.0}, ...}

its index is then the base's with its own keys on top. Any model directory may be given as an
fsspec URL (``s3://...``): ``fetch_model_dir`` copies it to a local cache first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

FORMAT = "sora-ray/1"
INDEX = "model_index.json"


def default_index() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "vae": "vae",
        "dit": "dit",
        "upsampler": None,
        "text_encoder": {"path": None, "max_length": 64},
        "patch_size": [1, 2, 2],
        "flow": {"base_shift": 1.0, "max_shift": 8.0, "base_tokens": 256, "max_tokens": 4096},
        "defaults": {"fps": 12, "width": 128, "height": 72, "num_frames": 17, "num_inference_steps": 30,
                     "guidance_scale": 4.0},
        "training": {},
    }


def write_index(directory: str, index: dict[str, Any]) -> None:
    assert index.get("format") == FORMAT, f"model_index format must be {FORMAT!r}"
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{INDEX}.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, INDEX))


def read_index(directory: str) -> dict[str, Any]:
    """The index of a model directory: ours as stored (missing keys from ``default_index``), or a
    diffusers Wan directory's equivalent (``sora.wan.wan_index``, from its JSON files alone). A
    directory of another architecture raises ValueError naming it. At a URL, only its JSON files
    are fetched (``fetch_model_dir(json_only=True)``)."""
    if is_url(directory):  # its settings only: no weights are fetched to read an index
        directory = fetch_model_dir(directory, json_only=True)
    path = os.path.join(directory, INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a model directory: no {INDEX} (train one with `sora train`)")
    with open(path) as f:
        index = json.load(f)
    if "format" not in index and "_class_name" in index:  # a diffusers pipeline directory
        from sora.wan import wan_index

        return wan_index(directory)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {index.get('format')!r}, expected {FORMAT!r}")
    if index.get("wan"):  # ours, referencing a Wan base directory (e.g. a LoRA fine-tune of it)
        from sora.wan import wan_index

        base = wan_index(component_path(directory, index["wan"]["base"]))
        return {**base, **index, "wan": {**base["wan"], **index["wan"], "base": base["wan"]["base"]}}
    merged = default_index()
    merged.update(index)
    return merged


def component_path(directory: str, ref: str | None) -> str | None:
    """Resolve a component reference of the index: None stays None, relative is inside MODEL/."""
    if ref is None:
        return None
    return ref if os.path.isabs(ref) else os.path.join(directory, ref)


def load_text_encoder(directory: str, index: dict[str, Any] | None = None, device="cpu"):
    """The text encoder a model directory generates with, with its tokenizer settings: a Wan
    directory's UMT5 (512 tokens, Wan's prompt cleaning), else the index's encoder."""
    index = read_index(directory) if index is None else index
    if index.get("wan"):
        from sora.wan import load_text_encoder as load_umt5

        return load_umt5(index["wan"]["base"], device=device)
    from sora.text_encoder import TextEncoder

    te = index.get("text_encoder") or {}
    return TextEncoder.from_pretrained(component_path(directory, te.get("path")),
                                       max_length=int(te.get("max_length", 64)), device=device)


def component_id(path: str) -> str:
    """A component directory's identity: its name plus a hash of its config.json and its weight
    files' names and sizes (e.g. "vae@1a2b3c4d5e6f"; what latents record as their ``vae``)."""
    h = hashlib.sha1()
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if name == "config.json":
            with open(p, "rb") as f:
                h.update(f.read())
        elif name.endswith(".safetensors"):
            h.update(f"{name}:{os.path.getsize(p)}".encode())
    return f"{os.path.basename(os.path.normpath(path))}@{h.hexdigest()[:12]}"


def text_encoder_name(directory: str, index: dict[str, Any] | None = None) -> str:
    """What latents record as their ``text_encoder`` when encoded with a model directory's text
    encoder: for a Wan directory "wan:" + ``component_id`` of its text_encoder/ + "/" + its token
    length; for ours the encoder's directory (None: "minilm"), which `sora train` references."""
    index = read_index(directory) if index is None else index
    te = index.get("text_encoder") or {}
    path = component_path(directory, te.get("path"))
    if index.get("wan"):
        return f"wan:{component_id(path)}/{te['max_length']}"
    return path or "minilm"


# ----------------------------------------------------------------------------------------
# Model directories at fsspec URLs
# ----------------------------------------------------------------------------------------

DEFAULT_CACHE = os.path.join("~", ".cache", "sora-ray", "models")  # where fetch_model_dir copies URLs to


def is_url(path: str) -> bool:
    """True for an fsspec URL other than a local file (``s3://``, ``gs://``, ``memory://``)."""
    return "://" in str(path) and not str(path).startswith("file://")


def fetch_model_dir(path: str, cache_dir: str | None = None, json_only: bool = False) -> str:
    """A local directory holding the directory ``path`` (a model, or a LoRA adapter): ``path``
    itself when local, else a copy of the URL's directory under ``cache_dir`` (default
    ``~/.cache/sora-ray/models``); ``json_only``: its JSON files alone (settings, no weights).

    The copy is named by a hash of the URL and of its files' names, sizes and modification
    stamps, so a changed remote directory is fetched again; it is written to a temporary
    directory and renamed into place whole, so an interrupted fetch is never taken for a model."""
    path = str(path)
    if not is_url(path):
        return path[len("file://"):] if path.startswith("file://") else path
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"{path}: no such directory")
    files = sorted((k, v) for k, v in fs.find(root, detail=True).items() if not json_only or k.endswith(".json"))
    h = hashlib.sha1(f"{path}{' json' if json_only else ''}".encode())
    for name, info in files:
        stamp = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "created") if k in info), "")
        h.update(f"\x1f{name[len(root):]}:{info.get('size')}:{stamp}".encode())
    cache = os.path.expanduser(cache_dir or DEFAULT_CACHE)
    target = os.path.join(cache, f"{path.rstrip('/').rsplit('/', 1)[-1]}-{h.hexdigest()[:16]}")
    if os.path.isdir(target):
        return target
    tmp = f"{target}.tmp-{os.getpid()}"
    for name, _ in files:
        local = os.path.join(tmp, *name[len(root):].strip("/").split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(name, local)
    try:
        os.replace(tmp, target)
    except OSError:  # another process put the same copy in place first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_model_dir(path: str) -> None:
    """Raise FileNotFoundError / ValueError (naming the fix) unless ``path`` is a model
    directory we can load: its index is read from its JSON files alone (no weights)."""
    read_index(path)


@dataclass
class ModelSource:
    """Which model a command generates with: a model directory and an optional LoRA adapter
    (``SoraPipeline.from_pretrained(model, lora=lora, lora_scale=lora_scale)``)."""

    model: str  # model directory: ours (from `sora train`) or a diffusers Wan directory; a path or fsspec URL
    lora: str | None = None  # LoRA adapter directory for a Wan model (diffusers' layout), a path or URL
    lora_scale: float = 1.0  # strength of the LoRA adapter (1: as trained, 0: the base model)

    def __post_init__(self) -> None:
        if not math.isfinite(self.lora_scale):
            raise ValueError(f"lora_scale must be a finite number, got {self.lora_scale}")

    def check(self) -> None:
        """FileNotFoundError / ValueError naming the fix unless the model directory loads and the
        adapter fits it: the model's JSON files and the adapter are read, no model weights."""
        check_model_dir(self.model)
        if self.lora is not None:
            from sora.wan_lora import check_adapter

            check_adapter(fetch_model_dir(self.model, json_only=True), fetch_model_dir(self.lora))

    def absolute(self) -> "ModelSource":
        """The same source with local paths made absolute (for Ray actors and replicas)."""
        fix = lambda p: p if p is None or is_url(p) else os.path.abspath(p)  # noqa: E731
        return ModelSource(fix(self.model), fix(self.lora), self.lora_scale)
