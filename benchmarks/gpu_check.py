"""The figures only a GPU can give, for the ``sora/`` layer (no Ray), in one command.

    python -m benchmarks.gpu_check --out gpu_check            # one H100 or H200: ~8 minutes
    python -m benchmarks.gpu_check --dry-run --out /tmp/gc    # every part at toy sizes on the CPU

Parts (``--parts`` picks some; each is guarded, so a failure records an error and the rest run):

- ``train``: the DiT training step (flow-matching loss, forward + backward + fused AdamW) in
  bf16 autocast on packs of mixed-size videos (16k-64k tokens), for the presets from ~300M up
  to the largest, activation checkpointing off and on, eager and with each block compiled:
  tokens/s and MFU (model FLOPs from ``sora.dit.flops_per_token`` over the card's dense bf16 peak).
- ``wan``: the same step (forward + backward) for diffusers' ``WanTransformer3DModel`` at the
  Wan 2.1 1.3B configuration against our preset of about its size, on the same 480p x 81-frame
  latent (32,760 tokens) and text: tokens/s of each and the ratio.
- ``attention``: the attention backends of ``sora.attention`` on a 32k-token pack of mixed-size
  videos (flex, flash varlen, SDPA per video, dense-mask SDPA): forward + backward time, the
  time to build the mask, and agreement with SDPA per video.
- ``sampling``: seconds per denoising step at 480p x 81 frames for the same preset, classifier-
  free guidance in one batched forward of 2N tokens against two forwards of N.
- ``vae``: encode and decode of a 720p x 49-frame video, spatially tiled, with our VAE ("base")
  and diffusers' Wan 2.1 VAE: frames/s and peak memory.

Writes OUT/gpu_check.json (every figure, the machine, the errors) and OUT/gpu_check.md (one
table row per figure) after every part, so a run cut short keeps what it measured. Weights are
random (no download); diffusers is needed for the Wan rows. ``--budget-s`` bounds the wall time:
a run that would start past it is skipped and recorded as skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.bench_dit_vs_wan import WAN_2_1_1_3B, build_wan, randomize_zero_params, wan_flops_per_token
from benchmarks.bench_packing import mixed_aspect_samples
from benchmarks.common import machine
from sora.attention import VarlenMask, attention, build_attention_mask
from sora.dit import DiT, DiTConfig, flops_per_token, pack_flops, peak_bf16_flops
from sora.flow import FlowConfig, flow_matching_loss
from sora.packing import Sample, batch_by_token_budget, pack
from sora.patches import patchify_batch, position_ids
from sora.samplers import guided_velocity

PARTS = ("train", "wan", "attention", "sampling", "vae")

@dataclass
class Sizes:
    """What each part runs; the GPU run and the dry run differ only here."""

    # train: (preset, activation checkpointing, pack token budget, compile the blocks)
    train_runs: list[tuple[str, bool, int, bool]]
    train_resolutions: tuple[str, ...]  # bucket resolution classes of the mixed videos
    train_frames: tuple[int, ...]  # their frame counts
    steps: int  # timed steps per run (after the warm-up)
    warmup: int
    wan_config: dict  # WanTransformer3DModel arguments
    wan_ours: str  # our preset of about the same size
    wan_latent: tuple[int, int, int, int]  # (C, T, H, W) of the shared latent video
    wan_compile: bool
    text_len: int  # text tokens per video in the Wan comparison (Wan pads its prompts to 512)
    attn_tokens: int
    attn_heads: int
    attn_head_dim: int
    attn_resolutions: tuple[str, ...]
    attn_frames: tuple[int, ...]
    sample_preset: str
    sample_grid: tuple[int, int, int]  # token grid of the sampled video
    sample_text_len: int  # prompt tokens
    guidance: float
    vae_preset: str
    vae_video: tuple[int, int, int]  # (T, H, W) pixels
    vae_tile: int  # tile size and overlap in pixels
    vae_overlap: int
    wan_vae_config: dict  # AutoencoderKLWan arguments
    in_channels: int = 16
    budget_s: float = 480.0  # the whole check
    # each part's share: a run that would start past its part's share (or the whole budget) is skipped
    part_budget_s: dict[str, float] = field(default_factory=lambda: {
        "train": 200.0, "wan": 110.0, "attention": 50.0, "sampling": 50.0, "vae": 60.0})


def gpu_sizes() -> Sizes:
    # 480p x 81 frames as Wan 2.1 generates it: latent (16, 21, 60, 104) -> 21 x 30 x 52 tokens
    return Sizes(
        train_runs=[("xl", True, 65536, True), ("xl", True, 32768, True), ("xl", False, 16384, True),
                    ("xl", True, 16384, True), ("xl", True, 32768, False), ("large", False, 16384, True),
                    ("large", True, 65536, True)],
        train_resolutions=("240p", "360p", "480p"), train_frames=(17, 33, 49), steps=3, warmup=2,
        wan_config=WAN_2_1_1_3B, wan_ours="xl", wan_latent=(16, 21, 60, 104), wan_compile=True, text_len=512,
        attn_tokens=32768, attn_heads=24, attn_head_dim=64, attn_resolutions=("240p", "360p", "480p"),
        attn_frames=(17, 33, 49), sample_preset="xl", sample_grid=(21, 30, 52), sample_text_len=128, guidance=5.0,
        vae_preset="base", vae_video=(49, 720, 1280), vae_tile=256, vae_overlap=64, wan_vae_config={},
    )


def dry_sizes() -> Sizes:
    return Sizes(
        train_runs=[("tiny", False, 768, False), ("tiny", True, 1024, False)],
        train_resolutions=("64p", "96p"), train_frames=(9, 17), steps=1, warmup=1,
        wan_config=dict(WAN_2_1_1_3B, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2,
                        text_dim=32),
        wan_ours="tiny", wan_latent=(16, 3, 8, 12), wan_compile=False, text_len=8,
        attn_tokens=512, attn_heads=2, attn_head_dim=16, attn_resolutions=("64p",), attn_frames=(9, 17),
        sample_preset="tiny", sample_grid=(3, 4, 6), sample_text_len=8, guidance=5.0,
        vae_preset="tiny", vae_video=(5, 32, 48), vae_tile=32, vae_overlap=8,
        wan_vae_config=dict(base_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1), in_channels=4, budget_s=600.0,
        part_budget_s={part: 300.0 for part in PARTS},
    )


# ----------------------------------------------------------------------------------------
# Plumbing: device, timing, results
# ----------------------------------------------------------------------------------------


@dataclass
class Check:
    sizes: Sizes
    device: torch.device
    out: Path
    peak_flops: float | None
    started: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    part_seconds: dict[str, float] = field(default_factory=dict)
    part_deadline: float = math.inf  # perf_counter time past which no new run of this part starts

    def row(self, part: str, figure: str, value: float | None, unit: str, **details) -> None:
        self.rows.append({"part": part, "figure": figure, "value": value, "unit": unit, "details": details})
        shown = "-" if value is None else f"{value:.4g}"
        print(f"[{part}] {figure}: {shown} {unit} {json.dumps(details, default=str)}", flush=True)

    def attempt(self, part: str, name: str, fn: Callable[[], None]) -> None:
        """Run one measurement; an exception (an out-of-memory, a kernel missing on this build)
        is recorded and the check goes on. Past the time budget, it is skipped and recorded."""
        now = time.perf_counter()
        if now - self.started > self.sizes.budget_s or now > self.part_deadline:
            self.row(part, name, None, "", skipped="time budget spent")
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failure must not stop the other figures
            self.errors.append({"part": part, "run": name, "error": f"{type(e).__name__}: {str(e)[:500]}",
                                "traceback": traceback.format_exc()[-3000:]})
            print(f"[{part}] {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        finally:
            free_memory(self.device)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        info = {"machine": machine(), "device": device_name(self.device), "peak_bf16_flops": self.peak_flops,
                "torch": torch.__version__, "diffusers": _version("diffusers"), "sizes": asdict(self.sizes),
                "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                "seconds": round(time.perf_counter() - self.started, 1), "part_seconds": self.part_seconds}
        payload = {**info, "rows": self.rows, "errors": self.errors}
        (self.out / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(markdown(payload))


def markdown(payload: dict) -> str:
    peak = payload["peak_bf16_flops"]
    lines = [f"GPU check on **{payload['device']}** (torch {payload['torch']}, diffusers {payload['diffusers']}; "
             f"dense bf16 peak {peak / 1e12:.0f} TFLOP/s; {payload['seconds']} s)." if peak else
             f"GPU check on **{payload['device']}** (torch {payload['torch']}, diffusers {payload['diffusers']}; "
             f"no bf16 peak known, so no MFU; {payload['seconds']} s).",
             f"Command: `{payload['command']}`", "",
             "| part | figure | value | unit | details |", "| --- | --- | --- | --- | --- |"]
    for r in payload["rows"]:
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        details = "; ".join(f"{k} {v}" for k, v in r["details"].items())
        lines.append(f"| {r['part']} | {r['figure']} | {value} | {r['unit']} | {details} |")
    if payload["errors"]:
        lines += ["", "Errors:"] + [f"- {e['part']} / {e['run']}: `{e['error']}`" for e in payload["errors"]]
    return "\n".join(lines) + "\n"


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as `sora train` runs); plain float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def compile_blocks(model: DiT) -> None:
    """torch.compile each block in place, as `sora train --compile` does (parameters keep their names)."""
    for block in model.blocks:
        block.compile(dynamic=True)


def build_dit(config: DiTConfig, device: torch.device) -> DiT:
    with torch.device(device):  # initialised on the device: a 1B CPU init takes a while
        model = DiT(config)
    randomize_zero_params(model)  # a trained-looking model: zero gates would skip backward work
    return model


def mixed_packs(config: DiTConfig, budget: int, count: int, resolutions, frames, seed: int = 0) -> list[list[Sample]]:
    """``count`` packs of at most ``budget`` tokens of mixed-aspect, mixed-size videos (random tokens)."""
    probe = mixed_aspect_samples(8, config, resolutions, frames, seed)
    mean = sum(s.num_tokens for s in probe) / len(probe)
    n = int(1.5 * count * budget / mean) + 2 * len(resolutions) * len(frames)
    samples = [s for s in mixed_aspect_samples(n, config, resolutions, frames, seed) if s.num_tokens <= budget]
    packs = list(batch_by_token_budget(samples, budget))
    assert len(packs) >= count, f"only {len(packs)} packs of {budget} tokens from {len(samples)} videos"
    return packs[:count]


# ----------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------


def part_train(check: Check) -> None:
    """Training step tokens/s and MFU per (preset, checkpointing, pack size, compile)."""
    sz, dev = check.sizes, check.device
    flow = FlowConfig()
    for preset in dict.fromkeys(r[0] for r in sz.train_runs):
        runs = sorted((r for r in sz.train_runs if r[0] == preset), key=lambda r: r[3])  # eager runs first
        state: dict[str, Any] = {}

        def setup(preset=preset, state=state):
            cfg = DiTConfig.preset(preset, in_channels=sz.in_channels)
            state["model"] = build_dit(cfg, dev).train()
            state["opt"] = torch.optim.AdamW(state["model"].parameters(), lr=1e-4, fused=dev.type == "cuda")
            state["compiled"] = False

        check.attempt("train", f"{preset}: build", setup)
        for _, ckpt, budget, compiled in runs:
            name = f"{preset}, checkpointing {'on' if ckpt else 'off'}, {budget:,}-token packs, " \
                   f"{'compiled' if compiled else 'eager'}"

            def run(ckpt=ckpt, budget=budget, compiled=compiled, name=name, state=state):
                model, opt = state["model"], state["opt"]
                if compiled and state.get("compile_failed"):
                    raise RuntimeError("skipped: an earlier compiled run of this preset failed")
                if compiled and not state["compiled"]:
                    compile_blocks(model)
                    state["compiled"] = True
                    state["compile_failed"] = True  # until a compiled step has run
                model.gradient_checkpointing = ckpt
                packs = mixed_packs(model.config, budget, sz.warmup + sz.steps, sz.train_resolutions, sz.train_frames)
                gen = torch.Generator().manual_seed(0)

                def step(samples):
                    try:
                        batch = pack(samples).to(dev)
                        with autocast(dev):
                            loss, _ = flow_matching_loss(model, batch, flow, gen)
                        loss.backward()
                        opt.step()
                    finally:  # an out-of-memory must not leave gradients held for the next run
                        opt.zero_grad(set_to_none=True)

                first = [timed(lambda p=p: step(p), dev) for p in packs[: sz.warmup]]
                state["compile_failed"] = False
                seconds = [timed(lambda p=p: step(p), dev) for p in packs[sz.warmup:]]
                tokens = sum(sum(s.num_tokens for s in p) for p in packs[sz.warmup:])
                flops = sum(pack_flops(p, model.config) for p in packs[sz.warmup:])
                tps, achieved = tokens / sum(seconds), flops / sum(seconds)
                details = dict(params=f"{model.num_params() / 1e6:.0f}M", tokens_per_pack=round(tokens / sz.steps),
                               videos_per_pack=round(sum(len(p) for p in packs[sz.warmup:]) / sz.steps),
                               step_s=round(sum(seconds) / sz.steps, 3), first_step_s=round(first[0], 1),
                               tflops=round(achieved / 1e12, 1), peak_mem_gib=_round(peak_gib(dev)))
                check.row("train", f"{name}: tokens/s", tps, "tokens/s", **details)
                if check.peak_flops:
                    check.row("train", f"{name}: MFU", achieved / check.peak_flops, "fraction of peak")

            check.attempt("train", name, run)
        state.clear()


def part_wan(check: Check) -> None:
    """Forward + backward tokens/s: diffusers' Wan transformer vs our preset, same latent and text."""
    sz, dev = check.sizes, check.device
    wan_cfg = sz.wan_config
    ours_cfg = DiTConfig.preset(sz.wan_ours, in_channels=wan_cfg["in_channels"], text_dim=wan_cfg["text_dim"],
                                patch_size=tuple(wan_cfg["patch_size"]))
    C, T, H, W = sz.wan_latent
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, C, T, H, W, generator=g).to(dev)  # (1, C, T, H, W)
    text = torch.randn(1, sz.text_len, wan_cfg["text_dim"], generator=g).to(dev)  # (1, L, text_dim)
    t = torch.rand(1, generator=g).to(dev)
    pt, ph, pw = ours_cfg.patch_size
    grid = (T // pt, H // ph, W // pw)
    N = grid[0] * grid[1] * grid[2]
    tokens = patchify_batch(latents, ours_cfg.patch_size).reshape(N, -1)  # (N, D_in)
    positions, seq = position_ids(grid, dev), torch.zeros(N, dtype=torch.long, device=dev)
    t_tok, text_mask = t.expand(N), torch.ones(1, sz.text_len, dtype=torch.bool, device=dev)
    models: dict[str, Any] = {}

    def setup():
        with torch.device(dev):
            models["wan"] = build_wan(wan_cfg).train()
        models["ours"] = build_dit(ours_cfg, dev).train()
        randomize_zero_params(models["wan"])
        models["ours"].gradient_checkpointing = True  # 32k tokens of a 1B model: as a real run would
        models["wan"].enable_gradient_checkpointing()
        if sz.wan_compile:
            compile_blocks(models["ours"])
            models["wan"].compile_repeated_blocks(dynamic=False)

    def measure():
        ours, wan = models["ours"], models["wan"]

        def step_ours():
            with autocast(dev):
                out = ours(tokens, positions, t_tok, seq, text, text_mask)  # (N, D_in)
            out.float().pow(2).mean().backward()
            ours.zero_grad(set_to_none=True)

        def step_wan():
            with autocast(dev):
                out = wan(latents, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]
            out.float().pow(2).mean().backward()
            wan.zero_grad(set_to_none=True)

        for _ in range(sz.warmup):
            timed(step_wan, dev), timed(step_ours, dev)
        t_wan, t_ours = [], []
        for _ in range(sz.steps):  # interleaved, so drifting clocks hit both
            t_wan.append(timed(step_wan, dev))
            t_ours.append(timed(step_ours, dev))
        tps_wan, tps_ours = N / min(t_wan), N / min(t_ours)
        p_wan, p_ours = sum(p.numel() for p in wan.parameters()), ours.num_params()
        f_wan = wan_flops_per_token(wan_cfg, N, sz.text_len)
        f_ours = flops_per_token(ours_cfg, N, sz.text_len)
        common = dict(tokens=N, latent=list(sz.wan_latent), text_tokens=sz.text_len, checkpointing="on",
                      compiled=sz.wan_compile)
        for who, tps, params, fpt in (("diffusers WanTransformer3DModel (Wan 2.1 1.3B config)", tps_wan, p_wan, f_wan),
                                      (f"sora DiT preset {sz.wan_ours}", tps_ours, p_ours, f_ours)):
            mfu = fpt * tps / check.peak_flops if check.peak_flops else None
            check.row("wan", f"{who}: fwd+bwd tokens/s", tps, "tokens/s", params=f"{params / 1e6:.0f}M",
                      gflop_per_token=round(fpt / 1e9, 2), mfu=_round(mfu), **common)
        check.row("wan", "ours / Wan: tokens/s", tps_ours / tps_wan, "ratio", params_ours_over_wan=round(p_ours / p_wan, 3))
        check.row("wan", "ours / Wan: model FLOP/s", (tps_ours * f_ours) / (tps_wan * f_wan), "ratio")

    check.attempt("wan", "build", setup)
    if models:
        check.attempt("wan", "fwd+bwd", measure)
    models.clear()


def part_attention(check: Check) -> None:
    """Forward + backward of each attention backend on one packed sequence of mixed-size videos."""
    sz, dev = check.sizes, check.device
    cfg = DiTConfig(hidden_size=sz.attn_heads * sz.attn_head_dim, num_heads=sz.attn_heads, depth=1, in_channels=1)
    packs = mixed_packs(cfg, sz.attn_tokens, 1, sz.attn_resolutions, sz.attn_frames, seed=1)
    lengths = torch.tensor([s.num_tokens for s in packs[0]])
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(dev)  # (N,)
    N = int(lengths.sum())
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(sz.attn_heads, N, sz.attn_head_dim, generator=g).to(dev, dtype) for _ in range(4))
    flops = 3 * 4 * sz.attn_heads * sz.attn_head_dim * float((lengths.double() ** 2).sum())  # fwd + bwd (2x)
    reference: dict[str, torch.Tensor] = {}
    reps = 10 if dev.type == "cuda" else 1

    for backend in ("segments", "varlen", "flex", "sdpa"):
        def run(backend=backend):
            mask_s = timed(lambda: build_attention_mask(seq, seq, backend), dev)
            mask = build_attention_mask(seq, seq, backend)
            backward = dev.type == "cuda" or backend != "flex"  # flex has no CPU backward (torch 2.13)
            qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))

            def fwd_bwd():
                qq.grad = kk.grad = vv.grad = None
                out = attention(qq, kk, vv, mask)
                if backward:
                    out.backward(grad)
                return out

            out = fwd_bwd()  # warm-up (compiles flex once)
            seconds = min(timed(fwd_bwd, dev) for _ in range(reps))
            out = out.detach().float()
            if backend == "segments":
                reference["out"] = out
            diff = (out - reference["out"]).abs().max().item() if "out" in reference else None
            kernel = {"segments": "SDPA per video", "varlen": "flash varlen", "flex": "flex_attention",
                      "sdpa": "dense-mask SDPA"}[backend]
            if backend == "varlen" and not (isinstance(mask, VarlenMask) and dev.type == "cuda"):
                kernel += " (ran as SDPA per video: no CUDA)"
            what = "fwd+bwd" if backward else "fwd only"
            check.row("attention", f"{kernel}: {what} ms", 1000 * seconds, "ms", tokens=N, videos=len(lengths),
                      heads=sz.attn_heads, head_dim=sz.attn_head_dim,
                      tflops=round(flops / seconds / 1e12, 1) if backward else None,
                      mask_ms=round(1000 * mask_s, 2), max_abs_diff_vs_sdpa_per_video=_round(diff, 5),
                      peak_mem_gib=_round(peak_gib(dev)))

        check.attempt("attention", backend, run)


def part_sampling(check: Check) -> None:
    """Seconds per denoising step with CFG: one forward of 2N tokens vs two forwards of N."""
    sz, dev = check.sizes, check.device
    cfg = DiTConfig.preset(sz.sample_preset, in_channels=sz.in_channels)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    N = sz.sample_grid[0] * sz.sample_grid[1] * sz.sample_grid[2]
    g = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {}

    def setup():
        model = build_dit(cfg, dev).eval().to(dtype)
        text = torch.randn(1, sz.sample_text_len, cfg.text_dim, generator=g).to(dev, dtype)
        mask = torch.ones(1, sz.sample_text_len, dtype=torch.bool, device=dev)
        positions, seq = position_ids(sz.sample_grid, dev), torch.zeros(N, dtype=torch.long, device=dev)
        x = torch.randn(N, cfg.in_dim, generator=g).to(dev, dtype)
        batched = guided_velocity(model, positions, seq, text, mask, sz.guidance)

        def two_passes(x, t):
            v_cond = model(x, positions, t, seq, text, mask)  # (N, D_in)
            v_uncond = model(x, positions, t, seq, text, torch.zeros_like(mask))  # (N, D_in)
            return v_uncond + sz.guidance * (v_cond - v_uncond)

        state.update(model=model, x=x, batched=batched, two_passes=two_passes)

    def measure():
        x, t = state["x"], torch.full((N,), 0.7, device=dev)

        def step(velocity):
            with torch.inference_mode():
                return x - 0.05 * velocity(x, t)  # one Euler step of the ODE

        reps = sz.steps + 1
        for name in ("two_passes", "batched"):
            step(state[name])  # warm-up (compiles flex once)
        times = {name: [] for name in ("two_passes", "batched")}
        for _ in range(reps):
            for name in times:
                times[name].append(timed(lambda: step(state[name]), dev))
        for name, label in (("two_passes", "CFG as two forwards of N tokens"), ("batched", "CFG batched: one forward of 2N")):
            check.row("sampling", f"{label}: s/step", min(times[name]), "s", preset=sz.sample_preset, tokens=N,
                      grid=list(sz.sample_grid), dtype=str(dtype).removeprefix("torch."),
                      peak_mem_gib=_round(peak_gib(dev)))
        check.row("sampling", "batched / two forwards: s/step", min(times["batched"]) / min(times["two_passes"]), "ratio")

    check.attempt("sampling", "build", setup)
    if state:
        check.attempt("sampling", "steps", measure)
    state.clear()


def part_vae(check: Check) -> None:
    """Tiled encode and decode of one video: ours and diffusers' Wan 2.1 VAE."""
    sz, dev = check.sizes, check.device
    T, H, W = sz.vae_video
    x = (torch.rand(1, 3, T, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dev)

    def ours():
        from sora.vae import CausalVideoVAE, VAEConfig

        vae = CausalVideoVAE(VAEConfig.preset(sz.vae_preset)).to(dev).eval()
        tiles = dict(tile_size=sz.vae_tile, tile_overlap=sz.vae_overlap)
        measure_vae(check, f"sora CausalVideoVAE {sz.vae_preset}", x,
                    lambda v: vae.encode(v, **tiles).mode(), lambda z: vae.decode(z, **tiles))

    def wan():
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan(**sz.wan_vae_config).to(dev).eval()
        vae.enable_tiling(tile_sample_min_height=sz.vae_tile, tile_sample_min_width=sz.vae_tile,
                          tile_sample_stride_height=sz.vae_tile - sz.vae_overlap,
                          tile_sample_stride_width=sz.vae_tile - sz.vae_overlap)
        measure_vae(check, "diffusers AutoencoderKLWan (Wan 2.1)", x,
                    lambda v: vae.encode(v).latent_dist.mode(), lambda z: vae.decode(z).sample)

    check.attempt("vae", "ours", ours)
    check.attempt("vae", "wan", wan)


def measure_vae(check: Check, name: str, x: torch.Tensor, encode, decode) -> None:
    dev, T = check.device, x.shape[2]
    details = dict(video=list(check.sizes.vae_video), tile=check.sizes.vae_tile, overlap=check.sizes.vae_overlap)
    with torch.inference_mode(), autocast(dev):
        z = encode(x)  # warm-up
        free_memory(dev)
        enc_s = timed(lambda: encode(x), dev)
        enc_mem = peak_gib(dev)
        decode(z)  # warm-up
        free_memory(dev)
        dec_s = timed(lambda: decode(z), dev)
        dec_mem = peak_gib(dev)
    check.row("vae", f"{name}: encode frames/s", T / enc_s, "frames/s", seconds=round(enc_s, 2),
              peak_mem_gib=_round(enc_mem), latent=list(z.shape), **details)
    check.row("vae", f"{name}: decode frames/s", T / dec_s, "frames/s", seconds=round(dec_s, 2),
              peak_mem_gib=_round(dec_mem), **details)


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, digits)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check", help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="every part at toy sizes on the CPU")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="skip runs that would start after this many seconds")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (default: by name)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"gpu_check: unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    if args.dry_run:
        device, sizes = torch.device("cpu"), dry_sizes()
        torch.set_num_threads(1)  # toy ops: one thread is much faster than two on a shared box
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), gpu_sizes()
    else:
        raise SystemExit("gpu_check: no CUDA device; run with --dry-run to check the script on the CPU")
    if args.budget_s is not None:
        sizes.budget_s = args.budget_s
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (
        peak_bf16_flops(device_name(device)) if device.type == "cuda" else None)
    random.seed(0)
    torch.manual_seed(0)
    check = Check(sizes, device, Path(args.out), peak)
    print(f"gpu_check on {device_name(device)}, peak {peak and peak / 1e12} TFLOP/s, parts {parts}", flush=True)
    for name in parts:
        t0 = time.perf_counter()
        check.part_deadline = t0 + sizes.part_budget_s.get(name, math.inf)
        check.attempt(name, "part", lambda: globals()[f"part_{name}"](check))
        check.part_seconds[name] = round(time.perf_counter() - t0, 1)
        check.write()
    print(f"wrote {check.out / 'gpu_check.json'} and {check.out / 'gpu_check.md'} "
          f"({len(check.rows)} figures, {len(check.errors)} errors)", flush=True)
    return json.loads((check.out / "gpu_check.json").read_text())


if __name__ == "__main__":
    main()
