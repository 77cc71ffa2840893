"""`sora encode --model WAN_DIR`: latents with the Wan VAE and UMT5 states (Wan's 512-token
tokenizer settings) in the same Parquet contract, recording the model they belong to, plus the
empty prompt's states that training feeds for a dropped caption."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import main
from pipelines.encode import EncodeConfig, EncodeStage, read_null_text, vae_id
from pipelines.ingest import read_clips
from pipelines.latents import read_latents, tensors_from_row
from sora.model_dir import text_encoder_name


@pytest.fixture(scope="module")
def wan_dir(wan_dirs):
    return wan_dirs["t2v"]


def expected_row(wan_dir: str, clip: dict, caption: str) -> tuple[np.ndarray, np.ndarray]:
    """What a clip's row must hold: (tokens (N, 64), text (L, 32)) computed here with the
    directory's own VAE and text encoder."""
    from sora.patches import patchify
    from sora.vae import load_vae
    from sora.video_io import read_frames
    from sora.wan import load_text_encoder

    frames = read_frames(clip["source"], list(range(clip["start_frame"], clip["start_frame"] + clip["bucket_frames"])),
                         size=(clip["bucket_width"], clip["bucket_height"]))
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        z = load_vae(os.path.join(wan_dir, "vae")).encode_latents(x)[0]  # (16, T', h, w)
    states, mask = load_text_encoder(wan_dir).encode([caption])
    return patchify(z, (1, 2, 2)).numpy(), states[0][mask[0]].numpy()


def test_encode_with_a_wan_dir(shapes_ds, wan_dir, tmp_path, ray_session, capsys):
    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    assert main(["encode", "--data", data, "--model", wan_dir, "--dtype", "float32", "--batch-size", "8"]) == 0
    clips = {c["clip_id"]: c for c in read_clips(data).to_pylist()}
    table = read_latents(data)
    assert sorted(table["clip_id"].to_pylist()) == sorted(clips)
    name = text_encoder_name(wan_dir)
    assert name.startswith("wan:text_encoder@") and name.endswith("/512")
    assert set(table["vae"].to_pylist()) == {vae_id(os.path.join(wan_dir, "vae"))}
    assert set(table["text_encoder"].to_pylist()) == {name}

    raw = pq.read_table(os.path.join(data, "latents")).to_pylist()[0]  # plain pyarrow rebuilds it
    row = tensors_from_row(raw)
    tokens, text = expected_row(wan_dir, clips[row["clip_id"]], row["caption"])
    assert row["patch_size"] == (1, 2, 2) and row["latent_shape"][0] == 16
    np.testing.assert_allclose(row["tokens"], tokens, rtol=0, atol=1e-5)
    np.testing.assert_allclose(row["text"], text, rtol=0, atol=1e-5)  # real tokens only; the model pads to 512

    # the empty prompt's states, once per dataset: what the Wan denoiser feeds for an empty text mask
    from sora.wan import load_wan

    null = read_null_text(data, name)
    model = load_wan(wan_dir)
    assert null.shape == (int((model.denoiser.null_text.abs().sum(-1) > 0).sum()), 32)
    np.testing.assert_allclose(null, model.denoiser.null_text[: len(null)].numpy(), rtol=0, atol=1e-6)
    assert os.listdir(os.path.join(data, "null_text")) and len(os.listdir(os.path.join(data, "null_text"))) == 1
    with pytest.raises(FileNotFoundError, match="run `sora encode`"):
        read_null_text(data, "minilm")

    assert main(["encode", "--data", data, "--model", wan_dir]) == 0  # a re-run adds nothing
    assert read_latents(data).num_rows == len(clips)


def test_encode_refuses_a_bad_model_before_ray_starts(wan_dir, tmp_path):
    other = tmp_path / "cog"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    cases = [(["--model", str(other)], "CogVideoXPipeline .another architecture"),
             (["--model", wan_dir, "--text-encoder", "t5"], "text_encoder come from the model directory"),
             (["--model", wan_dir, "--vae", wan_dir + "/vae"], "one of them"),
             ([], "one of them")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=f"^sora encode: .*{message}"):
            main(["encode", "--data", str(tmp_path / "none"), *argv])


def test_an_encode_actor_fetches_a_model_at_a_url(shapes_ds, wan_dir, wan_dirs, tmp_path, monkeypatch, single_thread):
    """The stage in this process (no Ray: a memory:// filesystem is per process), the Wan dir at a
    URL: fetched into the cache once, the same rows as from the local directory."""
    import fsspec

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default cache, ~/.cache/sora-ray/models
    memory = fsspec.filesystem("memory")
    memory.put(wan_dir, "/wan-encode-test/t2v", recursive=True)
    clip = {**read_clips(shapes_ds).to_pylist()[0], "caption": "a red circle moves left"}
    try:
        remote = EncodeStage(EncodeConfig(model="memory://wan-encode-test/t2v", dtype="float32"), str(tmp_path / "a"))
        local = EncodeStage(EncodeConfig(model=wan_dir, dtype="float32"), str(tmp_path / "b"))
    finally:
        memory.rm("/wan-encode-test", recursive=True)
    assert len(os.listdir(tmp_path / "home" / ".cache" / "sora-ray" / "models")) == 1
    a, b = remote.process_item(clip), local.process_item(clip)
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"] and a["vae"] == b["vae"]
    assert a["text_encoder"] == b["text_encoder"] == text_encoder_name(wan_dir)

    ti2v = wan_dirs["ti2v"]  # x16 VAE, 2x2 patches: sides in multiples of 32
    stage = EncodeStage(EncodeConfig(model=ti2v, dtype="float32"), str(tmp_path / "c"))
    odd = {**clip, "bucket_width": 48, "bucket_height": 32}
    with pytest.raises(ValueError, match="bucket 48x32 does not split into this model's patches: .*multiples of 32x32"):
        stage.process_item(odd)
