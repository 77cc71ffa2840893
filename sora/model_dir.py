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
"""

from __future__ import annotations

import json
import os
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
    path = os.path.join(directory, INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a model directory: no {INDEX} (train one with `sora train`)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {index.get('format')!r}, expected {FORMAT!r}")
    merged = default_index()
    merged.update(index)
    return merged


def component_path(directory: str, ref: str | None) -> str | None:
    """Resolve a component reference of the index: None stays None, relative is inside MODEL/."""
    if ref is None:
        return None
    return ref if os.path.isabs(ref) else os.path.join(directory, ref)
