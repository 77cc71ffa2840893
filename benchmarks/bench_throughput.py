"""Throughput of caption, bulk generation and DiT training: the Ray stage (Ray Data actor pool,
Ray Train) vs a plain one-process loop over the same model and inputs, side by side in one run.

    python -m benchmarks.bench_throughput [--quick] [--only caption,generate,train] [--repeats N]

One JSON row per figure (`benchmarks.common.report`), the Ray cluster's resources (CPU, GPU,
memory from ``ray.cluster_resources()``) in each row's ``extra``. Ray is started once before
timing (a cluster is long-lived; `RAY_ADDRESS` picks another one) and its start-up is reported
apart. Each run of ours pays what a command pays: its actors start, import and load their model.

- caption (clips/s): `pipelines.caption.run_caption` with our small LLaVA captioner (built from
  its "tiny" preset, untrained: it never ends a caption early, so every caption is greedy
  decoding of ``max_new_tokens``) over shapes-world clips ingested as `sora ingest` does; the
  command's default pool (one actor per CPU, which Ray gives one torch thread each; one per
  GPU where there are GPUs). Baseline: the model loaded once, then
  the same clips in the same batches through `pipelines.caption.clip_frames` and
  `Captioner.caption`, in one process at torch's default thread count (every core).
- generate (videos/s): `pipelines.generate_bulk.run_generate_bulk` over a JSONL prompt table
  with the tiny random model of the tests (tests/tiny_model.py), on the same pool. Baseline:
  one `SoraPipeline` in this process (default threads), the same requests in the same
  same-shape units (`plan`, `make_units`), each video written as an mp4.
- train (tokens/s): `pipelines.train.run_training` (our DiT, "tiny" preset) on the latents table
  of tests/test_train.py, on Ray Train with 1 worker (every CPU's threads) and with 2 workers
  (the CPUs split between them), the latents cached in memory (``cache_data``). Baseline: one
  process, torch's default threads, the same model, data and pack size per step: the same
  `build_model`, `iter_cached_packs` and `train_step` (with the EMA update) in a plain loop
  (``extra`` adds the same loop at one thread: the work of one process of the 2 workers).
  Tokens/s on both sides: real (unpadded) video tokens of every worker over the wall time of
  the last ``steps`` steps, after ``steps`` warm-up steps (the loop's own ``tokens_per_s``
  window: ``log_every_steps = steps``, ``max_steps = 2 x steps``); checkpointing and Ray Train's
  start-up are outside the window and reported apart (``run_seconds``).

Caption and generate rows also split each side's timed runs (``extra``): seconds to the first
finished batch (start-up: for ours Ray Data's planning, the actors' processes, their imports and
model load, one batch), the rate from the end of the first round of batches (one per actor) to
the last (items/s once running), and the share of the machine's cores busy in each part
(/proc/stat, every process counted). ``cold_process_import_and_load_s``: what a fresh process
pays to import the stage and load the model, which each actor pays and the in-process loop has
paid before it is timed. The default sizes are chosen so that the running part is about half
of a run of ours or more: with fewer items a run is mostly its start-up, whatever the rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a private local Ray unless RAY_ADDRESS names a cluster: never one another process runs here
os.environ.setdefault("RAY_ADDRESS", "local")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
sys.path.insert(0, TESTS)

from benchmarks.common import median, report, side_by_side  # noqa: E402

GIB = 2**30


def cluster() -> dict[str, Any]:
    """The Ray cluster's resources: CPUs, GPUs, memory (GiB) and object store (GiB)."""
    import ray

    r = ray.cluster_resources()
    return {"CPU": r.get("CPU", 0.0), "GPU": r.get("GPU", 0.0), "memory_gib": round(r.get("memory", 0.0) / GIB, 1),
            "object_store_gib": round(r.get("object_store_memory", 0.0) / GIB, 1), "nodes": len(ray.nodes())}


def pool_actors(cfg) -> int:
    """The actor pool a stage config gets on this cluster (`pipelines.stage.resolve_resources`:
    with the configs' default, one actor per GPU where the cluster has GPUs, else one per CPU)."""
    from pipelines.stage import resolve_resources

    return resolve_resources(cfg).actors


def threads() -> int:
    import torch

    return torch.get_num_threads()


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all of this machine's cores so far (/proc/stat; (0, 0) where
    there is none): the share of the cores a stretch of time kept busy, every process counted."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return 0, 0
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


class Marks:
    """When a run's items got done: (seconds since the run started, items done so far, CPU ticks),
    one mark per finished batch (a stage's ``progress`` callback, or the loop's own calls).
    ``lanes``: batches that run at once (a pool's actors; 1 for the loop)."""

    def __init__(self, lanes: int = 1) -> None:
        self.lanes = lanes
        self.t0 = time.perf_counter()
        self.ticks0 = cpu_ticks()
        self.marks: list[tuple[float, int, tuple[int, int]]] = []

    def __call__(self, done: int, total: int | None = None) -> None:
        self.marks.append((time.perf_counter() - self.t0, done, cpu_ticks()))

    def split(self) -> dict[str, float | None]:
        """Start-up: seconds to the first finished batch (actors, imports, model load, one batch).
        Running: items/s from the end of the first round (a batch from each lane) to the last
        batch, so lanes that finish their first batches together do not count as speed. The share
        of the machine's cores kept busy in each part (1: every core)."""
        def busy(a: tuple[int, int], b: tuple[int, int]) -> float | None:
            return round((b[0] - a[0]) / (b[1] - a[1]), 3) if b[1] > a[1] else None

        t1, _, k1 = self.marks[0]
        ts, ds, ks = self.marks[min(self.lanes, len(self.marks)) - 1]
        te, de, ke = self.marks[-1]
        return {"first_batch_s": t1, "running_items_per_s": (de - ds) / (te - ts) if te > ts else None,
                "cpu_busy_start": busy(self.ticks0, k1), "cpu_busy_running": busy(ks, ke) if te > ts else None}


def split_extra(runs: dict[str, list[Marks]], repeats: int) -> dict[str, Any]:
    """Median start-up (to the first finished batch), running rate and busy core shares of each
    side's timed runs (the last ``repeats``: warm-up runs left out)."""
    out: dict[str, Any] = {}
    for side, marks in runs.items():
        splits = [m.split() for m in marks[-repeats:]]
        for key in ("first_batch_s", "running_items_per_s", "cpu_busy_start", "cpu_busy_running"):
            xs = [s[key] for s in splits if s[key] is not None]
            out[f"{key}_{side}"] = round(median(xs), 3) if xs else None
    return out


def cold_start(code: str, repeats: int = 2) -> float:
    """Median seconds a fresh Python process takes to run ``code`` (imports, a model load): what
    each actor of a pool pays before its first batch, and a one-process command too (the
    in-process loop of these benchmarks has paid it before it is timed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return round(median(times), 3)


def fresh(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------- caption


def caption_data(work: str, videos: int) -> tuple[str, str]:
    """Shapes-world clips ingested as `sora ingest` does (no captions), and an untrained
    captioner of the "tiny" preset saved as a model directory. Returns (data, captioner)."""
    import torch

    from pipelines.ingest import IngestConfig, run_sequential
    from sora import shapes
    from sora.captioner import CaptionerConfig, build_captioner, save_captioner

    raw, data = os.path.join(work, "raw"), os.path.join(work, "data")
    records = shapes.synth_dataset(raw, videos, seed=0, ranges=shapes.TINY)
    run_sequential([raw], data, IngestConfig(min_motion=0.0))
    cfg = CaptionerConfig.preset("tiny")
    torch.manual_seed(0)
    model, processor = build_captioner(cfg, [r["caption"] for r in records])
    save_captioner(model, processor, os.path.join(work, "captioner"), cfg, {"note": "untrained, for benchmarks"})
    return data, os.path.join(work, "captioner")


def bench_caption(work: str, videos: int, repeats: int, warmup: int) -> dict:
    from pipelines.caption import CaptionConfig, clip_frames, read_captions, run_caption
    from pipelines.ingest import read_clips
    from sora.captioner import Captioner

    data, model = caption_data(work, videos)
    clips = sorted(read_clips(data).to_pylist(), key=lambda c: c["clip_id"])  # run_caption's batch order
    cfg = CaptionConfig(model=model)  # the command's defaults: the pool sized from the cluster
    actors = pool_actors(cfg)
    load = cold_start(f"import pipelines.caption, torch; from sora.captioner import Captioner; "
                      f"Captioner.from_pretrained({model!r})")
    got: dict[str, dict[str, str]] = {}
    runs: dict[str, list[Marks]] = {"baseline": [], "ours": []}

    def loop() -> None:
        marks = Marks()
        captioner = Captioner.from_pretrained(model)
        out = {}
        for i in range(0, len(clips), cfg.batch_size):
            batch = clips[i: i + cfg.batch_size]
            texts = captioner.caption([clip_frames(c, cfg) for c in batch])
            out.update({c["clip_id"]: t for c, t in zip(batch, texts)})
            marks(len(out))
        got["loop"] = out
        runs["baseline"].append(marks)

    def ray_run() -> None:
        fresh(os.path.join(data, "captions"))
        marks = Marks(actors)
        result = run_caption(data, cfg, progress=marks)
        runs["ours"].append(marks)
        assert result["captioned"] == len(clips) and result["failed"] == 0, result
        caps = read_captions(data)
        got["ray"] = dict(zip(caps["clip_id"].to_pylist(), caps["caption"].to_pylist()))

    tb, to = side_by_side(loop, ray_run, repeats=repeats, warmup=warmup, settled=True)
    assert got["loop"].keys() == got["ray"].keys()
    same = sum(got["loop"][k] == got["ray"][k] for k in got["loop"]) / len(clips)
    n = len(clips)
    return report(
        "caption", "clips/s",
        (f"one-process loop: clip_frames + Captioner.caption, {threads()} threads", n / median(tb)),
        (f"run_caption: Ray Data actor pool, {actors} actors (the default: one per CPU)", n / median(to)),
        higher_is_better=True,
        extra={"cluster": cluster(), "clips": n, "videos": videos, "batch_size": cfg.batch_size,
               "frames_per_clip": cfg.num_frames, "model": "our LLaVA captioner, tiny preset, untrained",
               "captions_identical": round(same, 3), "seconds_baseline": [round(x, 3) for x in tb],
               "seconds_ours": [round(x, 3) for x in to], "cold_process_import_and_load_s": load,
               **split_extra(runs, repeats)})


# ----------------------------------------------------------------------------- bulk generation


def write_prompts(path: str, n: int) -> None:
    colours, shapes_, motions = ("red", "green", "blue"), ("circle", "square", "triangle"), ("left", "right", "up")
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i:04d}", "seed": i, "prompt": f"a {colours[i % 3]} {shapes_[i // 3 % 3]} "
                                f"moves {motions[i // 9 % 3]}"}) + "\n")


def bench_generate(work: str, n: int, repeats: int, warmup: int) -> dict:
    from pipelines.generate_bulk import BulkConfig, make_units, plan, run_generate_bulk, safe_name
    from sora.pipeline import SoraPipeline
    from sora.video_io import write_video
    from tiny_model import DEFAULTS, build_tiny_model

    model = build_tiny_model(os.path.join(work, "model"))
    prompts = os.path.join(work, "prompts.jsonl")
    write_prompts(prompts, n)
    cfg = BulkConfig()  # the command's defaults: the pool sized from the cluster
    actors = pool_actors(cfg)
    load = cold_start(f"import pipelines.generate_bulk, torch; from sora.pipeline import SoraPipeline; "
                      f"SoraPipeline.from_pretrained({model!r})")
    counter = {"i": 0}
    runs: dict[str, list[Marks]] = {"baseline": [], "ours": []}

    def out() -> str:
        counter["i"] += 1
        return fresh(os.path.join(work, f"out{counter['i']}"))

    def loop() -> None:
        d, marks, done = out(), Marks(), 0
        pipe = SoraPipeline.from_pretrained(model)
        todo, invalid, _ = plan(prompts, d, cfg)
        assert len(todo) == n and not invalid
        os.makedirs(os.path.join(d, "videos"))
        for unit in make_units(todo, cfg.batch_size):
            result = pipe.generate(unit)
            for r, frames, info in zip(unit, result.frames, result.info):
                write_video(os.path.join(d, "videos", f"{safe_name(r.id)}.mp4"), frames, info["fps"])
            done += len(unit)
            marks(done)
        runs["baseline"].append(marks)

    def ray_run() -> None:
        marks = Marks(actors)
        result = run_generate_bulk(model, prompts, out(), cfg, progress=marks)
        runs["ours"].append(marks)
        assert result["generated"] == n and result["errors"] == 0, result

    tb, to = side_by_side(loop, ray_run, repeats=repeats, warmup=warmup, settled=True)
    return report(
        "generate_bulk", "videos/s",
        (f"one-process loop: SoraPipeline.generate per same-shape unit, {threads()} threads", n / median(tb)),
        (f"run_generate_bulk: Ray Data actor pool, {actors} actors (the default: one per CPU)", n / median(to)),
        higher_is_better=True,
        extra={"cluster": cluster(), "videos": n, "batch_size": cfg.batch_size,
               "video": f"{DEFAULTS['width']}x{DEFAULTS['height']}, {DEFAULTS['num_frames']} frames, "
                        f"{DEFAULTS['num_inference_steps']} steps",
               "model": "tests/tiny_model.py (random weights)", "seconds_baseline": [round(x, 3) for x in tb],
               "seconds_ours": [round(x, 3) for x in to], "cold_process_import_and_load_s": load,
               **split_extra(runs, repeats)})


# ----------------------------------------------------------------------------- DiT training


def train_config(workers: int, cpus: float, steps: int, tokens: int):
    from pipelines.train import TrainConfig

    return TrainConfig(preset="tiny", workers=workers, cpus_per_worker=cpus / workers, max_steps=2 * steps,
                       log_every_steps=steps, tokens_per_step=tokens, warmup_steps=steps,
                       checkpoint_every_steps=2 * steps, checkpoint_every_minutes=None, keep_checkpoints=1,
                       max_failures=0, cache_data=True, shuffle_buffer_rows=16, seed=0)


def train_loop(data: str, vae: str, cfg) -> dict[str, float]:
    """The plain one-process loop: `build_model`, then `train_step` + EMA on `iter_cached_packs`
    of every latents row, in this process at its torch thread count. Tokens/s of steps
    ``log_every_steps + 1 .. max_steps`` (the same window as the Ray loop's last report)."""
    import torch

    from pipelines.latents import read_latents
    from pipelines.train import (EMA, build_model, inspect_latents, iter_cached_packs, plan_model, sample_from_row,
                                 train_step)

    info = inspect_latents(data)
    plan = plan_model(data, info, cfg, vae)
    cfg = plan.cfg
    samples = [sample_from_row(r) for r in read_latents(data).to_pylist()]
    device = torch.device("cpu")
    core, model, optimizer, flops = build_model(plan.loop_config(), cfg, device, 1)
    ema, flow = EMA(core, cfg.ema_decay), cfg.flow()
    step, epoch, tokens, t0, measured = 0, 0, 0.0, 0.0, cfg.max_steps - cfg.log_every_steps
    while step < cfg.max_steps:
        for pack in iter_cached_packs(samples, cfg, epoch, 0):
            step += 1
            out = train_step(model, pack, step, optimizer, cfg, flow, flops, device, 0, 1, contextlib.nullcontext())
            if not out["skipped"]:
                ema.update(core)
            if step == cfg.log_every_steps:
                t0 = time.monotonic()
            elif step > cfg.log_every_steps:
                tokens += out["tokens"]
            if step == cfg.max_steps:
                break
        epoch += 1
    return {"tokens_per_s": tokens / (time.monotonic() - t0), "steps": step, "epochs": epoch,
            "padding_fraction": 1.0 - tokens / (measured * cfg.tokens_per_step)}


def bench_train(work: str, rows: int, steps: int, tokens: int, repeats: int) -> list[dict]:
    from pipelines.train import run_training
    from test_train import build_latents
    from threads import torch_threads

    data, vae = build_latents(os.path.join(work, "latents"), n=rows)
    cpus = cluster()["CPU"]
    counter = {"i": 0}
    base: list[float] = []
    pad: dict[str, list[float]] = {"baseline": [], "1": [], "2": []}  # unused share of the token budget
    base_one_thread: list[float] = []  # the same loop at one torch thread: what one 2-worker process does
    ours: dict[int, list[float]] = {1: [], 2: []}
    run_s: dict[int, list[float]] = {1: [], 2: []}

    def ray_run(workers: int) -> None:
        counter["i"] += 1
        d = fresh(os.path.join(work, f"run{counter['i']}"))
        t0 = time.perf_counter()
        summary = run_training(data, os.path.join(d, "out"), vae, train_config(workers, cpus, steps, tokens),
                               storage_path=os.path.join(d, "store"), name="bench")
        run_s[workers].append(time.perf_counter() - t0)
        assert summary["steps"] == 2 * steps and summary["metrics"]["step"] == 2 * steps, summary
        ours[workers].append(summary["metrics"]["tokens_per_s"])
        pad[str(workers)].append(summary["metrics"]["padding_fraction"])

    for _ in range(repeats):  # alternating, as side_by_side: drifting load hits every side alike
        loop = train_loop(data, vae, train_config(1, cpus, steps, tokens))
        base.append(loop["tokens_per_s"])
        pad["baseline"].append(loop["padding_fraction"])
        with torch_threads(1):
            base_one_thread.append(train_loop(data, vae, train_config(1, cpus, steps, tokens))["tokens_per_s"])
        ray_run(1)
        ray_run(2)
    rows_out = []
    for workers in (1, 2):
        rows_out.append(report(
            f"train_dit_{workers}_worker{'s' if workers > 1 else ''}", "tokens/s",
            (f"one-process loop: build_model + train_step, {threads()} threads", median(base)),
            (f"run_training: Ray Train, {workers} worker(s) x {max(1, int(cpus / workers))} thread(s)",
             median(ours[workers])),
            higher_is_better=True,
            extra={"cluster": cluster(), "model": "DiT tiny preset", "latents_rows": rows,
                   "tokens_per_step_per_worker": tokens, "warmup_steps": steps, "measured_steps": steps,
                   "tokens_per_s_baseline": [round(x, 1) for x in base],
                   "tokens_per_s_baseline_1_thread": [round(x, 1) for x in base_one_thread],
                   "tokens_per_s_ours": [round(x, 1) for x in ours[workers]],
                   "run_seconds_ours": [round(x, 2) for x in run_s[workers]],
                   "padding_fraction_baseline": round(median(pad["baseline"]), 3),
                   "padding_fraction_ours": round(median(pad[str(workers)]), 3),
                   "how": "real tokens of every worker over the wall time of the last measured_steps steps "
                          "(after warmup_steps); Ray: the training loop's own tokens_per_s window"}))
    return rows_out


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small inputs, one repeat: a smoke run (~1 minute)")
    ap.add_argument("--only", default="caption,generate,train", help="comma-separated: caption, generate, train")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of each side (default 3, quick 1)")
    ap.add_argument("--videos", type=int, default=None, help="caption: shapes-world videos (default 384, quick 16)")
    ap.add_argument("--prompts", type=int, default=None, help="generate: prompts (default 960, quick 16)")
    ap.add_argument("--steps", type=int, default=None,
                    help="train: warm-up steps, then as many measured (default 20, quick 5)")
    ap.add_argument("--rows", type=int, default=None, help="train: latents rows (default 192, quick 48)")
    ap.add_argument("--tokens", type=int, default=256, help="train: tokens per step per worker (the pack's budget)")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    if not only or set(only) - {"caption", "generate", "train"}:
        raise SystemExit(f"bench_throughput: --only takes caption, generate and/or train, got {args.only!r}")
    repeats = args.repeats or (1 if args.quick else 3)
    warmup = 0 if args.quick else 1
    from pipelines.ray_utils import ensure_ray

    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bench-thr-"))
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    ensure_ray()
    print(f"ray started in {time.perf_counter() - t0:.1f} s: {json.dumps(cluster())}", file=sys.stderr, flush=True)
    try:
        if "caption" in only:
            bench_caption(os.path.join(work, "caption"), args.videos or (16 if args.quick else 384), repeats, warmup)
        if "generate" in only:
            bench_generate(os.path.join(work, "generate"), args.prompts or (16 if args.quick else 960), repeats, warmup)
        if "train" in only:
            bench_train(os.path.join(work, "train"), args.rows or (48 if args.quick else 192),
                        args.steps or (5 if args.quick else 20), args.tokens, repeats)
    finally:
        import ray

        ray.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
