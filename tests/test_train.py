"""DiT training on Ray Train, for real: 2 CPU workers (gloo DDP), a shapes-world-like latents
table, sharded checkpoints on local storage resumed by 1 and by 2 workers, a worker killed
mid-run, a stopped run re-run.

The dataset: 48 tiny clips of moving coloured boxes at 4 aspect ratios (1:1, 3:2, 2:3, 2:1)
and 2 lengths (5 and 9 frames, 8-24 tokens each: small so the VAE encode stays cheap), encoded by a random-init tiny CausalVideoVAE (its latents still carry the
boxes' structure; latent stats fitted so they are unit-variance), captions embedded by the
real offline MiniLM TextEncoder, rows written with `pipelines.latents.make_row`.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.latents import LATENTS_SCHEMA, make_row
from pipelines.train import TrainConfig, run_training
from sora.optim import lr_at
from threads import torch_threads

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0), "white": (255, 255, 255)}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = [(32, 32), (48, 32), (32, 48), (64, 32)]  # (W, H): 1:1, 3:2, 2:3, 2:1
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def render_boxes(w: int, h: int, t: int, colour: str, bg: str, motion: str, rng: np.random.Generator) -> np.ndarray:
    """(T, H, W, 3) uint8: one box of side h/3 crossing the frame in `motion`."""
    side = h // 3
    frames = np.empty((t, h, w, 3), np.uint8)
    frames[:] = BACKGROUNDS[bg]
    dx, dy = MOTIONS[motion]
    x0, y0 = rng.integers(0, w - side), rng.integers(0, h - side)
    for i in range(t):
        f = i / max(t - 1, 1)
        x = int(np.clip(x0 + dx * f * (w - side) * 0.6, 0, w - side))
        y = int(np.clip(y0 + dy * f * (h - side) * 0.6, 0, h - side))
        frames[i, y : y + side, x : x + side] = COLOURS[colour]
    return frames


def build_latents(root: str, n: int = 48, seed: int = 0) -> tuple[str, str]:
    """Write DATA/latents (4 parquet files) and a VAE dir; returns (data, vae_dir)."""
    from sora.patches import grid_for, patchify
    from sora.text_encoder import TextEncoder
    from sora.vae import CausalVideoVAE, VAEConfig

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    vae = CausalVideoVAE(VAEConfig.preset("tiny")).eval()
    clips, videos = [], []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        t = (5, 9)[(i // len(SIZES)) % 2]
        colour, bg, motion = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)), rng.choice(list(MOTIONS))
        videos.append(torch.from_numpy(render_boxes(w, h, t, colour, bg, motion, rng)).permute(3, 0, 1, 2))  # (3, T, H, W)
        clips.append({"clip_id": f"clip{i:03d}", "bucket": f"{w}x{h}x{t}", "fps": 8.0, "bucket_width": w,
                      "bucket_height": h, "bucket_frames": t, "source": f"synthetic://{i}", "start_frame": 0,
                      "caption": f"A {colour} square moves {motion} across a {bg} background."})
    raw: list = [None] * n
    for shape in {tuple(v.shape) for v in videos}:  # one VAE call per clip size
        idx = [i for i, v in enumerate(videos) if tuple(v.shape) == shape]
        with torch.no_grad():
            z = vae.encode(torch.stack([videos[i] for i in idx]).float() / 127.5 - 1).mode()  # (B, C, T', H', W')
        for i, zi in zip(idx, z):
            raw[i] = zi
    vae.fit_latent_stats(torch.cat([z.flatten() for z in raw]))
    vae_dir = os.path.join(root, "vae")
    vae.save_pretrained(vae_dir)
    encoder = TextEncoder.from_pretrained(None, max_length=32)
    states, mask = encoder.encode([c["caption"] for c in clips])
    rows = []
    for i, (z, clip) in enumerate(zip(raw, clips)):
        zn = (z - vae.config.shift_factor) * vae.config.scaling_factor
        rows.append(make_row(tokens=patchify(zn).numpy().astype(np.float16), grid=grid_for(tuple(zn.shape)),
                             patch_size=(1, 2, 2), latent_shape=tuple(zn.shape),
                             text=states[i][mask[i]].numpy().astype(np.float16), text_encoder="minilm",
                             clip=clip, caption=clip["caption"], vae="vae@test"))
    data = os.path.join(root, "data")
    os.makedirs(os.path.join(data, "latents"))
    for k in range(4):
        pq.write_table(pa.Table.from_pylist(rows[k::4], schema=LATENTS_SCHEMA), os.path.join(data, "latents", f"part-{k}.parquet"))
    return data, vae_dir


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    t0 = time.perf_counter()
    out = build_latents(str(tmp_path_factory.mktemp("train-data")))
    print(f"\nlatents dataset built in {time.perf_counter() - t0:.1f}s")
    return out


def small_config(**overrides) -> TrainConfig:
    """2 workers of half a CPU each (the test Ray has 2 CPUs; Ray Data's reads need some)."""
    base = dict(preset="tiny", workers=2, cpus_per_worker=0.5, max_steps=12, tokens_per_step=64, lr=2e-3,
                warmup_steps=5, ema_decay=0.99, checkpoint_every_steps=6, checkpoint_every_minutes=None,
                log_every_steps=6, shuffle_buffer_rows=16, seed=0, max_failures=2, cache_data=True)
    return TrainConfig(**{**base, **overrides})


def committed_step(run_dir: str) -> int:
    """Step of the latest checkpoint Ray Train has *registered* (its manager snapshot). Files
    of a checkpoint appear in storage before the controller registers it; a worker killed in
    between restarts from the previous one, so the test waits for the registration."""
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            latest = json.load(f).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not there yet, or being rewritten
        return -1
    return int(latest.get("metrics", {}).get("checkpoint_step", -1))


def kill_a_worker_after_checkpoint(run_dir: str, after_step: int, thread: threading.Thread) -> int:
    """SIGKILL one Ray Train worker process of this test's Ray right after a checkpoint past
    ``after_step`` is registered. The PIDs come from Ray's actor table (GCS) beforehand, so the
    kill lands within ~0.1 s, well before the run's last step. Returns that checkpoint's step."""
    import ray

    deadline = time.monotonic() + 180
    workers: list = []
    while len(workers) != 2:
        assert time.monotonic() < deadline and thread.is_alive(), "the training workers did not start"
        workers = [a for a in ray._private.state.actors().values()
                   if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a["Pid"]]
        time.sleep(0.2)
    while (step := committed_step(run_dir)) <= after_step:
        assert time.monotonic() < deadline and thread.is_alive(), "no new checkpoint was registered"
        time.sleep(0.05)
    os.kill(int(workers[-1]["Pid"]), signal.SIGKILL)
    return step


def nan_loss_at_step(step: int):
    """A `run_training(loss_fn=...)` for the non-finite path: flow matching, but NaN on rank 0
    at this process's ``step``-th call (the step-th step of a run started from scratch)."""
    calls = [0]

    def loss_fn(model, batch, flow, generator):
        import ray.train

        from sora.flow import flow_matching_loss

        calls[0] += 1
        loss, stats = flow_matching_loss(model, batch, flow, generator)
        if calls[0] == step and ray.train.get_context().get_world_rank() == 0:
            loss = loss * float("nan")
        return loss, stats

    return loss_fn


@pytest.fixture(scope="module")
def runs(ray_session, latents, tmp_path_factory):
    """One run name, three invocations of the same command. Run 1: 2 workers, 12 steps, a NaN
    loss injected at step 7. Run 2: 1 worker, max_steps 24, resuming the checkpoint the 2
    workers wrote. Run 3: 2 workers, max_steps 48, resuming the 1-worker checkpoint; a worker
    is SIGKILLed after its first checkpoint and the group restarts from a 2-worker checkpoint."""
    from pipelines.train import load_checkpoint, make_optimizer, EMA
    from sora.dit import DiT, DiTConfig

    data, vae = latents
    root = str(tmp_path_factory.mktemp("train-runs"))
    store = os.path.join(root, "store")
    t0 = time.perf_counter()
    first = run_training(data, os.path.join(root, "out1"), vae, small_config(max_steps=12), storage_path=store,
                         name="run", loss_fn=nan_loss_at_step(7))
    t1 = time.perf_counter()
    # AdamW's own per-parameter step counters after run 1 (run 2 rotates this checkpoint away),
    # read by loading the 2-worker checkpoint into one process
    with open(os.path.join(first["checkpoint"], "state.json")) as f:
        model = DiT(DiTConfig(**json.load(f)["dit_config"]))
    opt = make_optimizer(model, small_config())
    load_checkpoint(first["checkpoint"], model, opt, EMA(model, 0.99))
    first["adam_steps"] = {float(s["step"]) for s in opt[0].state.values()}
    second = run_training(data, os.path.join(root, "out2"), vae, small_config(max_steps=24, workers=1),
                          storage_path=store, name="run")
    t2 = time.perf_counter()
    third: dict = {}
    cfg3 = small_config(max_steps=48)
    thread = threading.Thread(target=lambda: third.update(
        run_training(data, os.path.join(root, "out3"), vae, cfg3, storage_path=store, name="run")))
    thread.start()
    killed_after = kill_a_worker_after_checkpoint(os.path.join(store, "run"), 24, thread)
    thread.join(timeout=300)
    assert not thread.is_alive() and third, "run 3 did not finish after its worker was killed"
    print(f"\nrun 1 (2 workers): {t1 - t0:.1f}s, run 2 (1 worker): {t2 - t1:.1f}s, "
          f"run 3 (2 workers, with a restart): {time.perf_counter() - t2:.1f}s")
    return {"first": first, "second": second, "third": third, "root": root, "killed_after": killed_after}


def test_lr_schedule_is_stateless():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, schedule="cosine", max_steps=110, min_lr_ratio=0.1).lr_schedule()
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_cooldown_schedule_decays_over_the_last_fraction_by_steps_or_time():
    by_steps = TrainConfig(lr=1.0, warmup_steps=10, schedule="cooldown", max_steps=100, cooldown_fraction=0.2,
                           min_lr_ratio=0.0).lr_schedule()
    assert [lr_at(s, by_steps) for s in (5, 50, 80)] == pytest.approx([0.5, 1.0, 1.0])
    assert lr_at(90, by_steps) == pytest.approx(0.5)
    assert lr_at(100, by_steps) == pytest.approx(0.0)
    by_time = TrainConfig(lr=2.0, warmup_steps=0, schedule="cooldown", max_steps=None, max_minutes=10.0,
                          cooldown_fraction=0.5, min_lr_ratio=0.1).lr_schedule()
    assert lr_at(10_000, by_time, 0.0) == pytest.approx(2.0)  # no max_steps: only the clock counts
    assert lr_at(10, by_time, 0.75) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lr_at(10, by_time, 1.3) == pytest.approx(0.2)  # past the budget: the floor, not below
    both = TrainConfig(lr=1.0, warmup_steps=0, schedule="cooldown", max_steps=100, max_minutes=10.0,
                       cooldown_fraction=0.5, min_lr_ratio=0.0).lr_schedule()
    assert lr_at(75, both, 0.6) == pytest.approx(0.5)  # whichever budget is further along
    assert lr_at(60, both, 0.75) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="cooldown_fraction"):
        TrainConfig(schedule="cooldown", cooldown_fraction=0.0)


def test_time_budgeted_cooldown_ends_at_the_floor_with_workers_holding_every_cpu(ray_session, latents, tmp_path, capsys):
    """The clock reaches both workers through the step's all-reduce: a run with no max_steps
    ends its time budget at min_lr_ratio * lr (a constant run would end at lr). Its 2 workers x
    1 CPU on the 2-CPU test Ray leave nothing for a streaming read that asks for a CPU
    (read_cpus > 0), which used to deadlock; run_training caches the latents first and says so."""
    data, vae = latents
    # no warmup: however few steps a loaded machine fits into the budget, the last one is past it
    cfg = small_config(max_steps=None, max_minutes=0.15, schedule="cooldown", cooldown_fraction=0.5,
                       min_lr_ratio=0.25, checkpoint_every_steps=10_000, warmup_steps=0, cpus_per_worker=1.0,
                       cache_data=False, read_cpus=0.25)
    summary = run_training(data, str(tmp_path / "out"), vae, cfg, storage_path=str(tmp_path / "store"), name="cool")
    assert summary["steps"] > 0
    assert summary["final_lr"] == pytest.approx(0.25 * cfg.lr)
    # the workers' last report comes back with the summary: the final step, its lr, the window's throughput
    metrics = summary["metrics"]
    assert metrics["step"] == summary["steps"] and metrics["lr"] == summary["final_lr"]
    assert metrics["tokens_per_s"] > 0 and 0.0 <= metrics["padding_fraction"] < 1.0
    with open(tmp_path / "out" / "model_index.json") as f:
        assert json.load(f)["training"]["schedule"] == "cooldown"
    assert "caching the latents" in capsys.readouterr().out


def _often_reporting_loop(config: dict) -> None:
    """Ray Train loop: a metrics report offered every step, each rank with its own idea of the
    interval (rank 1 would report at every step on its own clock)."""
    import ray.train

    from pipelines import trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    reports = trainer.MetricsReports(world, every_s=config["every_s"][rank])
    made = 0
    for step in range(1, config["steps"] + 1):
        time.sleep(config["gap_s"])
        made += reports({"step": step})
    counts = torch.zeros(world)
    counts[rank] = made
    torch.distributed.all_reduce(counts)
    with tempfile.TemporaryDirectory() as d:  # a run's metrics come back with its last checkpoint
        trainer.report_directory({"made": counts.tolist()}, d if rank == 0 else None)


def test_metrics_reports_are_spaced_by_rank_0s_clock_on_every_rank(ray_session, tmp_path):
    """A loop that offers a report every step reports at most once per interval of rank 0's
    clock, and every rank reports at the same steps (a report is a barrier: a rank reporting
    alone would hang the run), even where another rank's clock says otherwise."""
    import sys

    import ray

    from pipelines import trainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers import no test module
    steps, gap_s, every_s = 30, 0.05, 0.5
    results: list = []
    run = threading.Thread(target=lambda: results.append(trainer.run_trainer(
        _often_reporting_loop, {"steps": steps, "gap_s": gap_s, "every_s": [every_s, 0.0]}, workers=2,
        storage_path=str(tmp_path), name="reports", max_failures=0)), daemon=True)
    run.start()
    run.join(timeout=180)
    assert results, "the run did not end: ranks that report at different steps wait for each other for ever"
    made = results[0].metrics["made"]
    assert made[0] == made[1], made
    # 30 steps of >= 50 ms: at least 1.5 s, so at least 2 intervals of 0.5 s passed; far from one a step
    assert 2 <= made[0] < steps // 2, made


def _processes_under_this_one() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_the_latents_read_boots_no_worker_per_file(ray_session, latents, tmp_path):
    """The latents read asks for no CPU, so nothing but its concurrency cap (one task per CPU, or
    two per training worker: here 2) bounds how many read tasks run at once. Uncapped (a plain
    0-CPU read_parquet), Ray Data starts them all at once and Ray boots a worker process for
    each; capped, the read runs on the worker processes there are. (Ray Data reads about a block
    per MiB: the blocks' floor is lowered here so that 48 small rows make 48 read tasks, as 50 MB
    of latents would.)"""
    from ray.data import DataContext

    from pipelines.train.driver import read_latents_dataset

    data, _ = latents
    many = tmp_path / "latents"
    many.mkdir()
    table = pq.read_table(os.path.join(data, "latents"))
    for i in range(0, table.num_rows, 2):  # 24 files of 2 rows
        pq.write_table(table.slice(i, 2), many / f"part-{i:03d}.parquet")
    ray_session.data.range(4).materialize()  # Ray Data's own actors exist before counting
    ctx = DataContext.get_current()
    floor, v2 = ctx.target_min_block_size, ctx.use_datasource_v2
    ctx.target_min_block_size = 1024

    def new_processes(read):
        before, seen, done = _processes_under_this_one(), set(), threading.Event()

        def watch():
            while not done.is_set():
                seen.update(_processes_under_this_one())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            ds = read().materialize()
        finally:
            done.set()
            watcher.join()
        assert ds.count() == table.num_rows
        return len(seen - before)

    try:
        capped = new_processes(lambda: read_latents_dataset(str(many), None, small_config(workers=1)))
        ctx.use_datasource_v2 = False  # the reader read_latents_dataset uses
        uncapped = new_processes(lambda: ray_session.data.read_parquet(str(many), num_cpus=0))
    finally:
        ctx.target_min_block_size, ctx.use_datasource_v2 = floor, v2
    print(f"processes booted by the read: {capped} capped, {uncapped} uncapped")
    assert capped <= 2, f"a read of 2 tasks at once (2 CPUs) booted {capped} processes"
    assert uncapped > capped + 4  # what the cap prevents (and what this test can see)


def test_samples_mb_is_what_the_latents_take_as_samples_or_a_little_more(latents):
    """The estimate that decides whether workers keep their samples (keep_samples_mb) never
    falls short of the Samples themselves: every text is counted at the longest one's length."""
    from pipelines.latents import read_latents
    from pipelines.train import inspect_latents, sample_from_row
    from pipelines.train.data import samples_mb

    data, _ = latents
    samples = [sample_from_row(row) for row in read_latents(data).to_pylist()]
    actual = sum(s.tokens.nbytes + s.positions.nbytes + s.text.nbytes for s in samples) / 1e6
    assert actual <= samples_mb(inspect_latents(data)) < 2 * actual
    with pytest.raises(ValueError, match="keep_samples_mb must be >= 0"):
        TrainConfig(keep_samples_mb=-1)


def test_a_resumed_epoch_trains_on_the_rows_past_its_skip_and_keeps_the_whole_shard(latents):
    from pipelines.latents import read_latents
    from pipelines.train import iter_packs

    class Shard:  # a worker's shard as Ray Train hands it over, in order (no shuffle buffer)
        def __init__(self, table):
            self.table = table

        def iter_batches(self, batch_size, **_):
            for i in range(0, len(self.table), batch_size):
                yield self.table.slice(i, batch_size)

    table = read_latents(latents[0])
    ids = table.column("clip_id").to_pylist()
    cfg = small_config(tokens_per_step=4096, shuffle_buffer_rows=0)
    trained = lambda packs: sorted(s.metadata["clip_id"] for p in packs for s in p)  # noqa: E731
    kept: list = []
    assert trained(iter_packs(Shard(table), cfg, 0, 0, skip_rows=5, keep=kept)) == sorted(ids[5:])
    assert [s.metadata["clip_id"] for s in kept] == ids
    assert trained(iter_packs(Shard(table), cfg, 0, 0, skip_rows=5)) == sorted(ids[5:])


def test_cached_epochs_reshuffle_deterministically_and_resume_inside_an_epoch():
    from pipelines.train import iter_cached_packs
    from sora.packing import Sample
    from sora.patches import position_ids

    cached = [Sample(tokens=torch.full((4, 2), float(i)), positions=position_ids((1, 2, 2)), grid=(1, 2, 2))
              for i in range(10)]
    cfg = TrainConfig(tokens_per_step=8, seed=3)

    def order(epoch, rank=0, skip=0):
        packs = list(iter_cached_packs(cached, cfg, epoch, rank, skip_rows=skip))
        assert all(sum(s.num_tokens for s in p) <= 8 for p in packs)
        return [int(s.tokens[0, 0]) for p in packs for s in p]

    first = order(0)
    assert sorted(first) == list(range(10))  # every sample once per epoch
    assert order(0) == first and order(1) != first and order(0, rank=1) != first
    assert order(0, skip=4) == first[4:]  # a resumed epoch continues where it stopped


def fixed_flow_loss(model, data: str, seeds=(0, 1, 2, 3)) -> float:
    """Flow-matching loss of `model` on every latents row, with the noise and timesteps fixed
    by `seeds` and no text dropout: the same number for the same weights, unlike the per-step
    training loss (one small pack, a random t), which is far too noisy to compare two points."""
    from pipelines.storage import read_table
    from pipelines.train import sample_from_row
    from sora.flow import FlowConfig, flow_matching_loss
    from sora.packing import pack

    batch = pack([sample_from_row(r) for r in read_table(os.path.join(data, "latents")).to_pylist()])
    with torch.no_grad():
        losses = [flow_matching_loss(model, batch, FlowConfig(p_uncond=0.0), torch.Generator().manual_seed(s))[0].item()
                  for s in seeds]
    return float(np.mean(losses))


@pytest.fixture
def one_thread():
    with torch_threads(1):  # bit-for-bit comparisons: the same thread count for both computations
        yield


def test_muon_optimizer_splits_the_weights_learns_and_resumes_exactly(latents, tmp_path, one_thread):
    """optimizer="muon": Muon on the blocks' 2-D matrices, AdamW on the rest (each weight in
    exactly one), each group at its own learning rate; in-process steps on the real latents
    cut the fixed-noise loss; a checkpoint written mid-run and loaded into a fresh model gives
    bit-identical next steps (Muon's momentum and AdamW's moments both restored)."""
    import contextlib

    from pipelines.storage import read_table
    from pipelines.train import EMA, load_checkpoint, make_optimizer, sample_from_row, save_checkpoint, train_step
    from sora.dit import DiT, DiTConfig
    from sora.optim import Muon

    data, _ = latents
    samples = [sample_from_row(r) for r in read_table(os.path.join(data, "latents")).to_pylist()]
    first = samples[0]
    dit_config = DiTConfig.preset("tiny", in_channels=8, patch_size=(1, 2, 2), text_dim=first.text.shape[-1])
    cfg = TrainConfig(optimizer="muon", lr=2e-3, muon_lr=4e-3, warmup_steps=0, max_steps=100, seed=0)
    packs = [samples[i:i + 12] for i in range(0, 48, 12)]

    def fresh():
        torch.manual_seed(0)
        model = DiT(dit_config)
        return model, make_optimizer(model, cfg), EMA(model, 0.99)

    def run(model, opt, steps):
        for step in steps:
            out = train_step(model, packs[step % len(packs)], step, opt, cfg, cfg.flow(), dit_config,
                             torch.device("cpu"), 0, 1, contextlib.nullcontext())
            assert out["skipped"] == 0.0

    model, opt, ema = fresh()
    muon, adamw = opt
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    in_adamw = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # every weight, exactly once
    assert in_muon and all(n.startswith("blocks.") and model.get_parameter(n).dim() == 2 for n in in_muon)
    assert "x_embedder.weight" in in_adamw and "final_layer.linear.weight" in in_adamw
    assert any(n.startswith("blocks.") and n.endswith("bias") for n in in_adamw)

    before = fixed_flow_loss(model, data)
    run(model, opt, range(1, 31))
    assert [g["lr"] for g in muon.param_groups] == [4e-3] and {g["lr"] for g in adamw.param_groups} == {2e-3}
    after = fixed_flow_loss(model, data)
    print(f"\nmuon, 30 in-process steps: fixed-noise loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for _ in range(3):
        ema.update(model)
    save_checkpoint(str(ckpt), model, opt, ema, {"step": 30, "optimizer": "muon"})
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata  # the sharded (DCP) checkpoint's index
    kinds = {k.rsplit(".", 1)[-1] for k in saved if k.startswith("optim.state.")}
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"} <= kinds, kinds
    assert {k for k in saved if k.startswith("extra.")} == {f"extra.{n}" for n, _ in model.named_parameters()}
    run(model, opt, range(31, 34))
    resumed, opt2, ema2 = fresh()
    state = load_checkpoint(str(ckpt), resumed, opt2, ema2)
    assert state["step"] == 30 and ema2.updates == 3
    run(resumed, opt2, range(31, 34))
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{n} differs after resuming"
    ema.update(model)
    ema2.update(resumed)
    assert all(torch.equal(ema.shadow[k], ema2.shadow[k]) for k in ema.shadow)  # the EMA came back too
    with pytest.raises(ValueError, match="fsdp=False"):
        make_optimizer(model, cfg, sharded=True)
    plain = DiT(dit_config)
    with pytest.raises(ValueError, match="optimizer='muon'"):  # resuming with another optimizer: a clear error
        load_checkpoint(str(ckpt), plain, make_optimizer(plain, TrainConfig(lr=2e-3)), EMA(plain, 0.99))
    with pytest.raises(ValueError, match="adamw or muon"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="fsdp=False"):
        TrainConfig(optimizer="muon", use_gpu=True, workers=2)
    assert TrainConfig(optimizer="muon", use_gpu=True, workers=2, fsdp=False).optimizer == "muon"


def test_loss_falls(runs, latents):
    """The exported model (48 steps) against the same architecture at its initialisation,
    on the same fixed noise: training must have cut the loss by a clear margin."""
    from sora.dit import DiT

    trained = DiT.from_pretrained(os.path.join(runs["root"], "out3", "dit")).eval()
    torch.manual_seed(0)
    initial = DiT(trained.config).eval()
    before, after = fixed_flow_loss(initial, latents[0]), fixed_flow_loss(trained, latents[0])
    print(f"\nflow loss on all 48 clips, 4 fixed noise draws: initial {before:.4f}, trained {after:.4f}")
    assert after < 0.8 * before, f"loss did not fall: {before:.4f} -> {after:.4f}"


def test_rerun_continues_from_the_last_step_on_any_number_of_workers(runs, latents):
    """A checkpoint written by 2 workers resumes on 1 (run 2) and a 1-worker one on 2 (run 3):
    one history over the three runs and the restart, every step exactly once, in order, and the
    resumed runs carry on from where the weights were (the loss curve continues)."""
    from sora.dit import DiT

    first, second, third = runs["first"], runs["second"], runs["third"]
    assert first["steps"] == 12 and first["resumed_from"] == []
    assert second["steps"] == 24 and second["resumed_from"] == [12], second["resumed_from"]
    assert third["steps"] == 48 and third["resumed_from"][:2] == [12, 24], third["resumed_from"]
    assert [s for s, _ in third["history"]] == list(range(1, 49))
    np.testing.assert_array_equal(np.array(second["history"][:12]), np.array(first["history"]))  # NaN == NaN here
    np.testing.assert_array_equal(np.array(third["history"][:24]), np.array(second["history"]))
    # the models the runs exported (their checkpoints' EMA) get better run after run on the same fixed noise:
    # a resume that lost the weights would start again from the initial loss
    exported = [fixed_flow_loss(DiT.from_pretrained(os.path.join(runs["root"], out, "dit")).eval(), latents[0])
                for out in ("out1", "out2", "out3")]
    print(f"\nfixed-noise loss of the exported EMA after 12 / 24 / 48 steps: {exported}")
    assert exported[0] > exported[1] > exported[2], exported


def test_killed_worker_is_replaced_and_resumes_from_the_last_checkpoint(runs):
    resumed = runs["third"]["resumed_from"]
    assert len(resumed) == 3, f"expected two re-runs and one restart, got resumes at {resumed}"
    assert runs["killed_after"] <= resumed[2] < 48, (runs["killed_after"], resumed)
    assert resumed[2] % 6 == 0  # a checkpoint step (every 6), never 0


def test_nonfinite_loss_is_skipped_and_counted(runs):
    first, second, third = runs["first"], runs["second"], runs["third"]
    assert first["nonfinite"] == second["nonfinite"] == third["nonfinite"] == 1
    assert first["history"][6][0] == 7 and np.isnan(first["history"][6][1])
    # no optimizer update on the skipped step: AdamW's own step counter is steps - 1
    assert first["adam_steps"] == {11.0}


def test_output_dir_is_a_complete_model(runs):
    from pipelines.train import load_ema
    from sora.dit import DiT
    from sora.model_dir import read_index
    from sora.vae import load_vae

    out = os.path.join(runs["root"], "out3")
    index = read_index(out)
    assert index["text_encoder"]["path"] is None  # "minilm" -> the offline default
    assert index["training"]["steps"] == 48 and np.isfinite(index["training"]["final_loss"])
    assert (index["training"]["optimizer"], index["training"]["lr"]) == ("adamw", 2e-3)
    assert index["patch_size"] == [1, 2, 2] and index["dit"] == "dit" and index["vae"] == "vae"
    assert load_vae(os.path.join(out, index["vae"])).latent_channels == 8
    assert sorted(os.listdir(os.path.join(out, "dit"))) == ["config.json", "model.safetensors"]
    dit = DiT.from_pretrained(os.path.join(out, "dit")).eval()
    ema, _ = load_ema(runs["third"]["checkpoint"])  # the sharded checkpoint's EMA, consolidated here
    g = torch.Generator().manual_seed(0)
    N, L = 24, 5
    args = (torch.randn(N, dit.config.in_dim, generator=g), torch.randint(0, 4, (N, 3)), torch.rand(N, generator=g),
            torch.zeros(N, dtype=torch.long), torch.randn(1, L, dit.config.text_dim, generator=g),
            torch.ones(1, L, dtype=torch.bool))
    with torch.no_grad():
        a, b = dit(*args), ema.eval()(*args)
    assert torch.equal(a, b)
    assert a.abs().mean() > 1e-3  # trained: no longer the adaLN-Zero all-zero output
    files = os.listdir(runs["third"]["checkpoint"])  # every rank wrote its own shards, no gathered copy
    assert {".metadata", "state.json", "__0_0.distcp", "__1_0.distcp"} <= set(files), files
    assert not any(f.endswith((".safetensors", ".pt")) for f in files), files


def test_cli_train_without_latents_is_a_clear_error(tmp_path, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tmp_path / "nothing"), "--vae", str(tmp_path), "--out", str(tmp_path / "m")])
    assert "holds no rows" in str(exc.value) and "sora encode" in str(exc.value)


def test_cli_train_with_a_bad_learning_rate_is_a_clear_error(tmp_path):
    from flows.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tmp_path), "--vae", str(tmp_path), "--out", str(tmp_path / "m"),
              "--optimizer", "muon", "--muon-lr", "-1"])
    assert str(exc.value).startswith("sora train: learning rates must be > 0") and "muon_lr=-1.0" in str(exc.value)
    assert not (tmp_path / "m").exists()  # nothing started, nothing written


def test_cli_train_passes_its_options_to_the_trainer(monkeypatch, tmp_path):
    import pipelines.train
    from flows.cli import main

    seen = {}
    monkeypatch.setattr(pipelines.train, "run_training", lambda data, out, vae, cfg, **kw: seen.update(cfg=cfg) or {})
    main(["train", "--data", str(tmp_path), "--vae", str(tmp_path), "--out", str(tmp_path / "m"), "--ema-decay", "0.995",
          "--tokens-per-step", "1024", "--lr", "5e-4", "--max-minutes", "3"])
    cfg = seen["cfg"]
    assert (cfg.ema_decay, cfg.tokens_per_step, cfg.lr, cfg.max_minutes, cfg.max_steps) == (0.995, 1024, 5e-4, 3.0, None)
    assert (cfg.optimizer, cfg.muon_lr, cfg.fsdp) == ("adamw", None, True)
    main(["train", "--data", str(tmp_path), "--vae", str(tmp_path), "--out", str(tmp_path / "m"), "--gpu",
          "--workers", "4", "--optimizer", "muon", "--muon-lr", "4e-3"])
    cfg = seen["cfg"]
    assert (cfg.optimizer, cfg.muon_lr, cfg.fsdp, cfg.use_gpu, cfg.workers) == ("muon", 4e-3, False, True, 4)
    assert cfg.schedule == "constant"
    main(["train", "--data", str(tmp_path), "--vae", str(tmp_path), "--out", str(tmp_path / "m"), "--max-minutes", "20",
          "--schedule", "cooldown", "--cooldown-fraction", "0.3", "--min-lr-ratio", "0"])
    cfg = seen["cfg"]
    assert (cfg.schedule, cfg.cooldown_fraction, cfg.min_lr_ratio, cfg.max_steps) == ("cooldown", 0.3, 0.0, None)


MUON_MATRICES = [(12, 8), (8, 8), (24, 8), (8, 24), (5, 3)]
MUON_KERNELS = [(6, 4, 3, 3, 3), (8, 6, 1, 3, 3)]


def _muon_run(make_optimizers) -> list[torch.Tensor]:
    """The same weights and gradients (as after DDP's all-reduce) stepped 3 times by
    ``make_optimizers(matrices, kernels)``; returns the start and the end of every weight."""
    torch.manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(*s)) for s in MUON_MATRICES]
    kernels = [torch.nn.Parameter(torch.randn(*s)) for s in MUON_KERNELS]
    start = [p.detach().clone() for p in mats + kernels]
    opts = make_optimizers(mats, kernels)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p in mats + kernels:
            p.grad = torch.randn(p.shape, generator=g)
        for o in opts:
            o.step()
    return start + [p.detach() for p in mats + kernels]


def _split_muon_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of test_split_muon_equals_plain_muon: rank-split Muon (bfloat16 Newton-Schulz on
    the matrices, float32 on the kernels, as for the DiT and the VAE); rank 0 saves the result."""
    import datetime

    from sora.optim import Muon

    torch.set_num_threads(1)  # the same thread count as the reference side (the bits depend on it)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(minutes=2))
    out = _muon_run(lambda mats, kernels: [
        Muon(mats, lr=0.01, weight_decay=0.01, ns_dtype=torch.bfloat16, across_ranks=True),
        Muon(kernels, lr=0.01, weight_decay=0.01, ns_dtype=torch.float32, across_ranks=True)])
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "split.pt"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_split_muon_equals_plain_muon(tmp_path):
    """Muon's Newton-Schulz work split over 2 data-parallel ranks (each matrix on one rank, one
    all-reduce) gives exactly the parameters of the unsplit optimizers: torch.optim.Muon (the
    reference implementation) on the matrices, our Muon in float32 on the conv kernels. Both
    sides run with 1 torch thread, whatever OMP_NUM_THREADS says."""
    import torch.multiprocessing as mp

    from sora.optim import Muon

    mp.spawn(_split_muon_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    with torch_threads(1):
        plain = _muon_run(lambda mats, kernels: [
            torch.optim.Muon(mats, lr=0.01, weight_decay=0.01, adjust_lr_fn="match_rms_adamw"),
            Muon(kernels, lr=0.01, weight_decay=0.01, ns_dtype=torch.float32)])
    split = torch.load(tmp_path / "split.pt", weights_only=True)
    n = len(MUON_MATRICES) + len(MUON_KERNELS)
    for start, a, b in zip(plain[:n], plain[n:], split[n:]):
        assert not torch.equal(a, start)  # the optimizers did move every parameter
        assert torch.equal(a, b)
