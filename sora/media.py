"""Images and videos in and out of the pipeline: any common form -> (T, H, W, 3) uint8, and back.

    frames = to_frames("first.png")                       # (1, H, W, 3) uint8
    export_to_video(out.frames, "red.mp4", fps=out.fps)   # out: a SoraPipelineOutput
"""

from __future__ import annotations

import os

import numpy as np
import torch


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
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"{name}: a tensor must be (3, H, W) or (T, 3, H, W), got {tuple(media.shape)}")
        return (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if isinstance(media, (list, tuple)) and media and not isinstance(media[0], (int, float)):
        return np.concatenate([to_frames(m, name) for m in media])
    if hasattr(media, "convert"):  # a PIL image
        return np.asarray(media.convert("RGB"))[None]
    a = np.asarray(media)
    a = a[None] if a.ndim == 3 else a
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name}: frames must be (H, W, 3) or (T, H, W, 3), got {a.shape}")
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if len(a) < 1:
        raise ValueError(f"{name}: no frames")
    return a


def export_to_video(frames, path: str, fps: float = 12.0, **kwargs) -> str:
    """Write frames (any form ``to_frames`` accepts, e.g. ``output.frames``) to a video file or
    fsspec URL (container from the extension; H.264 for .mp4). Returns ``path``."""
    from sora.video_io import write_video

    write_video(path, to_frames(frames, "frames"), fps, **kwargs)
    return path


def format_frames(frames: np.ndarray, output_type: str):
    """(T, H, W, 3) uint8 -> "np" as is, "pil" a list of PIL images, "pt" a (T, 3, H, W) float
    tensor in [0, 1]."""
    if output_type == "np":
        return frames
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(f) for f in frames]
    if output_type == "pt":
        return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
    raise ValueError(f"output_type must be 'np', 'pil' or 'pt', got {output_type!r}")
