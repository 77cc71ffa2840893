"""On-screen text: PP-OCR (rapidocr's bundled ONNX models, nothing fetched) measures subtitles
and watermarks as a share of the frame; clean footage reads below the ingest threshold."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from footage import scene, with_subtitle, with_watermark

pytest.importorskip("rapidocr")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def detector():
    from sora.curation.text import TextDetector

    # Nothing may be fetched: any connection attempt while the models load fails the test.
    real = socket.socket.connect

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"text detection tried to reach the network: {args}")

    socket.socket.connect = refuse
    try:
        yield TextDetector()
    finally:
        socket.socket.connect = real


@pytest.fixture(scope="module")
def footage():
    return scene(480, 270, 24, seed=21)[::8]  # three frames of a clip


def test_subtitles_and_watermarks_read_above_the_threshold_clean_below(detector, footage):
    from sora.curation.text import MAX_TEXT_AREA as threshold

    clean = detector.text_area(footage)
    subtitled = detector.text_area(with_subtitle(footage))
    watermarked = detector.text_area(with_watermark(footage))
    assert clean < threshold, clean
    assert subtitled > threshold and watermarked > threshold, (subtitled, watermarked)
    assert subtitled > watermarked  # a subtitle line covers more of the frame than a corner mark


def test_boxes_sit_on_the_text_and_read_it(detector, footage):
    frame = with_subtitle(footage[:1], "Hello from the harbour")[0]
    found = [(box, text, score) for box, text, score in detector.read(frame) if score >= 0.8]
    assert any("harbour" in text.lower() for _, text, _ in found), found
    box = next(box for box, text, _ in found if "harbour" in text.lower())
    H = frame.shape[0]
    assert box[:, 1].min() > 0.75 * H, box  # the subtitle band at the bottom


def test_text_area_is_the_largest_share_over_the_frames(detector, footage):
    mixed = np.concatenate([footage[:2], with_subtitle(footage[2:])])
    assert detector.text_area(mixed) == pytest.approx(detector.covered(with_subtitle(footage[2:])[0]))
    assert detector.covered(footage[0]) == 0.0
