"""Encode stage on real Ray: latents rows rebuild the exact tensors with plain pyarrow; idempotent."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.encode import EncodeConfig, chunk_latent_frames, run_encode
from pipelines.ingest import read_clips, read_quarantine
from pipelines.latents import bytes_to_array, read_latents


def test_encode_writes_exact_latents_and_is_idempotent(shapes_ds, tiny_vae_dir, tmp_path, ray_session):
    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    cfg = EncodeConfig(vae=tiny_vae_dir, batch_size=4, dtype="float32", actors=2)
    first = run_encode(data, cfg)
    clips = read_clips(data)
    assert first["encoded"] == clips.num_rows and first["failed"] == 0
    # the clips went out in batch-sized blocks (not one block that one actor takes whole)
    assert clips.num_rows > 4 and first["batches"] == -(-clips.num_rows // 4)
    assert 1 <= first["actors_used"] <= 2
    table = read_latents(data)
    assert sorted(table["clip_id"].to_pylist()) == sorted(clips["clip_id"].to_pylist())

    # a row read back with plain pyarrow rebuilds exactly what the VAE + patchify produce
    raw = pq.read_table(os.path.join(data, "latents")).to_pylist()
    row = next(r for r in raw if r["clip_id"] == clips["clip_id"][0].as_py())
    tokens = bytes_to_array(row["tokens"], row["tokens_shape"], row["tokens_dtype"])
    from sora.patches import patchify
    from sora.vae import load_vae
    from sora.video_io import read_frames

    c = next(r for r in clips.to_pylist() if r["clip_id"] == row["clip_id"])
    frames = read_frames(c["source"], list(range(c["start_frame"], c["start_frame"] + c["bucket_frames"])),
                         size=(c["bucket_width"], c["bucket_height"]))
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        z = load_vae(tiny_vae_dir).encode_latents(x, chunk_latent_frames=4)[0]
    expected = patchify(z, (1, 2, 2)).numpy()
    assert tokens.shape == expected.shape == (row["grid_t"] * row["grid_h"] * row["grid_w"], expected.shape[1])
    np.testing.assert_allclose(tokens, expected, rtol=0, atol=1e-5)
    assert (row["latent_t"], row["latent_h"], row["latent_w"]) == tuple(z.shape[1:])
    text = bytes_to_array(row["text"], row["text_shape"], row["text_dtype"])
    assert text.shape[1] == 384 and text.shape[0] >= 3 and np.isfinite(text).all()
    assert row["caption"] and row["vae"].startswith("vae@")

    # re-running encodes nothing new and duplicates nothing
    again = run_encode(data, cfg)
    assert again["to_encode"] == 0 and again["already_encoded"] == clips.num_rows
    assert read_latents(data).num_rows == clips.num_rows


def test_encode_failure_is_quarantined_not_fatal(shapes_ds, tiny_vae_dir, tmp_path, ray_session):
    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    victim = read_clips(data)["source"][0].as_py()
    # the source file vanished after ingest: that clip fails, the others encode
    moved = str(tmp_path / "moved.mp4")
    shutil.copy(victim, moved)
    os.remove(victim)
    try:
        result = run_encode(data, EncodeConfig(vae=tiny_vae_dir, batch_size=8))
    finally:
        shutil.copy(moved, victim)
    assert result["failed"] == 1 and result["encoded"] == read_clips(data).num_rows - 1
    q = read_quarantine(data)
    rows = [r for r in q.to_pylist() if r["stage"] == "encode"]
    assert len(rows) == 1 and rows[0]["source"] == victim and rows[0]["reason"]


def test_chunks_are_sized_by_pixels():
    cfg = EncodeConfig(vae="unused")
    assert chunk_latent_frames(cfg, 33, 64, 112, 4) is None  # a shapes-world clip: one pass
    assert chunk_latent_frames(cfg, 129, 1088, 1920, 4) == 2  # 1080p: 2 latent frames (8 frames) a chunk
    assert chunk_latent_frames(cfg, 4001, 720, 1280, 4) == 4  # a long 720p shot
    assert chunk_latent_frames(EncodeConfig(vae="unused", chunk_latent_frames=3), 33, 64, 112, 4) == 3  # forced
    assert chunk_latent_frames(EncodeConfig(vae="unused", chunk_latent_frames=9), 33, 64, 112, 4) is None


def test_table_blocks_spread_a_table_over_batch_sized_blocks():
    import pyarrow as pa

    from pipelines.ray_utils import table_blocks

    t = pa.table({"i": list(range(10))})
    blocks = table_blocks(t, 4)
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    assert pa.concat_tables(blocks)["i"].to_pylist() == list(range(10))  # nothing lost, order kept
    many = table_blocks(pa.table({"i": list(range(1000))}), 1, max_blocks=256)
    assert len(many) <= 256 and sum(b.num_rows for b in many) == 1000
    empty = pa.table({"i": pa.array([], pa.int64())})
    assert [b.num_rows for b in table_blocks(empty, 4)] == [0]


def test_encode_without_captions_names_the_command_to_run_first(shapes_ds, tiny_vae_dir, tmp_path, ray_session,
                                                                capsys):
    """Through the real CLI: nothing can be encoded before `sora caption`, so it says so and fails."""
    from flows.cli import main

    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    shutil.rmtree(os.path.join(data, "captions"))
    with pytest.raises(SystemExit) as e:
        main(["encode", "--data", data, "--vae", tiny_vae_dir])
    message = str(e.value.code)  # a message, so the process exits 1
    n = read_clips(data).num_rows
    assert message == (f"sora encode: {data}: none of its {n} clips has a caption yet; "
                       f"run `sora caption --data {data}` first"), message
    assert not os.path.exists(os.path.join(data, "latents"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"make one with `sora ingest SOURCES --out {empty}`"):
        main(["encode", "--data", str(empty), "--vae", tiny_vae_dir])
    with pytest.raises(SystemExit, match="batch_size must be at least 1"):
        main(["encode", "--data", data, "--vae", tiny_vae_dir, "--batch-size", "0"])


def _clips_with_captions(data: str) -> list[dict]:
    from pipelines.encode import pending_clips

    return pending_clips(data)[0].to_pylist()


def test_prefetching_encode_gives_the_rows_of_the_plain_loop(shapes_ds, tiny_vae_dir, tmp_path, ray_session):
    """The actor pool decodes each next clip while the models work (Stage.load_item ahead of
    process_item): one thread per actor and in the loop, so the rows match bit for bit."""
    from pipelines.encode import EncodeStage
    from threads import torch_threads

    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    clips = _clips_with_captions(data)
    cfg = EncodeConfig(vae=tiny_vae_dir, batch_size=6, dtype="float32", actors=2, torch_threads=1)
    assert cfg.prefetch == 1  # the default: one clip decoded ahead
    with pytest.raises(ValueError, match="prefetch must be 0"):
        EncodeConfig(vae=tiny_vae_dir, prefetch=-1)
    result = run_encode(data, cfg)
    assert result["encoded"] == len(clips) and result["failed"] == 0 and result["actors_used"] == 2
    with torch_threads(1):  # the plain loop: decode, then the models, clip after clip, in this process
        stage = EncodeStage(cfg)
        assert stage.prefetch == 1
        loop = {c["clip_id"]: stage.encode_clip(c, c["caption"]) for c in clips}
        # the same stage's own batch path (prefetching) in this process: the same rows too
        batch = {r["clip_id"]: r for r in stage.process(clips[:5]).rows}
    rows = {r["clip_id"]: r for r in read_latents(data).to_pylist()}
    assert rows.keys() == loop.keys()
    for clip_id, want in loop.items():
        for key in ("tokens", "text", "tokens_shape", "text_shape", "caption", "bucket"):
            assert rows[clip_id][key] == want[key], (clip_id, key)
    assert len(batch) == 5 and all(batch[k]["tokens"] == loop[k]["tokens"] for k in batch)


def test_a_corrupt_clip_among_prefetched_ones_is_quarantined_and_the_others_encode(shapes_ds, tiny_vae_dir,
                                                                                   tmp_path, ray_session):
    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    clips = _clips_with_captions(data)
    # the middle clip of the one batch: its file cut in half after ingest (a truncated upload)
    victim = clips[len(clips) // 2]
    victim_path = str(tmp_path / "cut.mp4")
    with open(victim["source"], "rb") as f:
        head = f.read()
    with open(victim_path, "wb") as f:
        f.write(head[: len(head) // 3])
    # point the clip at the cut file: rewrite the clips table's source of that one clip
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines import storage

    table = read_clips(data)
    source = pc.if_else(pc.equal(table["clip_id"], victim["clip_id"]), pa.scalar(victim_path),
                        table["source"])
    table = table.set_column(table.schema.get_field_index("source"), "source", source)
    shutil.rmtree(os.path.join(data, "clips"))
    storage.write_parquet_atomic(table, storage.join(data, "clips", "all.parquet"))

    result = run_encode(data, EncodeConfig(vae=tiny_vae_dir, batch_size=len(clips), actors=1))
    assert result["batches"] == 1 and result["failed"] == 1 and result["encoded"] == len(clips) - 1
    done = set(read_latents(data)["clip_id"].to_pylist())
    assert done == {c["clip_id"] for c in clips} - {victim["clip_id"]}
    q = [r for r in read_quarantine(data).to_pylist() if r["stage"] == "encode"]
    assert len(q) == 1 and q[0]["clip_id"] == victim["clip_id"] and q[0]["source"] == victim_path
    assert q[0]["reason"].startswith(("not a video", "truncated")), q[0]  # the decoder's words
    # a re-run retries the quarantined clip only (it fails again) and duplicates nothing
    again = run_encode(data, EncodeConfig(vae=tiny_vae_dir, batch_size=len(clips), actors=1))
    assert again["to_encode"] == 1 and again["failed"] == 1 and read_latents(data).num_rows == len(clips) - 1


def test_table_dataset_is_made_on_the_driver_with_batch_sized_blocks(ray_session):
    import pyarrow as pa

    from pipelines.ray_utils import table_dataset

    ds = table_dataset(pa.table({"i": list(range(10))}), 4)
    assert ds.num_blocks() == 3 and sorted(r["i"] for r in ds.take_all()) == list(range(10))
