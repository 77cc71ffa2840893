"""Rectified flow: analytic path identities, timestep schedules, conditioning masks, the loss."""

from __future__ import annotations

import math

import pytest
import torch

from sora.dit import DiT, DiTConfig
from sora.flow import (
    CONDITIONING_MODES,
    FlowConfig,
    conditioning_mask,
    drop_text,
    flow_matching_loss,
    frames_mask,
    interpolate,
    noise_from_velocity,
    resolution_shift,
    sample_conditioning_mode,
    sample_logit_normal,
    shift_timesteps,
    time_grid,
    velocity_target,
    x0_from_velocity,
)
from sora.packing import Sample, pack, pad_batch
from sora.patches import position_ids


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py



def test_target_velocity_round_trip_float64():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(50, 12, generator=g, dtype=torch.float64)
    noise = torch.randn(50, 12, generator=g, dtype=torch.float64)
    t = torch.rand(50, generator=g, dtype=torch.float64)  # per-token times
    x_t = interpolate(x0, noise, t)
    v = velocity_target(x0, noise)
    torch.testing.assert_close(x0_from_velocity(x_t, v, t), x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(noise_from_velocity(x_t, v, t), noise, atol=1e-12, rtol=0)
    # the endpoints of the path, and v is its time derivative (finite difference)
    assert torch.equal(interpolate(x0, noise, 0.0), x0) and torch.equal(interpolate(x0, noise, 1.0), noise)
    h = 1e-6
    fd = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(fd, v, atol=1e-8, rtol=0)


def test_shift_is_monotone_with_fixed_endpoints():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0, 8.0):
        ts = shift_timesteps(t, s)
        assert ts[0] == 0 and ts[-1] == 1
        assert torch.all(ts.diff() > 0)
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    assert torch.all(shift_timesteps(t, 3.0)[1:-1] > t[1:-1])  # s > 1 moves towards noise
    # SD3's closed form at t = 0.5: s / (1 + s)
    assert shift_timesteps(0.5, 3.0) == pytest.approx(0.75)


def test_resolution_shift_grows_with_tokens():
    assert resolution_shift(256, base_tokens=256, base_shift=1.0) == 1.0
    assert resolution_shift(1024, base_tokens=256, base_shift=1.5) == pytest.approx(3.0)  # sqrt(4) * 1.5
    sizes = [64, 256, 1024, 4096, 10**6]
    shifts = [resolution_shift(n, 256) for n in sizes]
    assert shifts == sorted(shifts) and shifts[0] == 1.0 and shifts[-1] == 8.0  # clamped


def test_time_grid():
    grid = time_grid(10, shift=3.0)
    assert grid.shape == (11,) and grid[0] == 1 and grid[-1] == 0 and torch.all(grid.diff() < 0)
    torch.testing.assert_close(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_logit_normal():
    t = sample_logit_normal(20000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.all((t > 0) & (t < 1))
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)  # symmetric around 1/2 for mean 0
    assert torch.logit(t).std().item() == pytest.approx(1.0, abs=0.03)
    shifted = sample_logit_normal(20000, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert shifted.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)
    a = sample_logit_normal(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, sample_logit_normal(5, generator=torch.Generator().manual_seed(7)))


def frames_of(mask, grid):
    """Which latent frames a token mask covers; asserts it covers whole frames only."""
    per_frame = mask.view(grid[0], grid[1] * grid[2])
    assert torch.all(per_frame.all(1) | ~per_frame.any(1)), "mask must cover whole latent frames"
    return per_frame.all(1).nonzero().flatten().tolist()


def test_conditioning_masks_select_exactly_the_expected_frames():
    grid = (6, 3, 4)
    assert conditioning_mask(grid, "none").shape == (72,)
    assert frames_of(conditioning_mask(grid, "none"), grid) == []
    assert frames_of(conditioning_mask(grid, "first"), grid) == [0]
    assert frames_of(conditioning_mask(grid, "first_k", k=2), grid) == [0, 1]
    assert frames_of(conditioning_mask(grid, "last_k", k=3), grid) == [3, 4, 5]
    assert frames_of(conditioning_mask(grid, "first_last"), grid) == [0, 5]
    assert frames_of(conditioning_mask(grid, "first_k", k=99), grid) == [0, 1, 2, 3, 4]  # one stays noisy
    assert frames_of(frames_mask(grid, [1, -1]), grid) == [1, 5]
    # t-major token order: frame f is tokens [f*h*w, (f+1)*h*w)
    assert conditioning_mask(grid, "first")[:12].all() and not conditioning_mask(grid, "first")[12:].any()
    # a random k is in [1, T-1] and reproducible
    ks = {len(frames_of(conditioning_mask(grid, "last_k", None, torch.Generator().manual_seed(s)), grid)) for s in range(40)}
    assert ks == {1, 2, 3, 4, 5}
    # an image (T = 1) never gets conditioned: it would have nothing left to learn
    for mode in CONDITIONING_MODES:
        assert not conditioning_mask((1, 3, 4), mode, k=1).any()


def test_sample_conditioning_mode():
    g = torch.Generator().manual_seed(0)
    probs = {"none": 3.0, "first": 1.0}
    draws = [sample_conditioning_mode(g, probs) for _ in range(2000)]
    assert set(draws) == {"none", "first"} and draws.count("none") / 2000 == pytest.approx(0.75, abs=0.04)
    assert sample_conditioning_mode(None, {"last_k": 1.0}) == "last_k"


def test_drop_text():
    mask = torch.ones(1000, 5, dtype=torch.bool)
    mask[:, 4] = False
    dropped = drop_text(mask, 0.25, torch.Generator().manual_seed(0))
    rows_dropped = ~dropped.any(1)
    assert rows_dropped.float().mean().item() == pytest.approx(0.25, abs=0.04)
    assert torch.equal(dropped[~rows_dropped], mask[~rows_dropped])  # kept rows untouched
    assert torch.equal(drop_text(mask, 0.0), mask) and not drop_text(mask, 1.0).any()
    flags = drop_text(torch.ones(10, dtype=torch.bool), 1.0)
    assert flags.shape == (10,) and not flags.any()


# ----------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------


def make_batch(grids, d_in, text_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for grid in grids:
        n = math.prod(grid)
        x = torch.randn(1, d_in, generator=g) + 0.1 * torch.randn(n, d_in, generator=g)  # learnable structure
        samples.append(Sample(x, position_ids(grid), grid, text=torch.randn(5, text_dim, generator=g)))
    return samples


class OracleModel(torch.nn.Module):
    """Returns the exact velocity target on noisy tokens, recovered from x_t and t
    (v = (x_t - x0) / t), and garbage on clean (t = 0) and padding tokens. The loss must then
    be 0: conditioning and padding tokens are excluded, and the target is eps - x0."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.seen = {}

    def forward(self, x_t, positions, t, seq_ids, text, text_mask, valid=None):
        self.seen = dict(x_t=x_t, t=t, text_mask=text_mask)
        v = (x_t - self.x0) / t.clamp_min(1e-12)[:, None]
        garbage = t == 0 if valid is None else (t == 0) | ~valid
        return torch.where(garbage[:, None], torch.full_like(v, 1e6), v)


def test_loss_targets_and_excludes_conditioning_tokens():
    samples = make_batch([(4, 2, 3), (3, 3, 2)], d_in=8)
    batch = pack(samples)
    oracle = OracleModel(batch.tokens)
    cfg = FlowConfig(cond_mode_probs={"first": 1.0}, p_uncond=0.0, shift=3.0)
    loss, stats = flow_matching_loss(oracle, batch, cfg, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    t, x_t = oracle.seen["t"], oracle.seen["x_t"]
    clean = t == 0
    assert clean.sum() == 6 + 6  # the first latent frame of each video
    assert torch.equal(x_t[clean], batch.tokens[clean])  # clean tokens keep their exact value
    assert stats["loss_tokens"] == batch.num_tokens - 12
    assert stats["cond_fraction"] == pytest.approx(12 / batch.num_tokens)


def test_loss_on_a_padded_batch_excludes_padding():
    samples = make_batch([(4, 2, 3), (1, 3, 2)], d_in=8)
    batch = pad_batch(samples)
    oracle = OracleModel(batch.tokens.reshape(-1, 8))
    cfg = FlowConfig(cond_mode_probs={"first_last": 1.0}, p_uncond=1.0)
    loss, stats = flow_matching_loss(oracle, batch, cfg, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    assert stats["loss_tokens"] == 24 - 12 + 6  # video 0 loses frames 0 and 3; the image keeps all
    assert stats["uncond_fraction"] == 1.0 and not oracle.seen["text_mask"].any()


def test_loss_is_finite_and_backprop_reaches_the_model():
    cfg = DiTConfig.preset("tiny", in_channels=2, text_dim=32, depth=2)
    model = DiT(cfg)
    batch = pack(make_batch([(3, 2, 2), (2, 3, 3)], d_in=cfg.in_dim))
    flow = FlowConfig(cond_mode_probs={"none": 1.0, "first_k": 1.0}, base_tokens=16)
    loss, stats = flow_matching_loss(model, batch, flow, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 0 and all(torch.isfinite(g).all() for g in grads)
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    # same generator seed -> same loss (all randomness flows through it)
    again, _ = flow_matching_loss(model, batch, flow, torch.Generator().manual_seed(0))
    assert again.item() == loss.item()


def test_tiny_dit_overfits_a_fixed_batch():
    """Golden behaviour of the tiny preset: on a fixed batch (4 fixed draws of t/noise/mode)
    the flow-matching loss falls well below its starting value within 30 steps."""
    torch.manual_seed(0)
    cfg = DiTConfig.preset("tiny", in_channels=4, text_dim=32, depth=2)
    model = DiT(cfg)
    batch = pack(make_batch([(3, 4, 4), (2, 3, 5)], d_in=cfg.in_dim))
    flow = FlowConfig(cond_mode_probs={"none": 0.5, "first": 0.5}, p_uncond=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(30):
        loss, _ = flow_matching_loss(model, batch, flow, torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"tiny overfit: loss {first:.3f} -> {last:.3f}")
    assert last < 0.35 * first


def test_loss_is_the_plain_mean_over_the_loss_tokens():
    """One token off by 1 (in every channel) among the valid ones: the loss is 1 / (valid tokens),
    whichever token it is; padding is excluded."""
    samples = make_batch([(3, 2, 3), (2, 2, 2)], d_in=4)
    batch = pad_batch(samples)
    x0 = batch.tokens.reshape(-1, 4)

    class OffByOne(OracleModel):  # exact, except an error of 1 on one token
        def forward(self, x_t, positions, t, seq_ids, text, text_mask, valid=None):
            v = (x_t - self.x0) / t.clamp_min(1e-12)[:, None]
            v = torch.where(valid[:, None], v, torch.zeros_like(v))
            v[self.bad] += 1.0
            return v

    n_valid = 18 + 8
    for bad in (7, 2, 20):
        model = OffByOne(x0)
        model.bad = bad
        cfg = FlowConfig(cond_mode_probs={"none": 1.0}, p_uncond=0.0)
        loss, _ = flow_matching_loss(model, batch, cfg, torch.Generator().manual_seed(0))
        assert loss.item() == pytest.approx(1 / n_valid)
