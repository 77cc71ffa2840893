"""`sora generate` and `sora eval` end to end: playable files of exactly the requested size and
length in every mode, progress per step, clear errors for bad input, an eval report."""

from __future__ import annotations

import json

import pytest
import torch

from flows.cli import main
from sora.video_io import probe


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def generate(model_dir, out, *extra) -> dict:
    assert main(["generate", "--model", model_dir, "--prompt", "a red circle moves right", "--seed", "1",
                 "--out", str(out), *extra]) == 0
    return probe(str(out))


def test_generate_writes_exactly_the_requested_video(model_dir, tmp_path, capsys):
    info = generate(model_dir, tmp_path / "v.mp4", "--size", "100x178", "--frames", "10", "--steps", "3")
    assert (info.width, info.height, info.num_frames, info.fps) == (100, 178, 10, 8.0)
    cap = capsys.readouterr()
    assert "generate: step 3/3" in cap.err  # progress per step
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["frames"] == 10 and summary["generated_size"] == [96, 176]
    info = generate(model_dir, tmp_path / "s.mp4", "--size", "64x36", "--seconds", "1.5", "--fps", "6", "--sampler", "heun")
    assert (info.width, info.height, info.num_frames, info.fps) == (64, 36, 9, 6.0)


def test_generate_every_input_mode(model_dir, media, tmp_path, capsys):
    cases = {
        "image": ["--image", str(media / "first.png")],
        "extend-forward": ["--video", str(media / "a.mp4"), "--mode", "extend-forward"],
        "extend-backward": ["--video", str(media / "a.mp4"), "--mode", "extend-backward"],
        "edit": ["--video", str(media / "a.mp4"), "--mode", "edit", "--strength", "0.4"],
        "loop": ["--video", str(media / "a.mp4"), "--mode", "loop"],
        "join": ["--join", str(media / "a.mp4"), str(media / "b.mp4")],
        "draft": ["--draft", "--strength", "0.5"],
    }
    for name, extra in cases.items():
        info = generate(model_dir, tmp_path / f"{name}.mp4", "--size", "90x160", "--frames", "14", *extra)
        assert (info.width, info.height, info.num_frames) == (90, 160, 14), name
    assert "refine: step" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--size", "wide"], "--size"),
    (["--size", "101x100"], "even width and height"),
    (["--frames", "0"], "--frames must be at least 1"),
    (["--image", "missing.png"], "no such file"),
    (["--video", "missing.mp4"], "no such file"),
    (["--mode", "edit"], "needs --video"),
    (["--strength", "2"], "--strength"),
    (["--out-ext"], "unknown extension"),
])
def test_generate_rejects_bad_input_with_a_clear_message(model_dir, tmp_path, argv, message):
    out = str(tmp_path / ("v.xyz" if argv == ["--out-ext"] else "v.mp4"))
    argv = [] if argv == ["--out-ext"] else argv
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", model_dir, "--prompt", "x", "--out", out, *argv])
    assert message in str(e.value)


def test_generate_rejects_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="not a model directory"):
        main(["generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "v.mp4")])


def test_eval_reports_accuracy_and_exact_sizes(model_dir, tmp_path, capsys):
    rows = [{"prompt": "A large red circle moves from left to right across a black background.", "color": "red",
             "shape": "circle", "size": "large", "motion": "right", "background": "black", "width": 48,
             "height": 32, "num_frames": 9},
            {"prompt": "a small blue square moving up", "width": 48, "height": 32, "num_frames": 9},
            {"prompt": "a green triangle", "width": 40, "height": 30, "num_frames": 6}]
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "report.json"
    assert main(["eval", "--model", model_dir, "--prompts", str(prompts), "--out", str(out), "--steps", "2"]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 3 and report["size_correct"] == 1.0 and report["frames_correct"] == 1.0
    assert set(report["accuracy"]) >= {"color", "shape", "size", "motion", "all"}
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    # attributes come from the row, else from the prompt text
    assert report["rows"][1]["want"]["shape"] == "square" and report["rows"][1]["want"]["motion"] == "up"
    assert report["rows"][0]["want"]["background"] == "black"
    assert all("aspect" in r for r in report["rows"])  # the proportion diagnostic, NaN without an object
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["accuracy"] == report["accuracy"]


def test_eval_held_out_prompts_are_never_training_combinations():
    from flows.cli import build_parser
    from flows.commands.eval import load_prompts
    from sora.shapes import held_out_combinations

    args = build_parser().parse_args(["eval", "--model", "m", "--held-out", "12", "--out", "r.json"])
    rows = load_prompts(args)
    assert len(rows) == 12
    held = held_out_combinations()
    assert all((r["color"], r["shape"], r["size"], r["motion"]) in held for r in rows)
    assert len({(r["width"], r["height"]) for r in rows}) == 6  # every aspect ratio


def test_eval_from_reference_is_an_sdedit_of_each_prompts_reference_clip(model_dir, tmp_path):
    from sora.eval_suite import _reference, evaluate
    from sora.evaluator import score
    from sora.pipeline import SoraPipeline
    from sora.shapes import make_eval_prompts

    out = tmp_path / "ref.json"
    assert main(["eval", "--model", model_dir, "--held-out", "2", "--from-reference", "0.5", "--steps", "2",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 2 and report["settings"]["from_reference"] == 0.5
    assert report["size_correct"] == 1.0 and report["frames_correct"] == 1.0
    # the same rows through the API equal a direct edit of the reference with the row's seed
    pipe = SoraPipeline.from_pretrained(model_dir)
    prompts = make_eval_prompts(2, 0)
    rows = evaluate(pipe, prompts, num_inference_steps=2, seed=5, from_reference=0.5)["rows"]
    p = prompts[1]
    frames = pipe.edit(p["prompt"], _reference(p), strength=0.5, width=p["width"], height=p["height"],
                       num_frames=p["num_frames"], fps=p["fps"], num_inference_steps=2,
                       generator=torch.Generator().manual_seed(5 + 1)).frames
    direct = score(frames, rows[1]["want"])
    assert [rows[1][k] for k in ("color", "shape", "side", "rgb")] == [direct[k] for k in ("color", "shape", "side", "rgb")]
    # what it needs, said clearly
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "a red circle", "width": 48, "height": 32, "num_frames": 9}))
    with pytest.raises(SystemExit, match="needs a 'reference' in every row"):
        main(["eval", "--model", model_dir, "--prompts", str(plain), "--from-reference", "0.5", "--out", str(out)])
    with pytest.raises(SystemExit, match="pick one"):
        main(["eval", "--model", model_dir, "--held-out", "1", "--from-reference", "0.5", "--draft", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"strength in \(0, 1\]"):
        main(["eval", "--model", model_dir, "--held-out", "1", "--from-reference", "1.5", "--out", str(out)])
