"""`sora generate`, `sora eval` and `sora generate-bulk` with a diffusers Wan directory and a LoRA
adapter: the same flags as for our model (`--model`, plus `--lora`, `--lora-scale`), the same
video as the library call, and bad input refused by name before any weights load."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from flows.cli import main
from sora.pipeline import SoraPipeline, export_to_video
from sora.video_io import probe, read_frames
from wan_tiny import build_tiny_lora

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def wan(wan_dirs, tmp_path_factory):
    """(the tiny Wan 2.1 T2V-style directory, a LoRA adapter of it), shared for the session."""
    directory = wan_dirs["t2v"]
    return directory, build_tiny_lora(str(tmp_path_factory.mktemp("wan-adapter") / "adapter"), directory)


def test_generate_with_a_wan_dir_and_adapter_equals_the_library_call(wan, media, tmp_path, capsys):
    directory, adapter = wan
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", directory, "--lora", adapter, "--lora-scale", "0.5", "--prompt",
                 "a red circle moves left", "--size", "48x32", "--frames", "9", "--steps", "2", "--seed", "3",
                 "--out", str(out)]) == 0
    info = probe(str(out))
    assert (info.width, info.height, info.num_frames, info.fps) == (48, 32, 9, 16.0)  # Wan 2.1's 16 fps
    assert "generate: step 2/2" in capsys.readouterr().err
    pipe = SoraPipeline.from_pretrained(directory, lora=adapter, lora_scale=0.5)
    direct = pipe("a red circle moves left", width=48, height=32, num_frames=9, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(3)).frames
    export_to_video(direct, str(tmp_path / "direct.mp4"), fps=16)
    assert np.array_equal(read_frames(str(out)), read_frames(str(tmp_path / "direct.mp4")))


@pytest.mark.parametrize("extra,message", [
    (["--image", "{media}/first.png"], "mode 'image-to-video' .*which the Wan model at .* cannot do"),
    (["--video", "{media}/a.mp4", "--mode", "extend-backward"], "mode 'extend-backward'"),
    (["--lora", "{tmp}"], "no pytorch_lora_weights.safetensors"),
    (["--lora-scale", "nan"], "lora_scale must be a finite number"),
])
def test_generate_refuses_what_a_wan_dir_cannot_do(wan, media, tmp_path, extra, message):
    extra = [e.format(media=media, tmp=tmp_path) for e in extra]
    with pytest.raises(SystemExit, match=f"^sora generate: .*{message}"):
        main(["generate", "--model", wan[0], "--prompt", "x", "--size", "32x32", "--frames", "5", "--steps", "1",
              "--out", str(tmp_path / "v.mp4"), *extra])
    assert not os.path.exists(tmp_path / "v.mp4")


def test_eval_runs_on_a_wan_dir_with_its_adapter(wan, tmp_path, capsys):
    directory, adapter = wan
    out = tmp_path / "report.json"
    assert main(["eval", "--model", directory, "--lora", adapter, "--held-out", "2", "--steps", "1",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 2 and report["size_correct"] == 1.0 and report["frames_correct"] == 1.0
    assert report["model"] == directory and report["lora"] == {"path": adapter, "scale": 1.0}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == report["accuracy"]


def test_bulk_generation_with_a_wan_dir_and_adapter(ray_session, wan, media, model_dir, tmp_path):
    from pipelines.generate_bulk import BulkConfig, read_manifest, run_generate_bulk

    directory, adapter = wan
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": "a", "prompt": "a red circle moves left", "seed": 1},
            {"id": "b", "prompt": "a blue square moves up", "seed": 2},
            {"id": "c", "prompt": "a green triangle", "seed": 3, "image": str(media / "first.png")}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = BulkConfig(size="32x32", frames=5, steps=2, batch_size=2, lora=adapter, lora_scale=0.8)
    summary = run_generate_bulk(directory, str(prompts), str(tmp_path / "out"), cfg)
    assert (summary["generated"], summary["errors"]) == (2, 1)
    manifest = {r["id"]: r for r in read_manifest(str(tmp_path / "out")).to_pylist()}
    assert manifest["a"]["status"] == manifest["b"]["status"] == "ok"
    # a T2V model cannot start from an image: that row's error names the mode and the model
    assert manifest["c"]["status"] == "error" and "mode 'image-to-video'" in manifest["c"]["error"]
    assert "the Wan model at" in manifest["c"]["error"]
    pipe = SoraPipeline.from_pretrained(directory, lora=adapter, lora_scale=0.8)
    direct = pipe(["a red circle moves left", "a blue square moves up"], width=32, height=32, num_frames=5,
                  num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).frames
    export_to_video(direct[1], str(tmp_path / "direct.mp4"), fps=16)  # the unit's batch: rows a and b
    assert np.array_equal(read_frames(manifest["b"]["path"]), read_frames(str(tmp_path / "direct.mp4")))

    with pytest.raises(SystemExit, match="sora generate-bulk: .*not a Wan model directory"):
        main(["generate-bulk", "--model", model_dir, "--prompts", str(prompts),
              "--out", str(tmp_path / "out2"), "--lora", adapter])
