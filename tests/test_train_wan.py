"""Fine-tuning a diffusers Wan directory with `sora train --init DIR` on Ray Train, for real.

A tiny random Wan 2.1 T2V-style directory (tests/wan_tiny.py) and shapes-world latents encoded
with its own VAE and UMT5 (tests/wan_latents.py). Three Ray Train runs in all: a LoRA run from
the CLI on 2 workers (gloo DDP), the same run resumed on 1 worker, and a 1-worker full fine-tune.
Comparisons with diffusers run float32 with one torch thread on both sides.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.train import TrainConfig, batch_by_grid, build_model, inspect_latents, plan_model, run_training, train_step
from sora.flow import CONDITIONING_MODES, sample_logit_normal, shift_timesteps
from sora.packing import Sample
from sora.patches import patchify, position_ids, unpatchify
from sora.wan import TEXT_LEN
from wan_latents import build_wan_latents
from threads import torch_threads
from wan_tiny import sora_generate


@pytest.fixture(scope="module")
def data(wan_dirs, tmp_path_factory):
    """24 shapes-world clips (4 token grids of 12-18 tokens) encoded for the t2v directory."""
    return build_wan_latents(wan_dirs["t2v"], str(tmp_path_factory.mktemp("wan-data") / "ds"), 24, seed=0)


def lora_args(data: str, base: str, out: str, **extra) -> list[str]:
    args = {"--data": data, "--init": base, "--out": out, "--lora-rank": "8", "--lora-alpha": "16",
            "--workers": "2", "--cpus-per-worker": "0.5", "--max-steps": "12", "--tokens-per-step": "48",
            "--lr": "3e-3", "--warmup-steps": "2", "--checkpoint-every": "6", "--checkpoint-every-minutes": "none",
            "--ema-decay": "0.9", "--log-every-steps": "6", "--shuffle-buffer-rows": "8", **extra}
    return ["train", *[x for kv in args.items() for x in kv], "--cache-data"]


@pytest.fixture(scope="module")
def lora_runs(ray_session, wan_dirs, data, tmp_path_factory):
    """Run 1: `sora train --init DIR --lora-rank 8` (2 workers, 12 steps). Run 2: the same run
    name resumed on 1 worker to step 18 (from Python, to get the loss history back)."""
    from flows.cli import main

    root = tmp_path_factory.mktemp("wan-runs")
    out, store = str(root / "lora"), str(root / "store")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(lora_args(data, wan_dirs["t2v"], out, **{"--storage": store})) == 0
    first = json.loads(printed.getvalue().strip().splitlines()[-1])
    with open(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"), "rb") as f:
        first["adapter_bytes"] = f.read()
    cfg = TrainConfig(init=wan_dirs["t2v"], lora_rank=8, lora_alpha=16, workers=1, cpus_per_worker=1.0, max_steps=18,
                      tokens_per_step=48, lr=3e-3, warmup_steps=2, checkpoint_every_steps=6,
                      checkpoint_every_minutes=None, ema_decay=0.9, log_every_steps=6, shuffle_buffer_rows=8,
                      cache_data=True)
    second = run_training(data, out, None, cfg, storage_path=store)
    return {"first": first, "second": second, "out": out, "store": store}


@pytest.fixture(scope="module")
def full_run(ray_session, wan_dirs, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("wan-full") / "model")
    cfg = TrainConfig(init=wan_dirs["t2v"], workers=1, cpus_per_worker=1.0, max_steps=3, tokens_per_step=48, lr=1e-3,
                      warmup_steps=0, checkpoint_every_steps=3, checkpoint_every_minutes=None, ema_decay=0.5,
                      cache_data=True)
    return run_training(data, out, None, cfg)


def _diffusers_text(pipe, prompts):
    with torch.no_grad():
        states, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN)
    return states


# ----------------------------------------------------------------------------------------
# One trainer step against a direct diffusers computation (no Ray)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour,lora,cond,seed", [("t2v", True, "none", 1), ("ti2v", False, "first", 3)])
def test_train_step_loss_equals_direct_diffusers_computation(wan_dirs, data, flavour, lora, cond, seed):
    """`train_step` on the model the workers build (`build_model`) vs the loss written with
    diffusers' transformer: the same timesteps, noise, clean first frame and dropped prompt,
    drawn from the step's seed in flow_matching_loss's order. Then only what trains has moved."""
    from diffusers import WanPipeline

    from sora.wan import load_text_encoder
    from sora.wan_train import empty_prompt_states

    base = wan_dirs[flavour]
    pipe = WanPipeline.from_pretrained(base, local_files_only=True)
    cfg = TrainConfig(init=base, lora_rank=8 if lora else None, seed=seed, p_uncond=0.5, lr=1e-2, warmup_steps=0,
                      cond_mode_probs={cond: 1.0} if cond != "none" else None)
    if flavour == "t2v":  # the driver's own checks and defaults on the latents written for this model
        plan = plan_model(data, inspect_latents(data), cfg, None)
        cfg, loop = plan.cfg, {"wan": plan.loop_config()["wan"]}
        assert (cfg.cond_mode_probs, cfg.base_shift, cfg.base_tokens) == ({"none": 1.0}, 3.0, 0)
        assert torch.equal(plan.null_text, empty_prompt_states(base))  # DATA/null_text, as sora encode stores it
    else:
        cfg = cfg.for_model(CONDITIONING_MODES, shift=3.0)
        loop = {"wan": {"init": base, "lora": None, "null_text": empty_prompt_states(base)}}
    C, grid, N = pipe.transformer.config.in_channels, (3, 2, 2), 12
    x0 = torch.randn(2, C, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    prompts = ["a red circle moves left", "a green triangle moves down"]
    text, mask = load_text_encoder(base).encode(prompts)
    samples = [Sample(tokens=patchify(x0[b], (1, 2, 2)), positions=position_ids(grid), grid=grid,
                      text=text[b][mask[b]], text_mask=torch.ones(int(mask[b].sum()), dtype=torch.bool))
               for b in range(2)]
    with torch_threads(1):
        core, model, optimizer, flops = build_model(loop, cfg, torch.device("cpu"), 1)
        before = {n: p.detach().clone() for n, p in core.named_parameters()}
        out = train_step(model, samples, 1, optimizer, cfg, cfg.flow(), flops, torch.device("cpu"), 0, 1,
                         contextlib.nullcontext())

        g = torch.Generator().manual_seed(seed * 1_000_003 + 1 * 4099 + 0)  # train_step's seed for step 1, rank 0
        t = shift_timesteps(sample_logit_normal(2, 0.0, 1.0, g), torch.tensor([3.0, 3.0]))  # (B,)
        for _ in range(2):
            torch.multinomial(torch.tensor([1.0], dtype=torch.float64), 1, generator=g)  # one mode draw per video
        noise = torch.randn((2 * N, C * 4), generator=g)  # (B*N, D_in)
        kept = torch.rand(2, generator=g) >= 0.5
        assert kept.tolist() == [True, False], "this seed keeps one prompt and drops the other"
        eps = torch.stack([unpatchify(noise[b * N:(b + 1) * N], grid, (1, 2, 2), C) for b in range(2)])
        tt = t[:, None, None, None, None].expand_as(x0).clone()  # (B, C, T, h, w)
        if cond == "first":
            tt[:, :, 0] = 0.0  # the first latent frame clean
        x_t = (1 - tt) * x0 + tt * eps
        timestep = t * 1000 if flavour == "t2v" else tt[:, 0, :, ::2, ::2].reshape(2, N) * 1000
        states = _diffusers_text(pipe, [prompts[0], ""])  # the dropped prompt is Wan's empty one
        with torch.no_grad():
            pred = pipe.transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=states,
                                    return_dict=False)[0]
        err = (pred - (eps - x0)) ** 2
        direct = (err[:, :, 1:] if cond == "first" else err).mean().item()
    assert abs(out["loss"] - direct) <= 1e-5 * max(1.0, direct), (out["loss"], direct)
    assert out["skipped"] == 0.0 and out["tokens"] == 24 and out["flops"] > 0

    moved = {n for n, p in core.named_parameters() if not torch.equal(p.detach(), before[n])}
    if lora:  # only the adapter's B matrices move at the first step (A's gradient is 0 while B is 0)
        assert moved and all(".lora_B." in n for n in moved), sorted(moved)[:4]
        assert sum(p.numel() for p in core.parameters() if p.requires_grad) == 2 * 2 * 4 * 8 * (24 + 24)
    else:
        assert "transformer.proj_out.weight" in moved and len(moved) > 0.9 * len(before)


def test_activation_checkpointing_gives_the_same_lora_step(wan_dirs, data):
    """What `parallelize` switches on for GPU runs (``gradient_checkpointing``: diffusers'
    non-reentrant per-block recompute) still reaches the adapter inside the frozen blocks: the
    same loss and the same updated adapter as without it."""
    plan = plan_model(data, inspect_latents(data), TrainConfig(init=wan_dirs["t2v"], lora_rank=4, lr=1e-2,
                                                               warmup_steps=0, p_uncond=0.0), None)
    from pipelines.storage import read_table
    from pipelines.train import sample_from_row

    rows = read_table(os.path.join(data, "latents")).to_pylist()
    samples = [sample_from_row(r) for r in rows if (r["grid_t"], r["grid_h"], r["grid_w"]) == (3, 2, 2)][:3]
    results = []
    with torch_threads(1):
        for checkpointing in (False, True):
            core, model, optimizer, flops = build_model(plan.loop_config(), plan.cfg, torch.device("cpu"), 1)
            core.gradient_checkpointing = checkpointing
            start = {n: p.detach().clone() for n, p in core.named_parameters() if ".lora_A." in n}
            outs = [train_step(model, samples, step, optimizer, plan.cfg, plan.cfg.flow(), flops, torch.device("cpu"),
                               0, 1, contextlib.nullcontext())["loss"] for step in (1, 2)]
            results.append((outs, {n: p.detach().clone() for n, p in core.named_parameters() if p.requires_grad}))
    (plain, a), (ckpt, b) = results
    assert plain == pytest.approx(ckpt, rel=1e-6)
    assert all(torch.allclose(a[n], b[n], atol=1e-7) for n in a)
    assert all(not torch.equal(a[n], start[n]) for n in start)  # A learns from step 2 on, through the recompute


# ----------------------------------------------------------------------------------------
# The LoRA runs
# ----------------------------------------------------------------------------------------


def test_lora_adapter_from_sora_train_loads_into_wan_pipeline_and_matches(lora_runs, wan_dirs):
    """The output of `sora train --init DIR --lora-rank 8`: our pipeline loading the output
    directory (the base plus its adapter) and diffusers' WanPipeline with load_lora_weights of the
    adapter give the same video (same prompts, seed, steps, Euler); and the sora-layer sampling
    with the adapter loaded too. The adapter changes the video against the base."""
    from diffusers import WanPipeline

    from sora.pipeline import SoraPipeline
    from sora.wan import load_wan
    from sora.wan_lora import load_lora

    adapter = os.path.join(lora_runs["out"], "lora")
    prompts = ["a red circle moves left", "a large blue square moves up across a gray background"]
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731  one generator for the batch, both sides
    call = dict(height=32, width=32, num_frames=9, num_inference_steps=4, guidance_scale=3.0)
    seen = {}

    def keep_latents(p, i, t, kw):
        seen["latents"] = kw["latents"]
        return kw

    with torch_threads(1):
        ours = SoraPipeline.from_pretrained(lora_runs["out"])(prompts, generator=gen(), **call)
        model = load_wan(wan_dirs["t2v"])
        load_lora(model.denoiser, adapter)
        layer, _ = sora_generate(model, prompts, call["height"], call["width"], call["num_frames"],
                                 call["num_inference_steps"], call["guidance_scale"],
                                 [torch.Generator().manual_seed(s) for s in (11, 12)])
        pipe = WanPipeline.from_pretrained(wan_dirs["t2v"], local_files_only=True)
        base = pipe(prompts, generator=gen(), output_type="np", **call).frames
        pipe.load_lora_weights(adapter)
        ref = pipe(prompts, generator=gen(), output_type="np", **call).frames
        pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in (11, 12)], output_type="np",
             callback_on_step_end=keep_latents, **call)  # per-video generators, as sora_generate draws
    assert ours.latents.shape == (2, 16, 3, 4, 4)
    got = np.stack(ours.frames).astype(np.float64) / 255.0  # (B, T, H, W, 3) uint8 -> [0, 1]
    assert got.shape == ref.shape == (2, 9, 32, 32, 3)
    assert np.abs(got - ref).max() <= 0.5 / 255 + 1e-4  # our frames are WanPipeline's video in 8 bits
    assert (layer - seen["latents"]).abs().max().item() <= 1e-4  # sora-layer sampling, per-video generators
    change = np.abs(ref - base).max()
    print(f"\nLoRA adapter after 18 steps: max video change against the base {change:.4f}")
    assert change > 1e-3


def test_lora_checkpoints_hold_only_the_adapter_and_resume(lora_runs):
    from torch.distributed.checkpoint import FileSystemReader

    first, second = lora_runs["first"], lora_runs["second"]
    assert first["steps"] == 12 and first["model"] == "wan-lora" and first["resumed_from"] == []
    assert second["steps"] == 18 and second["resumed_from"] == [12]
    assert [s for s, _ in second["history"]] == list(range(1, 19)) and all(np.isfinite(l) for _, l in second["history"])
    keys = FileSystemReader(second["checkpoint"]).read_metadata().state_dict_metadata
    model_keys = {k for k in keys if k.startswith("model.")}
    assert len(model_keys) == 32 and all(".lora_" in k for k in model_keys), sorted(model_keys)[:3]
    assert {k for k in keys if k.startswith("extra.")} == {"extra." + k[len("model."):] for k in model_keys}
    optim = {k for k in keys if k.startswith("optim.state.")}
    assert optim and all(".lora_" in k for k in optim)  # AdamW's moments of the adapter only
    with open(os.path.join(lora_runs["out"], "lora", "pytorch_lora_weights.safetensors"), "rb") as f:
        assert f.read() != first["adapter_bytes"]  # the resumed run exported its own adapter


def test_a_run_resumes_only_the_model_it_trains(lora_runs, wan_dirs, data, tmp_path, no_ray_work):
    """The run directory remembers its model: the same run name with other LoRA settings, full
    fine-tuning or our DiT is refused before any worker starts (a worker would fail to load)."""
    store, out = lora_runs["store"], str(tmp_path / "out")
    with open(os.path.join(store, "wan-lora", "sora_model.json")) as f:
        assert json.load(f) == {"kind": "wan-lora", "init": os.path.abspath(wan_dirs["t2v"]),
                                "lora": {"rank": 8, "alpha": 16.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}}
    for cfg in (TrainConfig(init=wan_dirs["t2v"], lora_rank=4), TrainConfig(init=wan_dirs["t2v"])):
        with pytest.raises(ValueError, match="resume it with the same --init and LoRA settings"):
            run_training(data, out, None, cfg, storage_path=store, name="wan-lora")
    assert not os.path.exists(out)


def test_sora_eval_runs_on_the_lora_output(lora_runs, tmp_path):
    from flows.cli import main

    report_path = tmp_path / "eval.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["eval", "--model", lora_runs["out"], "--held-out", "2", "--steps", "1",
                     "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["n"] == 2 and report["size_correct"] == 1.0 and report["frames_correct"] == 1.0
    assert 0.0 <= report["accuracy"]["all"] <= 1.0


def test_lora_output_dir_references_the_base(lora_runs, wan_dirs):
    from safetensors import safe_open

    from sora.model_dir import component_path, read_index

    out = lora_runs["out"]
    assert sorted(os.listdir(out)) == ["lora", "model_index.json"]  # nothing of the base copied (--storage elsewhere)
    base = os.path.abspath(wan_dirs["t2v"])
    with open(os.path.join(out, "model_index.json")) as f:
        written = json.load(f)
    assert set(written) == {"format", "wan", "lora", "defaults", "training"}
    assert (written["wan"], written["lora"]) == ({"base": base}, {"path": "lora", "scale": 1.0})
    index = read_index(out)  # the base's index with ours on top
    assert index["wan"]["base"] == base and index["wan"]["expand_timesteps"] is False
    assert component_path(out, index["lora"]["path"]) == os.path.join(out, "lora")
    assert (index["dit"], index["vae"]) == (os.path.join(base, "transformer"), os.path.join(base, "vae"))
    assert index["text_encoder"] == {"path": os.path.join(base, "text_encoder"), "max_length": TEXT_LEN}
    assert index["flow"]["scheduler"]["shift"] == 3.0
    # generation defaults: the training data's most common size, length and fps (a tie: the smaller; the data
    # holds 9- and 5-frame clips alike, SHAPES in tests/wan_latents.py); the base's steps and guidance
    assert (index["defaults"]["width"], index["defaults"]["num_frames"], index["defaults"]["num_inference_steps"]) \
        == (32, 5, 50)
    training = index["training"]
    assert (training["steps"], training["lora_rank"], training["lora_alpha"]) == (18, 8, 16.0)
    assert training["cond_mode_probs"] == {"none": 1.0} and np.isfinite(training["final_loss"])
    with safe_open(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (8, 16.0)  # the LoraConfig, per component
        assert all(k.startswith("transformer.blocks.") and ".lora_" in k for k in f.keys())


def test_lora_fine_tune_lowers_the_loss_against_the_base(lora_runs, wan_dirs, data):
    """The exported adapter on the training latents with fixed noise and timesteps (no prompt
    dropout): lower flow-matching loss than the base model."""
    from pipelines.storage import read_table
    from pipelines.train import sample_from_row
    from sora.flow import FlowConfig, flow_matching_loss
    from sora.packing import pack
    from sora.wan_lora import load_lora
    from sora.wan_train import empty_prompt_states, load_denoiser

    samples = [sample_from_row(r) for r in read_table(os.path.join(data, "latents")).to_pylist()]
    batches = [pack([s for s in samples if s.grid == g]) for g in sorted({s.grid for s in samples})]

    def loss(den) -> float:
        with torch.no_grad():
            return float(np.mean([flow_matching_loss(den, b, FlowConfig(shift=3.0, p_uncond=0.0),
                                                     torch.Generator().manual_seed(s))[0].item()
                                  for b in batches for s in range(3)]))

    null = empty_prompt_states(wan_dirs["t2v"])
    den = load_denoiser(wan_dirs["t2v"], null_text=null).eval()
    before = loss(den)
    load_lora(den, os.path.join(lora_runs["out"], "lora"))
    after = loss(den)
    print(f"\nfixed-noise loss on the training latents: base {before:.4f}, LoRA (18 steps) {after:.4f}")
    assert after < 0.97 * before, (before, after)


# ----------------------------------------------------------------------------------------
# Full fine-tuning
# ----------------------------------------------------------------------------------------


def test_full_fine_tune_writes_a_diffusers_directory(full_run, wan_dirs):
    from diffusers import WanPipeline
    from torch.distributed.checkpoint import FileSystemReader

    from pipelines.train import ModelPlan
    from pipelines.train.models import load_wan_ema

    out, base = full_run["out"], os.path.abspath(wan_dirs["t2v"])
    assert full_run["steps"] == 3 and full_run["model"] == "wan"
    assert sorted(os.listdir(os.path.join(out, "transformer"))) == ["config.json", "diffusion_pytorch_model.safetensors"]
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):  # the base's, referenced
        assert os.path.realpath(os.path.join(out, name)) == os.path.realpath(os.path.join(base, name))
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "WanPipeline" and index["_sora_training"]["steps"] == 3
    keys = FileSystemReader(full_run["checkpoint"]).read_metadata().state_dict_metadata
    assert not any(".lora_" in k for k in keys) and "model.transformer.proj_out.weight" in keys

    pipe = WanPipeline.from_pretrained(out, local_files_only=True)  # loads as any diffusers directory
    base_pipe = WanPipeline.from_pretrained(base, local_files_only=True)
    plan = ModelPlan(cfg=TrainConfig(init=base), spec=None, init=base)
    ema, _ = load_wan_ema(full_run["checkpoint"], plan)
    for name, p in pipe.transformer.named_parameters():
        assert torch.equal(p.detach(), ema["transformer." + name]), name
    moved = [n for n, p in pipe.transformer.named_parameters()
             if not torch.equal(p, base_pipe.transformer.get_parameter(n))]
    assert len(moved) > 0.9 * len(list(pipe.transformer.parameters()))


# ----------------------------------------------------------------------------------------
# Data and configuration, no Ray
# ----------------------------------------------------------------------------------------


def test_same_shape_batches_within_the_budget():
    def s(grid, i):
        n = grid[0] * grid[1] * grid[2]
        return Sample(tokens=torch.full((n, 2), float(i)), positions=position_ids(grid), grid=grid)

    grids = [(1, 2, 2), (1, 2, 3), (1, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 3), (1, 2, 2), (1, 2, 2)]
    batches = list(batch_by_grid([s(g, i) for i, g in enumerate(grids)], 12))
    assert all(len({b.grid for b in batch}) == 1 for batch in batches)  # one shape per batch
    assert all(sum(b.num_tokens for b in batch) <= 12 for batch in batches)
    assert sorted(int(x.tokens[0, 0]) for batch in batches for x in batch) == list(range(8))  # each once
    assert [[int(x.tokens[0, 0]) for x in batch] for batch in batches] == [[0, 2, 4], [1, 5], [3], [6, 7]]
    capped = list(batch_by_grid([s((1, 2, 2), i) for i in range(5)], 100, max_samples=2))
    assert [len(b) for b in capped] == [2, 2, 1]
    with pytest.raises(ValueError, match="exceeds the token budget"):
        list(batch_by_grid([s((2, 2, 2), 0)], 4))


def test_conditioning_defaults_follow_the_model(wan_dirs, data):
    from sora.wan_train import meta_denoiser

    t2v, ti2v = (meta_denoiser(wan_dirs[f]).denoiser_spec for f in ("t2v", "ti2v"))
    cfg = TrainConfig(init=wan_dirs["t2v"]).for_model(t2v.conditioning_modes, shift=3.0)
    assert (cfg.cond_mode_probs, cfg.base_shift, cfg.base_tokens) == ({"none": 1.0}, 3.0, 0)
    assert cfg.flow().base_tokens is None and cfg.flow().shift == 3.0  # one shift for every size
    cfg = TrainConfig(init=wan_dirs["ti2v"]).for_model(ti2v.conditioning_modes, shift=5.0)
    assert set(cfg.cond_mode_probs) == set(CONDITIONING_MODES) and cfg.base_shift == 5.0
    dit = TrainConfig()
    assert (dit.flow().shift, dit.flow().base_tokens) == (1.0, 256)  # the DiT's defaults, unchanged
    assert dit.flow().cond_mode_probs == {"none": 0.7, "first": 0.15, "first_k": 0.05, "last_k": 0.05,
                                          "first_last": 0.05}
    with pytest.raises(ValueError, match=r"\['first'\] are not supported by the Wan model at .*one timestep"):
        plan_model(data, inspect_latents(data), TrainConfig(init=wan_dirs["t2v"], cond_mode_probs={"none": 0.8,
                                                                                                  "first": 0.2}), None)


@pytest.fixture
def no_ray_work(monkeypatch):
    """Fail the test if a run gets as far as starting Ray or a trainer."""
    import pipelines.ray_utils
    import pipelines.trainer

    def reached(*a, **k):
        raise AssertionError("the run got past its checks")

    monkeypatch.setattr(pipelines.ray_utils, "ensure_ray", reached)
    monkeypatch.setattr(pipelines.trainer, "run_trainer", reached)


def _rewrite_latents(data: str, dst: str, **columns) -> str:
    """A copy of DATA/latents with some string columns set to one value."""
    from pipelines.storage import read_table

    table = read_table(os.path.join(data, "latents"))
    for name, value in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array([value] * table.num_rows))
    os.makedirs(os.path.join(dst, "latents"))
    pq.write_table(table, os.path.join(dst, "latents", "part-0.parquet"))
    return dst


def test_bad_input_fails_before_any_work(wan_dirs, data, tmp_path, no_ray_work):
    from flows.cli import main

    base = wan_dirs["t2v"]
    other = str(tmp_path / "cogvideo")
    shutil.copytree(base, other)
    with open(os.path.join(other, "model_index.json")) as f:
        index = json.load(f)
    with open(os.path.join(other, "model_index.json"), "w") as f:
        json.dump({**index, "_class_name": "CogVideoXPipeline"}, f)
    ours = tmp_path / "sora-model"
    ours.mkdir()
    (ours / "model_index.json").write_text(json.dumps({"format": "sora-ray/1", "dit": "dit"}))
    cases = [
        (lora_args(data, other, str(tmp_path / "o1")), r"init .*cogvideo is not a Wan directory.*CogVideoXPipeline "
                                                       r"\(another architecture\)"),
        (lora_args(data, str(ours), str(tmp_path / "o2")), "sora-ray model directory"),
        (lora_args(data, str(tmp_path / "missing"), str(tmp_path / "o3")), "not a local directory"),
        (lora_args(_rewrite_latents(data, str(tmp_path / "vae"), vae="vae@0123456789ab"), base, str(tmp_path / "o4")),
         r"encoded with the VAE 'vae@0123456789ab', not with the VAE of .*sora encode --data .* --model"),
        (lora_args(_rewrite_latents(data, str(tmp_path / "te"), text_encoder="/elsewhere/umt5"), base,
                   str(tmp_path / "o5")), "text states of '/elsewhere/umt5', not of the text encoder"),
        (lora_args(data, base, str(tmp_path / "o6"), **{"--lora-targets": "to_nothing"}), "match no linear layer"),
        (lora_args(data, base, str(tmp_path / "o7"), **{"--vae": str(tmp_path)}), "leave --vae out"),
        (lora_args(data, base, str(tmp_path / "o8"), **{"--max-steps": "2", "--workers": "30"}), "fewer --workers"),
        # a DiT run on latents made for a Wan model
        (["train", "--data", data, "--vae", os.path.join(base, "vae"), "--out", str(tmp_path / "o9")],
         r"encoded for a Wan model \(text encoder wan:text_encoder@[0-9a-f]{12}/512\).*`sora train --init"),
        (["train", "--data", data, "--vae", os.path.join(base, "vae"), "--out", str(tmp_path / "o10"), "--lora-rank",
          "4"], "lora_rank needs init"),
        (["train", "--data", data, "--out", str(tmp_path / "o11")], "give --vae"),
        (lora_args(data, base, str(tmp_path / "o12"), **{"--optimizer": "muon"}), "optimizer='adamw'"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert str(exc.value).startswith("sora train: "), exc.value
        assert re.search(message, str(exc.value)), (message, str(exc.value))
        out = args[args.index("--out") + 1]
        assert not os.path.exists(out), f"{out} was written"
    # latents of another channel count (same VAE id, so the channel check itself is what fails)
    narrow = _rewrite_latents(data, str(tmp_path / "ch"))
    table = pq.read_table(os.path.join(narrow, "latents", "part-0.parquet"))
    table = table.set_column(table.schema.get_field_index("latent_channels"), "latent_channels",
                             pa.array([8] * table.num_rows, pa.int32()))
    pq.write_table(table, os.path.join(narrow, "latents", "part-0.parquet"))
    with pytest.raises(ValueError, match="latent channels 8, the Wan model at .* takes 16"):
        run_training(narrow, str(tmp_path / "o13"), None, TrainConfig(init=base, lora_rank=4))
