"""The analytic evaluator: recovers colour, shape, size, motion and track of the main object,
from real H.264 files (the acceptance test), clean renders, and blurred noisy frames."""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import pytest

from sora.evaluator import _blur, _label_runs, accuracy, analyze, largest_components, score
from sora.shapes import BACKGROUNDS, TINY, ClipSpec, ObjectSpec, render, sample_clip, synth_dataset


def test_acceptance_99_percent_of_500_h264_clips(tmp_path):
    """THE acceptance test: synth 500 clips (small sizes, all six aspect ratios, one and two
    objects), encode them to H.264, decode the files, and recover the main object."""
    t0 = time.perf_counter()
    records = synth_dataset(str(tmp_path), 500, seed=2024, ranges=TINY)
    t1 = time.perf_counter()
    rows = [score(str(tmp_path / r["file"]), r) for r in records]
    t2 = time.perf_counter()
    acc = accuracy(rows)
    print("\nevaluator on 500 H.264 clips: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
          + f"  (synth {t1 - t0:.1f} s, evaluate {t2 - t1:.1f} s)")
    assert len({r["aspect_ratio"] for r in records}) == 6
    assert sum(r["num_objects"] == 2 for r in records) > 100
    for attr in ("color", "shape", "size", "motion", "background", "all"):
        assert acc[attr] >= 0.99, (attr, acc)


def test_track_follows_the_spec_and_the_main_object_is_picked_among_two():
    for i in range(60):
        spec = sample_clip(8, i, ranges=TINY)
        a = analyze(render(spec))
        truth = spec.objects[0].centres(spec.num_frames)
        assert a.found_frames == spec.num_frames
        err_px = np.abs((a.track - truth) * [spec.width, spec.height])
        assert err_px.max() < 0.25, (i, err_px.max())  # sub-pixel on clean frames
        assert a.side == pytest.approx(0.18 if spec.objects[0].size == "small" else 0.36, rel=0.04)
    # a hand-made two-object clip: the large object is the main one even when it is dimmer
    main = ObjectSpec("square", "blue", "large", "down", 0.25, 0.3, 0.25, 0.7)
    other = ObjectSpec("circle", "white", "small", "left", 0.8, 0.5, 0.6, 0.5)
    a = analyze(render(ClipSpec((main, other), "gray", 160, 96, 9, 8)))
    assert (a.color, a.shape, a.size, a.motion, a.background) == ("blue", "square", "large", "down", "gray")


def _degrade(frames: np.ndarray, background: str, rng: np.random.Generator) -> np.ndarray:
    """What a generator might produce: blur (sigma 1.5 px), washed-out colour, noise (sigma 8)."""
    bg = np.asarray(BACKGROUNDS[background], dtype=np.float64)
    x = frames.astype(np.float64) - bg  # blur the difference, so the border stays background
    x = _blur(x.transpose(0, 3, 1, 2), 1.5).transpose(0, 2, 3, 1)  # blur over (H, W)
    x = x + bg
    x = 0.85 * x + 0.15 * x.mean(-1, keepdims=True)
    return np.clip(x + rng.normal(0, 8, x.shape), 0, 255).astype(np.uint8)


def test_robust_to_blur_fading_and_noise():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        spec = sample_clip(99, i, ranges=TINY)
        rows.append(score(_degrade(render(spec), spec.background, rng), spec.attributes()))
    acc = accuracy(rows)
    print(f"\nevaluator on 80 blurred, faded, noisy clips: {acc}")
    assert acc["all"] >= 0.97, acc


def test_score_flags_wrong_attributes_and_ignores_missing_ones():
    spec = ClipSpec((ObjectSpec("triangle", "green", "small", "still", 0.5, 0.5, 0.5, 0.5),), "black", 96, 64, 9, 8)
    frames = render(spec)
    ok = score(frames, {"color": "green", "shape": "triangle", "size": "small", "motion": "still"})
    assert ok["all_ok"] and "background_ok" not in ok
    wrong = score(frames, {"color": "red", "shape": "triangle", "size": "large", "motion": "left", "background": "navy"})
    assert (wrong["color_ok"], wrong["shape_ok"], wrong["size_ok"], wrong["motion_ok"], wrong["background_ok"]) == \
        (False, True, False, False, False)
    assert not wrong["all_ok"] and wrong["color"] == "green" and wrong["background"] == "black"
    partial = score(frames, {"color": "green", "shape": None})
    assert partial["all_ok"]


def test_empty_video_finds_nothing():
    frames = np.zeros((5, 32, 48, 3), np.uint8)
    frames[:] = BACKGROUNDS["navy"]
    a = analyze(frames)
    assert (a.color, a.shape, a.size, a.motion, a.found_frames) == (None, None, None, None, 0)
    assert a.background == "navy" and np.isnan(a.track).all()
    assert not score(frames, {"color": "red", "shape": "circle", "size": "small", "motion": "up"})["all_ok"]


def _flood_fill_labels(mask: np.ndarray) -> np.ndarray:
    """Reference 4-connected labelling of a (H, W) mask by breadth-first search."""
    H, W = mask.shape
    labels = np.full((H, W), -1)
    n = 0
    for y in range(H):
        for x in range(W):
            if mask[y, x] and labels[y, x] < 0:
                labels[y, x] = n
                queue = deque([(y, x)])
                while queue:
                    cy, cx = queue.popleft()
                    for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                        if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and labels[ny, nx] < 0:
                            labels[ny, nx] = n
                            queue.append((ny, nx))
                n += 1
    return labels


@pytest.mark.parametrize("density", [0.3, 0.55, 0.7])
def test_connected_components_match_a_flood_fill(density):
    rng = np.random.default_rng(int(density * 100))
    mask = rng.random((3, 23, 31)) < density  # (T, H, W); frames must not connect
    T, H, W = mask.shape
    row, start, end, label = _label_runs(mask)
    ours = np.full(T * H * W, -1)
    for r, s, e, lab in zip(row, start, end, label):
        ours[r * W + s:r * W + e] = lab
    ours = ours.reshape(T, H, W)
    for t in range(T):
        ref = _flood_fill_labels(mask[t])
        assert np.array_equal(ours[t] >= 0, ref >= 0)
        pairs = {(a, b) for a, b in zip(ours[t][mask[t]], ref[mask[t]])}
        # the same partition: a bijection between our labels and the reference labels
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    frames, keep = largest_components(mask)
    assert list(frames) == [0, 1, 2]
    for t in range(T):
        ref = _flood_fill_labels(mask[t])
        sizes = np.bincount(ref[ref >= 0])
        assert keep[t].sum() == sizes.max()
        assert len(np.unique(ref[keep[t]])) == 1


def test_only_specks_below_min_pixels_mean_no_object_not_a_crash():
    """A generated video with a few stray foreground pixels and no real object (seen from an
    undertrained DiT) is 'nothing found', as an empty frame is."""
    mask = np.zeros((2, 16, 16), dtype=bool)
    mask[0, 3, 3] = mask[1, 8, 9] = mask[1, 8, 10] = True  # components of 1 and 2 pixels
    frames, keep = largest_components(mask, min_pixels=4)
    assert len(frames) == 0 and not keep.any()
    video = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    video[mask] = 255
    a = analyze(video)
    assert a.shape is None and a.motion is None and a.found_frames == 0


def test_aspect_reads_a_square_box_and_a_stretched_one():
    """Every ideal shape has a square bounding box (aspect 1); the same clip stretched 1.5x
    sideways reads 1.5, and the eval summary counts it beyond a 1.2 tolerance."""
    from sora.eval_suite import proportion_summary

    rows = []
    for shape in ("circle", "square", "triangle"):
        spec = ClipSpec((ObjectSpec(shape, "yellow", "large", "still", 0.5, 0.5, 0.5, 0.5),), "navy", 128, 128, 5, 8)
        frames = render(spec)
        a = analyze(frames)
        assert a.shape == shape and a.aspect == pytest.approx(1.0, abs=0.05), (shape, a.aspect)
        wide = frames[:, :, np.arange(192) * 128 // 192]  # each column 1.5x (nearest)
        b = analyze(wide)
        assert b.aspect == pytest.approx(1.5, abs=0.1), (shape, b.aspect)
        rows += [score(frames, spec.attributes()), score(wide, spec.attributes())]
    assert all("aspect" in r for r in rows)
    summary = proportion_summary(rows)
    assert summary["n"] == 6 and summary["within"] == pytest.approx(0.5)
    assert summary["shape_accuracy_within"] == 1.0
    assert summary["median_abs_log_aspect"] == pytest.approx(np.median([0.0] * 3 + [np.log(1.5)] * 3), abs=0.06)
    assert proportion_summary([{"shape_ok": True}]) is None
