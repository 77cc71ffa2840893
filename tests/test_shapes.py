"""The shapes world: deterministic synth, aspect coverage, geometry, captions <-> parser."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os

import numpy as np
import pytest

from sora.shapes import (
    AREA_FACTOR, ASPECT_RATIOS, BACKGROUNDS, COLORS, DEFAULT_RANGES, MOTIONS, NUM_TEMPLATES,
    SHAPES, SIZE_FRACTION, SIZES, TINY, ClipSpec, ObjectSpec, _apart, _extents,
    all_combinations, held_out_combinations, make_eval_prompts, parse_prompt, render,
    sample_clip, synth_dataset, train_combinations,
)

PARSED = ("color", "shape", "size", "motion", "background", "color2", "shape2", "size2", "motion2")


def _digests(root: str) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(root))}


# --------------------------------------------------------------------------------------------
# synth: determinism, records, real files
# --------------------------------------------------------------------------------------------


def test_synth_is_byte_identical_per_seed_and_independent_of_n(tmp_path):
    a, b, c, d = (str(tmp_path / k) for k in "abcd")
    calls = []
    recs = synth_dataset(a, 6, seed=3, progress=lambda done, n: calls.append((done, n)))
    synth_dataset(b, 6, seed=3)
    synth_dataset(c, 3, seed=3)
    synth_dataset(d, 6, seed=4)
    da, db, dc, dd = _digests(a), _digests(b), _digests(c), _digests(d)
    assert len(da) == 7 and da == db, "same seed must give the same bytes"
    for name, digest in dc.items():  # clip i does not depend on n
        if name != "captions.jsonl":
            assert da[name] == digest, name
    lines_a = open(os.path.join(a, "captions.jsonl")).read().splitlines()
    lines_c = open(os.path.join(c, "captions.jsonl")).read().splitlines()
    assert lines_c == lines_a[:3]
    assert not set(da.values()) & set(dd.values()), "another seed gives other clips"
    assert calls == [(i, 6) for i in range(1, 7)]
    assert [json.loads(line) for line in lines_a] == recs


def test_captions_jsonl_describes_the_real_files(tmp_path):
    from sora.video_io import probe

    recs = synth_dataset(str(tmp_path), 6, seed=1)
    for rec in recs:
        info = probe(str(tmp_path / rec["file"]))
        assert (info.width, info.height, info.num_frames) == (rec["width"], rec["height"], rec["num_frames"])
        assert info.codec == "h264" and info.fps == pytest.approx(rec["fps"])
        parsed = parse_prompt(rec["caption"])
        assert {k: parsed[k] for k in PARSED} == {k: rec[k] for k in PARSED}, rec["caption"]
        assert rec["short_caption"].startswith(f"{rec['color']} {rec['shape']}")
        assert rec["num_objects"] == len(rec["objects"])
    assert {r["aspect_ratio"] for r in recs} == set(ASPECT_RATIOS)


def test_synth_writes_to_fsspec_urls():
    import fsspec

    fs = fsspec.filesystem("memory")
    synth_dataset("memory://shapes-test", 2, seed=0, ranges=TINY)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/shapes-test", detail=False))
    assert names == ["captions.jsonl", "clip_000000.mp4", "clip_000001.mp4"]
    fs.rm("/shapes-test", recursive=True)


# --------------------------------------------------------------------------------------------
# specs: sizes, aspect ratios, geometry, the main-object rule
# --------------------------------------------------------------------------------------------


def test_aspect_ratios_sizes_lengths_cover_the_ranges():
    specs = [sample_clip(7, i) for i in range(200)]
    aspects = {s.aspect_ratio for s in specs}
    assert len(aspects) >= 5 and {"9:16", "2.39:1"} <= aspects, aspects
    for s in specs:
        assert s.width % 2 == 0 and s.height % 2 == 0, (s.width, s.height)
        assert min(s.width, s.height) in DEFAULT_RANGES.short_sides
        assert s.width / s.height == pytest.approx(ASPECT_RATIOS[s.aspect_ratio], rel=0.03)
        assert 9 <= s.num_frames <= 41 and s.fps in (8, 12, 16, 24)
    assert len({(s.width, s.height) for s in specs}) > 30
    assert len({s.num_frames for s in specs}) >= 5 and len({s.fps for s in specs}) == 4
    assert {len(s.objects) for s in specs} == {1, 2}
    assert {s.background for s in specs} == set(BACKGROUNDS)


def test_objects_stay_inside_move_visibly_and_obey_the_main_object_rule():
    for i in range(2000):
        s = sample_clip(11, i)
        short = min(s.width, s.height)
        for o in s.objects:
            side = SIZE_FRACTION[o.size] * short
            left, right, up, down = _extents(o.shape, side)
            for x, y in ((o.x0 * s.width, o.y0 * s.height), (o.x1 * s.width, o.y1 * s.height)):
                assert left <= x <= s.width - right and up <= y <= s.height - down, (i, o)
            dx, dy = (o.x1 - o.x0) * s.width / short, (o.y1 - o.y0) * s.height / short
            expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
            sx, sy = expected[o.motion]
            assert np.sign(round(dx, 6)) == sx and np.sign(round(dy, 6)) == sy, (i, o)
            if o.motion != "still":  # at least ~0.3 of the short side at every aspect ratio
                assert max(abs(dx), abs(dy)) >= 0.29, (i, o, dx, dy)
        if len(s.objects) == 2:
            main, second = s.objects
            assert main.size == "large" and second.size == "small" and main.color != second.color
            assert _apart(main, second, s.width, s.height, s.num_frames)


def test_render_draws_exact_areas_pure_colours_and_the_spec_positions():
    for shape in SHAPES:
        obj = ObjectSpec(shape, "yellow", "large", "right", 0.3, 0.5, 0.7, 0.5)
        spec = ClipSpec((obj,), "navy", 200, 120, 5, 8)
        frames = render(spec)
        assert frames.shape == (5, 120, 200, 3) and frames.dtype == np.uint8
        side = 0.36 * 120
        bg, fg = np.array(BACKGROUNDS["navy"]), np.array(COLORS["yellow"])
        # coverage of each pixel, from its colour; its sum is the drawn area
        cover = (frames[..., 0].astype(float) - bg[0]) / (fg[0] - bg[0])
        for t in range(5):
            assert cover[t].sum() == pytest.approx(AREA_FACTOR[shape] * side * side, rel=0.01)
            ys, xs = np.mgrid[0:120, 0:200] + 0.5  # area centroid = the spec's centre
            cx = (cover[t] * xs).sum() / cover[t].sum()
            cy = (cover[t] * ys).sum() / cover[t].sum()
            assert cx == pytest.approx(200 * (0.3 + 0.1 * t), abs=0.05)
            assert cy == pytest.approx(60, abs=0.05)
        # every pixel is a blend of exactly the two colours (pure colours, 1 px antialiasing)
        blend = bg + cover[..., None] * (fg - bg)
        assert np.abs(frames - blend).max() <= 1.0
        assert (cover > 0.999).sum() > 0.8 * (cover > 0.001).sum()


def test_render_of_chosen_frames_equals_those_frames_of_the_full_clip():
    for i in range(6):
        spec = sample_clip(3, i)
        picked = [0, spec.num_frames // 2, spec.num_frames - 1, 1]
        assert np.array_equal(render(spec, frames=picked), render(spec)[picked])
    with pytest.raises(AssertionError, match="frames must index"):
        render(spec, frames=[spec.num_frames])


def test_spec_survives_a_json_round_trip_and_renders_the_same():
    for i in range(12):
        spec = sample_clip(5, i)
        back = ClipSpec.from_attributes(json.loads(json.dumps(spec.attributes())))
        assert back == spec
        assert np.array_equal(render(back), render(spec))


# --------------------------------------------------------------------------------------------
# captions and the parser
# --------------------------------------------------------------------------------------------


def test_every_caption_template_parses_back_to_the_attributes():
    n_two = 0
    for i in range(2000):
        spec = sample_clip(21, i)
        attrs = spec.attributes()
        truth = {k: attrs[k] for k in PARSED}
        # the caption the clip has, plus every template and phrasing for the first 200 specs
        templates = range(NUM_TEMPLATES) if i < 200 else (spec.template,)
        for k in templates:
            caption = dataclasses.replace(spec, template=k).caption()
            assert parse_prompt(caption) == truth, caption
            assert all(attrs[a] in caption for a in ("color", "shape", "size", "background"))
        short = parse_prompt(spec.short_caption())
        assert short == {**{k: None for k in PARSED}, "color": attrs["color"], "shape": attrs["shape"],
                         "color2": attrs["color2"], "shape2": attrs["shape2"]}, spec.short_caption()
        n_two += len(spec.objects) == 2
    assert n_two > 400, "two-object captions must be well represented"


def test_descriptive_caption_matches_the_design_example():
    obj = ObjectSpec("circle", "red", "large", "right", 0.2, 0.5, 0.8, 0.5)
    spec = ClipSpec((obj,), "black", 128, 72, 9, 8, "16:9", template=0)
    assert spec.caption() == "A large red circle moves from left to right across a black background."
    assert spec.short_caption() == "red circle"


@pytest.mark.parametrize("text, expected", [
    ("a blue square moving up on gray", dict(color="blue", shape="square", motion="up", background="gray")),
    ("Big yellow triangle falling, navy background", dict(color="yellow", shape="triangle", size="large", motion="down", background="navy")),
    ("a small cyan circle that stays still on black", dict(color="cyan", shape="circle", size="small", motion="still", background="black")),
    ("magenta box drifting from the left to the right", dict(color="magenta", shape="square", motion="right")),
    ("a white ball moves from the top of the frame", dict(color="white", shape="circle", motion="down")),
    ("tiny green triangle doesn't move, grey backdrop", dict(color="green", shape="triangle", size="small", motion="still", background="gray")),
    ("A huge red disc heads towards the left while a little blue square climbs",
     dict(color="red", shape="circle", size="large", motion="left", color2="blue", shape2="square", size2="small", motion2="up")),
    ("red circle", dict(color="red", shape="circle")),
    ("purple unicorn dancing", dict(color="magenta")),
    ("", {}),
])
def test_parse_prompt_free_phrasings(text, expected):
    assert parse_prompt(text) == {**{k: None for k in PARSED}, **expected}


# --------------------------------------------------------------------------------------------
# held-out combinations and evaluation prompts
# --------------------------------------------------------------------------------------------


def test_held_out_split_keeps_every_part_of_a_held_out_combo_in_training():
    held, train = held_out_combinations(), train_combinations()
    assert len(held) == 21 and len(held) + len(train) == len(all_combinations()) == 210
    for values, axis in zip((COLORS, SHAPES, SIZES, MOTIONS), range(4)):
        assert {k[axis] for k in held} == set(values), "every value is tested"
    for r in (2, 3):  # every pair and triple of a held-out combo was seen in training
        for idx in itertools.combinations(range(4), r):
            seen = {tuple(k[i] for i in idx) for k in train}
            assert all(tuple(k[i] for i in idx) in seen for k in held), idx


def test_training_clips_never_show_held_out_combos_and_allowed_restricts():
    held = held_out_combinations()
    for i in range(2000):
        spec = sample_clip(2, i, exclude=held)
        assert not {o.combo for o in spec.objects} & held, (i, spec)
    only = [sample_clip(2, i, allowed=sorted(held)) for i in range(300)]
    assert all(s.objects[0].combo in held for s in only)
    assert len({s.objects[0].combo for s in only}) == len(held)


def test_eval_prompts_cover_held_out_combos_at_every_aspect_ratio():
    from sora.evaluator import score

    prompts = make_eval_prompts(42, seed=0)
    assert make_eval_prompts(42, seed=0) == prompts, "deterministic"
    held = held_out_combinations()
    assert {(p["color"], p["shape"], p["size"], p["motion"]) for p in prompts} == held
    assert {p["aspect_ratio"] for p in prompts} == set(ASPECT_RATIOS)
    for p in prompts:
        assert p["width"] % 16 == 0 and p["height"] % 16 == 0 and p["width"] * p["height"] <= 114 * 64 * 1.02
        ratio = p["width"] / p["height"]
        assert abs(math.log(ratio / ASPECT_RATIOS[p["aspect_ratio"]])) < 0.2, p
        parsed = parse_prompt(p["prompt"])
        assert all(parsed[k] == p[k] for k in ("color", "shape", "size", "motion", "background")), p["prompt"]
        # the reference clip satisfies its prompt (an upper bound for generated video)
        ref = ClipSpec.from_attributes(p["reference"])
        assert (ref.width, ref.height, ref.num_frames) == (p["width"], p["height"], p["num_frames"])
        assert score(render(ref), p)["all_ok"], p["prompt"]


def test_synth_cli_flags_come_from_clip_ranges(tmp_path):
    """`sora synth` takes ClipRanges' fields as flags; a bad value is one clear error."""
    import subprocess
    import sys

    from sora.video_io import probe

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "raw")
    cmd = [sys.executable, "-m", "flows.cli", "synth", "--out", out, "--n", "3", "--seed", "2",
           "--short-sides", "64", "--frame-counts", "9", "--fps", "12", "--aspects", "1:1"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for rec in map(json.loads, open(os.path.join(out, "captions.jsonl"))):
        info = probe(os.path.join(out, rec["file"]))
        assert (info.width, info.height, info.num_frames, info.fps) == (64, 64, 9, 12)
    expected = synth_dataset(str(tmp_path / "api"), 3, seed=2, ranges=dataclasses.replace(
        DEFAULT_RANGES, short_sides=(64,), frame_counts=(9,), fps=(12,), aspects=("1:1",)))
    assert _digests(out) == _digests(str(tmp_path / "api")) and len(expected) == 3
    bad = subprocess.run(cmd[:-2] + ["--aspects", "5:1"], cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "sora synth: aspects must be among" in bad.stderr
