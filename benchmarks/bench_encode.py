"""Encode throughput: the Ray Data encode stage vs a one-process loop over the same functions and
the same clips, side by side in one run.

    python -m benchmarks.bench_encode [--quick] [--clips N] [--repeats 3] [--work DIR]

The clips: shapes-world videos (`sora.shapes`) at camera resolution - 720 pixels on the short
side (1280x720 for 16:9; every aspect of the world in turn), 61 frames at 24 fps, H.264 - ingested
for a low-resolution training stage (`IngestConfig(resolution="144p")`: buckets of the first 49
frames, about 256x144), captions from the sidecar. Decoding 720p H.264 and the antialiased resize down to
the bucket are then a real share of the work beside the VAE, as they are where footage is larger
than what the model trains on. The models: a tiny random VAE (`VAEConfig.preset("tiny")`) and the
offline MiniLM text encoder. `--quick`: 6 clips at 240 pixels, 41 frames, the 64p class.

- baseline: one process, a plain loop over the clips: decode (`sora.video_io.read_frames` at the
  bucket size) -> VAE -> patchify -> text encoder, with the encode stage's own functions
  (`EncodeStage.read_clip`, `encode_clip`), torch at its default thread count (every core),
  the rows written to one Parquet file; loading the models is counted, as it is for ours;
- ours: `run_encode(data, EncodeConfig(vae=...))` with its defaults, on a local Ray started
  before timing (its start-up is reported apart, "ray_start_s").

Both write fresh outputs each repeat (no resume skipping) and must give the same rows: the same
clips, and the same token bytes where both ran at one thread, close where thread counts differ
(MKL sums in another order); "tokens_bit_equal" counts the clips whose bytes match. In "extra" too:
the baseline's time split (decode vs models), and when ours' first batch came back (the pool's
start-up - worker processes, imports, model loads - plus one batch: paid once per run). The videos
are kept in `--work` (when given) for the next run: clip i of a seed never depends on the count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import median, report, side_by_side, tiny_vae


def make_corpus(work: str, n: int, side: int, frames: int, resolution: str) -> str:
    """DATA (ingested, captioned) of n shapes-world clips; kept in `work` when already made."""
    from pipelines.caption import CaptionConfig, run_caption
    from pipelines.ingest import IngestConfig, run_sequential
    from sora.shapes import ClipRanges, synth_dataset

    name = f"{n}x{side}p{frames}f-{resolution}"
    raw, data = os.path.join(work, "raw", name), os.path.join(work, "data", name)
    if not os.path.exists(os.path.join(raw, "captions.jsonl")):
        synth_dataset(raw, n, seed=0, ranges=ClipRanges(short_sides=(side,), frame_counts=(frames,), fps=(24,)))
    if not os.path.isdir(os.path.join(data, "captions")):
        shutil.rmtree(data, ignore_errors=True)
        run_sequential([raw], data, IngestConfig(min_motion=0.0, resolution=resolution))
        run_caption(data, CaptionConfig(model=None))
    return data


def plain_loop(data: str, out: str, cfg, split: dict) -> dict[str, dict]:
    """The baseline: models loaded once in this process, then clip after clip: decode, VAE,
    patchify, text encoder; the rows written to out/latents.parquet. Returns the rows by clip."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.encode import EncodeStage, pending_clips
    from pipelines.latents import LATENTS_SCHEMA

    t0 = time.perf_counter()
    stage = EncodeStage(cfg)  # no output dir: the rows stay here
    split["load_models_s"] = time.perf_counter() - t0
    split["decode_s"] = split["models_s"] = 0.0
    rows = []
    for clip in pending_clips(data)[0].to_pylist():
        t0 = time.perf_counter()
        frames = stage.read_clip(clip)
        t1 = time.perf_counter()
        rows.append(stage.encode_clip(clip, str(clip["caption"]), frames))
        split["decode_s"] += t1 - t0
        split["models_s"] += time.perf_counter() - t1
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LATENTS_SCHEMA), os.path.join(out, "latents.parquet"))
    return {r["clip_id"]: r for r in rows}


def compare(baseline: dict[str, dict], ours: dict[str, dict]) -> int:
    """Assert both made the same rows; return how many clips have bit-identical tokens."""
    from pipelines.latents import bytes_to_array

    assert len(ours) == len(baseline) and ours.keys() == baseline.keys(), (len(ours), len(baseline))
    equal = 0
    for clip_id, b in baseline.items():
        o = ours[clip_id]
        assert (o["tokens_shape"], o["text_shape"], o["caption"], o["bucket"]) == \
            (b["tokens_shape"], b["text_shape"], b["caption"], b["bucket"]), clip_id
        equal += o["tokens"] == b["tokens"]
        for key in ("tokens", "text"):
            x = bytes_to_array(o[key], o[f"{key}_shape"], o[f"{key}_dtype"]).astype(np.float32)
            y = bytes_to_array(b[key], b[f"{key}_shape"], b[f"{key}_dtype"]).astype(np.float32)
            np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-2, err_msg=f"{clip_id} {key}")
    return equal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 small clips (240 pixels, 41 frames, the 64p class)")
    ap.add_argument("--clips", type=int, default=None, help="number of clips (default 48, quick 6)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None, help="working directory; its videos are kept for the next run")
    args = ap.parse_args()
    n = args.clips or (6 if args.quick else 48)
    side, frames, resolution = (240, 41, "64p") if args.quick else (720, 61, "144p")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow.compute as pc
    import ray
    import torch

    from pipelines.encode import EncodeConfig, run_encode
    from pipelines.latents import read_latents
    from pipelines.ray_utils import ensure_ray

    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bench-encode-"))
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    data, vae = make_corpus(work, n, side, frames, resolution), tiny_vae(work)
    print(f"corpus ready in {time.perf_counter() - t0:.0f} s: {data}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - t0
    counter = {"i": 0}

    def fresh() -> str:
        """A copy of DATA without latents: each run encodes every clip."""
        counter["i"] += 1
        d = os.path.join(work, "runs", f"r{counter['i']}")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(data, d, ignore=shutil.ignore_patterns("latents", "null_text", "quarantine"))
        return d

    rows: dict[str, dict] = {}
    split: dict[str, float] = {}
    result: dict = {}
    first: dict[str, float] = {}

    def baseline() -> None:
        rows["baseline"] = plain_loop(data, fresh(), EncodeConfig(vae=vae), split)

    def ours() -> None:
        d = fresh()
        t0 = time.perf_counter()
        first.clear()  # when the first batch came back: the pool's start-up (actors, imports, models) + one batch
        result.update(run_encode(d, EncodeConfig(vae=vae), progress=lambda *_: first.setdefault(
            "s", time.perf_counter() - t0)))
        rows["ours"] = {r["clip_id"]: r for r in read_latents(d).to_pylist()}

    tb, to = side_by_side(baseline, ours, repeats=args.repeats, warmup=1, settled=True)
    equal = compare(rows["baseline"], rows["ours"])
    clips = read_latents(os.path.join(work, "runs", f"r{counter['i']}"), columns=["bucket"])
    buckets = {d["values"]: d["counts"] for d in pc.value_counts(clips["bucket"]).to_pylist()}
    report(
        "encode",
        "clips/s",
        (f"one-process loop, torch default threads ({torch.get_num_threads()})", n / median(tb)),
        ("Ray Data actor pool (run_encode defaults)", n / median(to)),
        higher_is_better=True,
        extra={"clips": n, "corpus": f"shapes world, {side}p short side, {frames} frames at 24 fps, H.264",
               "ingest_resolution": resolution, "buckets": buckets, "vae": "tiny (random init)",
               "text_encoder": "MiniLM (all-MiniLM-L6-v2)", "tokens_bit_equal": equal,
               "cluster": {k: ray.cluster_resources().get(k, 0) for k in ("CPU", "GPU")},
               "actors_used": result.get("actors_used"), "batches": result.get("batches"),
               "baseline_split_s": {k: round(v, 2) for k, v in split.items()},
               "ours_first_batch_done_s": round(first["s"], 2), "ray_start_s": round(ray_start, 2),
               "load_average_1m": round(os.getloadavg()[0], 2),
               "seconds_baseline": [round(x, 3) for x in tb], "seconds_ours": [round(x, 3) for x in to]},
    )
    ray.shutdown()
    shutil.rmtree(os.path.join(work, "runs"), ignore_errors=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
