"""`sora caption` through the real CLI: sidecar captions are written once; with nothing to caption
because an earlier step is missing it names the command to run and fails."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from pipelines.caption import read_captions
from pipelines.ingest import read_clips


def test_sidecar_captions_once_then_nothing_new(shapes_ds, tmp_path, capsys):
    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    shutil.rmtree(os.path.join(data, "captions"))
    n = read_clips(data).num_rows
    assert main(["caption", "--data", data]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (first["captioned"], first["already_captioned"], first["without_sidecar"]) == (n, 0, 0)
    assert main(["caption", "--data", data]) == 0  # a re-run adds no rows
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["captioned"], again["already_captioned"]) == (0, n) and read_captions(data).num_rows == n


def test_caption_without_clips_or_sidecars_names_what_to_run(shapes_ds, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["caption", "--data", str(tmp_path / "nothing")])
    assert str(e.value.code) == (f"sora caption: {tmp_path / 'nothing'}: no such dataset; "
                                 f"make one with `sora ingest SOURCES --out {tmp_path / 'nothing'}`")
    # clips whose sources have no captions.jsonl: sidecar captioning can do nothing for them
    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    shutil.rmtree(os.path.join(data, "captions"))
    clips = read_clips(data)
    raw = tmp_path / "raw"  # the same videos, without their sidecar
    raw.mkdir()
    for s in set(clips["source"].to_pylist()):
        shutil.copy(s, raw / os.path.basename(s))
    moved = pa.array([str(raw / os.path.basename(s)) for s in clips["source"].to_pylist()])
    shutil.rmtree(os.path.join(data, "clips"))
    os.makedirs(os.path.join(data, "clips"))
    pq.write_table(clips.set_column(clips.schema.get_field_index("source"), "source", moved),
                   os.path.join(data, "clips", "clips.parquet"))
    with pytest.raises(SystemExit) as e:
        main(["caption", "--data", data])
    message = str(e.value.code)
    assert message.startswith(f"sora caption: {data}: none of its") and "has a sidecar caption" in message
    assert f"`sora caption --data {data} --model CAPTIONER_DIR`" in message
    assert read_captions(data).num_rows == 0
    with pytest.raises(SystemExit, match="num_frames must be at least 1"):
        main(["caption", "--data", data, "--frames", "0"])


def test_a_clip_model_scores_each_caption_against_its_frames(shapes_ds, tmp_path, ray_session, capsys):
    """With --clip-model every new caption (here the sidecars) gets an alignment: CLIP's text-image
    cosine, the same as ClipScorer's on the frames the stage samples; without one it is null."""
    from footage import tiny_clip_dir

    from pipelines.caption import CaptionConfig, CaptionStage
    from sora.curation.clip_scores import ClipScorer

    assert set(read_captions(shapes_ds)["alignment"].to_pylist()) == {None}  # no CLIP model: null
    clip = tiny_clip_dir(str(tmp_path / "clip"))
    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    shutil.rmtree(os.path.join(data, "captions"))
    n = read_clips(data).num_rows
    assert main(["caption", "--data", data, "--clip-model", clip, "--actors", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["captioned"], out["failed"]) == (n, 0)
    caps = read_captions(data)
    assert caps.num_rows == n and all(who.startswith("sidecar:") for who in caps["captioner"].to_pylist())
    scores = dict(zip(caps["clip_id"].to_pylist(), caps["alignment"].to_pylist()))
    texts = dict(zip(caps["clip_id"].to_pylist(), caps["caption"].to_pylist()))
    assert all(s is not None and -1.0 <= s <= 1.0 for s in scores.values())
    # the same figure as the scorer's own call on the frames the stage samples
    scorer, stage = ClipScorer(clip), CaptionStage.__new__(CaptionStage)
    stage.cfg = CaptionConfig(clip_model=clip)
    for c in read_clips(data).to_pylist()[:3]:
        frames = stage.frames(c)
        assert abs(scorer.alignment(frames, texts[c["clip_id"]]) - scores[c["clip_id"]]) < 1e-5
    assert main(["caption", "--data", data, "--clip-model", clip]) == 0  # a re-run adds no rows
    assert read_captions(data).num_rows == n
    with pytest.raises(SystemExit, match="clip_model .* is not a directory"):
        main(["caption", "--data", data, "--clip-model", str(tmp_path / "missing")])


def test_a_model_captions_on_a_pool_sized_from_the_cluster_as_one_process_would(shapes_ds, tmp_path, ray_session):
    """With a model and the default pool, `run_caption` starts one actor per CPU of the cluster
    (each loads the captioner once) and writes every clip's caption once: the same text as the
    captioner gives in this process for the same frames, both sides at one torch thread."""
    import ray
    import torch
    from threads import torch_threads

    from pipelines.caption import CaptionConfig, clip_frames, run_caption
    from sora.captioner import Captioner, CaptionerConfig, build_captioner, save_captioner

    data = str(tmp_path / "ds")
    shutil.copytree(shapes_ds, data)
    shutil.rmtree(os.path.join(data, "captions"))
    clips = sorted(read_clips(data).to_pylist(), key=lambda c: c["clip_id"])
    torch.manual_seed(0)
    cap_cfg = CaptionerConfig.preset("debug")
    model, processor = build_captioner(cap_cfg, ["A red circle moves up.", "A blue square moves left."])
    save_captioner(model, processor, str(tmp_path / "cap"), cap_cfg, {"note": "untrained"})
    cfg = CaptionConfig(model=str(tmp_path / "cap"), batch_size=4, torch_threads=1)
    assert cfg.actors is None  # the default: sized from the cluster

    result = run_caption(data, cfg)
    assert (result["captioned"], result["failed"]) == (len(clips), 0)
    assert len(result["actors"]) == int(ray.cluster_resources()["CPU"]) == 2
    assert set(result["model_loads_per_actor"].values()) == {1}
    caps = read_captions(data)
    assert sorted(caps["clip_id"].to_pylist()) == [c["clip_id"] for c in clips]  # each clip once
    got = dict(zip(caps["clip_id"].to_pylist(), caps["caption"].to_pylist()))
    with torch_threads(1):
        captioner = Captioner.from_pretrained(str(tmp_path / "cap"))
        want = {}
        for i in range(0, len(clips), cfg.batch_size):
            batch = clips[i: i + cfg.batch_size]
            want.update(zip([c["clip_id"] for c in batch], captioner.caption([clip_frames(c, cfg) for c in batch])))
    assert got == want


def test_an_actors_next_batch_decodes_while_this_one_is_in_the_captioner(shapes_ds, tmp_path):
    """An actor holds two batches (`calls_per_actor`): the second one's clips decode while the
    first one is in the captioner, the captioner takes one batch at a time, the older first, and
    each batch gets the captions it gets alone."""
    import threading
    import time

    import torch

    from pipelines.caption import CaptionConfig, CaptionStage
    from sora.captioner import CaptionerConfig, build_captioner, save_captioner

    torch.manual_seed(0)
    cap_cfg = CaptionerConfig.preset("debug")
    model, processor = build_captioner(cap_cfg, ["A red circle moves up.", "A blue square moves left."])
    save_captioner(model, processor, str(tmp_path / "cap"), cap_cfg, {"note": "untrained"})
    cfg = CaptionConfig(model=str(tmp_path / "cap"), batch_size=3, torch_threads=1)
    assert CaptionStage.calls_per_actor(cfg) == 2
    clips = sorted(read_clips(shapes_ds).to_pylist(), key=lambda c: c["clip_id"])[:6]
    first, second = clips[:3], clips[3:]
    stage = CaptionStage(cfg)
    alone = {tuple(c["clip_id"] for c in b): stage.process(b).rows for b in (first, second)}

    spans: dict[str, list[tuple[float, float]]] = {"decode": [], "caption": []}
    captioning = threading.Event()
    frames, caption = stage.frames, stage.captioner.caption

    def timed(kind, fn, hold=0.0):
        def run(*args):
            t0 = time.perf_counter()
            if kind == "caption":
                captioning.set()
            out = fn(*args)
            time.sleep(hold)  # the captioner's call held open: a window the other batch's decodes fall in
            spans[kind].append((t0, time.perf_counter()))
            return out
        return run

    stage.frames, stage.captioner.caption = timed("decode", frames), timed("caption", caption, hold=1.0)
    out = {}
    a = threading.Thread(target=lambda: out.update(first=stage.process(first)))
    a.start()
    assert captioning.wait(60)  # the first batch (the older ticket) is in the captioner
    b = threading.Thread(target=lambda: out.update(second=stage.process(second)))
    b.start()
    a.join(60), b.join(60)
    (c1, c2) = sorted(spans["caption"])
    assert c1[1] <= c2[0]  # one batch in the captioner at a time
    later = sorted(spans["decode"])[3:]  # the second batch's decodes
    assert any(c1[0] < s and e < c1[1] for s, e in later), (spans, c1)  # ... while the first one captioned
    assert out["first"].rows == alone[tuple(c["clip_id"] for c in first)]
    assert out["second"].rows == alone[tuple(c["clip_id"] for c in second)]
