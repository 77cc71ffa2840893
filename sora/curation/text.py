"""On-screen text (subtitles, watermarks, captions burnt into the picture) as a fraction of the
frame, from PP-OCR (Du et al., "PP-OCR: A Practical Ultra Lightweight OCR System", 2020) run by
`rapidocr` on the ONNX models its wheel ships (nothing is downloaded: every model path is set).

Detection alone also fires on busy textures (foliage, fabric); each detected box is therefore
read by the recogniser, and only boxes read with confidence >= `min_confidence` count as text.

Shapes: frames are (T, H, W, 3) uint8 RGB.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

# Default filter: clips whose text covers more of the frame than this are subtitled or watermarked.
MAX_TEXT_AREA = 0.005

# The models of the rapidocr wheel (PP-OCRv6 small det/rec, PP-OCR v2 mobile direction classifier).
_MODELS = {"Det": "PP-OCRv6_det_small.onnx", "Rec": "PP-OCRv6_rec_small.onnx",
           "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx"}


def _models_dir() -> str:
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("on-screen text detection needs rapidocr and onnxruntime: "
                                "`pip install rapidocr==3.10.0 onnxruntime==1.32.0`")
    root = os.path.join(os.path.dirname(spec.origin), "models")
    missing = [name for name in _MODELS.values() if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise FileNotFoundError(f"rapidocr's bundled models {missing} are missing from {root}: "
                                "reinstall rapidocr==3.10.0")
    return root


class TextDetector:
    """PP-OCR text boxes and the share of the frame they cover. Load once, call per frame.

    max_side: frames are scaled so their longer side is at most this (detection cost grows with
    area; subtitles stay legible at 480 px). threads: ONNX Runtime threads (1 suits one Ray CPU).
    """

    def __init__(self, max_side: int = 480, min_confidence: float = 0.8, threads: int = 1):
        from rapidocr import RapidOCR

        root = _models_dir()
        params = {f"{task}.model_path": os.path.join(root, name) for task, name in _MODELS.items()}
        params.update({"Global.use_cls": False, "Global.log_level": "error",
                       "Global.text_score": 0.0, "Det.limit_type": "max", "Det.limit_side_len": max_side,
                       "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                       "EngineConfig.onnxruntime.inter_op_num_threads": 1})
        self.engine = RapidOCR(params=params)
        self.min_confidence = min_confidence

    def read(self, frame: np.ndarray) -> list[tuple[np.ndarray, str, float]]:
        """Text in one (H, W, 3) uint8 RGB frame: [(corners (4, 2) in pixels, text, confidence)]."""
        # rapidocr takes OpenCV's channel order
        result = self.engine(np.ascontiguousarray(frame[..., ::-1]), use_det=True, use_cls=False, use_rec=True)
        if result.boxes is None:
            return []
        return [(np.asarray(box, np.float32), str(text), float(score))
                for box, text, score in zip(result.boxes, result.txts, result.scores)]

    def covered(self, frame: np.ndarray) -> float:
        """Fraction of the frame inside boxes read as text (overlaps counted once)."""
        from PIL import Image, ImageDraw

        H, W = frame.shape[:2]
        mask = Image.new("L", (W, H), 0)
        draw = ImageDraw.Draw(mask)
        for box, text, score in self.read(frame):
            if score >= self.min_confidence and text.strip():
                draw.polygon([(float(x), float(y)) for x, y in box], fill=1)
        return float(np.asarray(mask, np.float32).mean())

    def text_area(self, frames: np.ndarray) -> float:
        """The largest share of the frame covered by text over `frames` (T, H, W, 3): a few
        frames of a clip; subtitles that come and go count when they are there."""
        frames = np.asarray(frames)
        assert frames.ndim == 4 and frames.shape[-1] == 3 and len(frames), \
            f"frames must be (T, H, W, 3) with T >= 1, got {frames.shape}"
        return max(self.covered(f) for f in frames)
