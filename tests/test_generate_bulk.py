"""Bulk generation on Ray Data: 1,000 prompts with malformed rows, a run cut short and resumed,
one manifest row per input row, per-request failures isolated, JSONL/CSV/Parquet inputs."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.generate_bulk import BulkConfig, BulkRequest, GenerateStage, plan, read_manifest, run_generate_bulk

N = 1000
BAD = {  # row -> (what is wrong with it, the line written)
    7: ("not JSON", "{not json"),
    8: ("not an object", "[1, 2]"),
    13: ("empty prompt", {"prompt": "  ", "id": "p13"}),
    21: ("bad size", {"prompt": "x", "size": "abc", "id": "p21"}),
    22: ("odd size", {"prompt": "x", "size": "33x32", "id": "p22"}),
    23: ("negative frames", {"prompt": "x", "frames": -3, "id": "p23"}),
    24: ("seed not a number", {"prompt": "x", "seed": "abc", "id": "p24"}),
    25: ("frames and seconds", {"prompt": "x", "frames": 5, "seconds": 1, "id": "p25"}),
    26: ("duplicate id", {"prompt": "x", "id": "p1"}),
    33: ("missing image", {"prompt": "x", "image": "/no/such/image.png", "id": "p33"}),
}


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def write_prompts(path: str, image: str) -> dict[int, str]:
    """N rows: every 10th row has no id (ids then come from row + prompt), every 97th an image
    (image-to-video), BAD rows as listed. Returns {row: id} of the good rows that set one."""
    lines, ids = [], {}
    for i in range(N):
        if i in BAD:
            line = BAD[i][1]
            lines.append(line if isinstance(line, str) else json.dumps(line))
            continue
        rec = {"prompt": f"a {['red', 'green', 'blue'][i % 3]} circle moves left, take {i}", "seed": i}
        if i % 10 != 0:
            rec["id"] = ids[i] = f"p{i}"
        if i % 97 == 5:
            rec["image"] = image
        if i % 50 == 3:
            rec["size"] = "48x32"  # another shape: a separate batch
        lines.append(json.dumps(rec))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return ids


def test_a_thousand_prompts_killed_and_resumed(ray_session, model_dir, tmp_path):
    from PIL import Image

    from sora.video_io import probe

    image = str(tmp_path / "first.png")
    Image.fromarray(np.full((32, 32, 3), (255, 0, 0), np.uint8)).save(image)
    prompts, out = str(tmp_path / "prompts.jsonl"), str(tmp_path / "out")
    write_prompts(prompts, image)
    cfg = BulkConfig(size="32x32", frames=5, steps=2, batch_size=64)

    # a run that stopped after the first 300 rows (what a kill leaves: finished units only)
    first = run_generate_bulk(model_dir, prompts, out, BulkConfig(**{**cfg.__dict__, "limit": 300}))
    assert first["manifest_rows"] == 300 and first["model_loads_per_actor"] and max(first["model_loads_per_actor"].values()) == 1
    assert len(first["actors"]) == int(ray_session.cluster_resources()["CPU"])  # the default pool: one per CPU
    done_before = {r["id"]: r for r in read_manifest(out).to_pylist()}
    mtimes = {i: os.stat(r["path"]).st_mtime_ns for i, r in done_before.items() if r["status"] == "ok"}

    # the re-run over the whole file, through file:// URLs, skips every id already recorded
    second = run_generate_bulk(model_dir, "file://" + prompts, "file://" + out, cfg)
    assert second["already_done"] == 300 and second["to_generate"] + second["invalid_new"] == N - 300
    for i, t in mtimes.items():
        assert os.stat(done_before[i]["path"]).st_mtime_ns == t, f"{i} was generated again"

    manifest = read_manifest(out).to_pylist()
    assert sorted(r["row"] for r in manifest) == list(range(N))  # every row accounted for, once
    assert len({r["id"] for r in manifest}) == N
    by_row = {r["row"]: r for r in manifest}
    for row, (why, _) in BAD.items():
        assert by_row[row]["status"] == "error" and by_row[row]["error"], (row, why)
    assert "duplicate id" in by_row[26]["error"] and by_row[26]["id"] == "p1@row26"
    assert "image" in by_row[33]["error"]
    ok = [r for r in manifest if r["status"] == "ok"]
    assert len(ok) == N - len(BAD)
    assert all(r["seconds"] > 0 and json.loads(r["parameters"])["seed"] == r["seed"] for r in ok)
    assert by_row[10]["id"].startswith("000010-")  # no id given: row number + prompt hash
    for row in (0, 5, 53, 999):  # plain, image-to-video, 48x32, last
        info = probe(by_row[row]["path"])
        want = (48, 32) if row % 50 == 3 else (32, 32)
        assert (info.width, info.height, info.num_frames) == (*want, 5), row

    third = run_generate_bulk(model_dir, prompts, out, cfg)  # nothing left to do
    assert third["to_generate"] == 0 and third["invalid_new"] == 0 and third["manifest_rows"] == N
    # --retry-errors re-queues exactly the error rows (the bad ones are re-validated)
    todo, invalid, _ = plan(prompts, out, BulkConfig(**{**cfg.__dict__, "retry_errors": True}))
    assert [r.id for r in todo] == ["p33"] and sorted(r["row"] for r in invalid) == sorted(set(BAD) - {33})


def test_one_failing_request_does_not_fail_its_batch(model_dir, tmp_path):
    """A batch that raises is retried request by request: only the culprit becomes an error."""
    stage = GenerateStage(model_dir, str(tmp_path / "out"), BulkConfig(size="32x32", frames=5, steps=1).__dict__)
    real = stage.pipe.__class__.generate

    def flaky(pipe, requests, **kw):
        if any("poison" in r.prompt for r in requests):
            raise RuntimeError("poisoned prompt")
        return real(pipe, requests, **kw)

    stage.pipe.__class__ = type("Flaky", (stage.pipe.__class__,), {"generate": flaky})
    reqs = [BulkRequest(id=f"r{i}", row=i, prompt="poison" if i == 1 else f"ok {i}", seed=i, width=32, height=32,
                    num_frames=5, steps=1) for i in range(3)]
    rows = {r["id"]: r for r in stage.run_unit(reqs, "u")}
    assert [rows[f"r{i}"]["status"] for i in range(3)] == ["ok", "error", "ok"]
    assert "poisoned prompt" in rows["r1"]["error"] and os.path.isfile(rows["r0"]["path"])


def test_a_units_videos_are_written_while_the_next_unit_generates(model_dir, tmp_path):
    """An actor holds two units (`calls_per_actor`): the second one generates while the first
    one's videos are written, one unit in the models at a time, the older first; each unit's
    rows and videos are what it makes alone; a video that cannot be written fails its own
    request only, without generating again."""
    import threading
    import time

    cfg = BulkConfig(size="32x32", frames=5, steps=1)
    assert GenerateStage.calls_per_actor(cfg) == 2
    reqs = [BulkRequest(id=f"r{i}", row=i, prompt=f"a red circle, take {i}", seed=i, width=32, height=32,
                        num_frames=5, steps=1) for i in range(4)]
    alone = GenerateStage(model_dir, str(tmp_path / "alone"), cfg.__dict__)
    want = {r["id"]: r for u in (reqs[:2], reqs[2:]) for r in alone.run_unit(u, "u")}

    stage = GenerateStage(model_dir, str(tmp_path / "out"), cfg.__dict__)
    spans: dict[str, list] = {"generate": [], "write": []}
    writing = threading.Event()
    real_generate, real_write = stage.pipe.__class__.generate, stage._write

    def generate(pipe, requests, **kw):
        t0 = time.perf_counter()
        out = real_generate(pipe, requests, **kw)
        spans["generate"].append((requests[0].prompt, t0, time.perf_counter()))
        return out

    def write(r, *args):
        t0 = time.perf_counter()
        writing.set()
        if r.id == "r1":
            raise OSError("disk full")
        time.sleep(0.5)  # a slow write: a window for the other unit's generation
        row = real_write(r, *args)
        spans["write"].append((r.id, t0, time.perf_counter()))
        return row

    stage.pipe.__class__ = type("Timed", (stage.pipe.__class__,), {"generate": generate})
    stage._write = write
    rows = {}
    first = threading.Thread(target=lambda: rows.update({r["id"]: r for r in stage.run_unit(reqs[:2], "u")}))
    first.start()
    assert writing.wait(60)  # the first unit generated and is writing
    second = threading.Thread(target=lambda: rows.update({r["id"]: r for r in stage.run_unit(reqs[2:], "u")}))
    second.start()
    first.join(60), second.join(60)
    (p1, s1, e1), (p2, s2, e2) = sorted(spans["generate"], key=lambda g: g[1])
    assert p1 == reqs[0].prompt and e1 <= s2  # one unit in the models at a time, the older first
    r0_write = next(w for w in spans["write"] if w[0] == "r0")
    assert s2 < r0_write[2], spans  # the second unit generated while the first one's video was written
    assert len(spans["generate"]) == 2  # the failed write generated nothing again
    assert rows["r1"]["status"] == "error" and "writing its video: OSError: disk full" in rows["r1"]["error"]
    for rid in ("r0", "r2", "r3"):
        assert rows[rid]["status"] == "ok"
        with open(rows[rid]["path"], "rb") as got, open(want[rid]["path"], "rb") as exp:
            assert got.read() == exp.read(), rid  # the same video as the unit made alone
        assert {k: v for k, v in rows[rid].items() if k not in ("path", "seconds")} == \
            {k: v for k, v in want[rid].items() if k not in ("path", "seconds")}


def test_jsonl_csv_and_parquet_give_the_same_requests(tmp_path):
    records = [{"id": "a", "prompt": "a red circle", "size": "64x48", "frames": 9, "seed": 1},
               {"id": "b", "prompt": "a blue square", "width": 32, "height": 32, "seconds": 2, "fps": 4},
               {"id": "c", "prompt": "a triangle", "seed": 3, "image": "x.png", "negative_prompt": "blur"}]
    cols = ["id", "prompt", "size", "width", "height", "frames", "seconds", "fps", "seed", "image", "negative_prompt"]
    with open(tmp_path / "p.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(records)
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in records]), tmp_path / "p.parquet")
    cfg = BulkConfig(size="32x32", frames=5)
    results = []
    for name in ("p.jsonl", "p.csv", "p.parquet"):
        todo, invalid, counts = plan(str(tmp_path / name), str(tmp_path / f"out-{name}"), cfg)
        assert not invalid and counts["to_generate"] == 3, name
        results.append([(r.id, r.prompt, r.width, r.height, r.num_frames, r.seconds, r.fps, r.seed, r.image,
                         r.negative_prompt) for r in todo])
    assert results[0] == results[1] == results[2]
    assert results[0][0][2:5] == (64, 48, 9) and results[0][1][2:7] == (32, 32, None, 2.0, 4.0)
    assert results[0][2][2:5] == (32, 32, 5)  # the defaults


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--size", "wide"], "size must look like WIDTHxHEIGHT"),
    (["--frames", "2000"], "frames must be between 1 and 1024"),
    (["--actors", "0"], "actors must be at least 1"),
])
def test_bulk_flags_are_checked_by_the_config_before_ray_starts(model_dir, tmp_path, argv, message):
    from flows.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate-bulk", "--model", model_dir, "--prompts", str(tmp_path / "p.jsonl"), "--out",
              str(tmp_path / "out"), *argv])
    assert str(e.value.code).startswith("sora generate-bulk: ") and message in str(e.value.code)
