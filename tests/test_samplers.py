"""Samplers: ODEs with known solutions, held conditioning tokens, batched CFG, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from sora.dit import DiT, DiTConfig
from sora.flow import time_grid
from sora.patches import position_ids
from sora.samplers import ancestral, euler, guided_velocity, heun, initial_noise


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def test_euler_is_exact_for_a_point_mass():
    """Data = a single point mu: the rectified-flow field is v(x, t) = (x - mu) / t, and its
    trajectories are straight lines, so Euler lands exactly on mu for any grid."""
    mu = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    field = lambda x, t: (x - mu) / t[:, None]  # noqa: E731
    x1 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps, shift in ((1, 1.0), (7, 3.0)):
        out = euler(field, x1, time_grid(steps, shift, dtype=torch.float64))
        torch.testing.assert_close(out, mu.expand(5, 3), atol=1e-12, rtol=0)


def test_euler_and_heun_on_a_linear_field():
    """dx/dt = lam x from t = 1 to 0 gives x(0) = x(1) exp(-lam). Euler with S uniform steps
    gives exactly x(1) (1 - lam/S)^S; Heun is second order, so far closer."""
    lam, S = 0.8, 10
    field = lambda x, t: lam * x  # noqa: E731
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    grid = time_grid(S, dtype=torch.float64)
    torch.testing.assert_close(euler(field, x1, grid), x1 * (1 - lam / S) ** S, atol=1e-12, rtol=0)
    exact = x1 * math.exp(-lam)
    err_euler = (euler(field, x1, grid) - exact).abs().max()
    err_heun = (heun(field, x1, grid) - exact).abs().max()
    assert err_heun < err_euler / 5
    # Heun error shrinks ~4x when the steps halve (second order)
    err_heun_2 = (heun(field, x1, time_grid(2 * S, dtype=torch.float64)) - exact).abs().max()
    assert err_heun / err_heun_2 > 3.0


def test_heun_calls_the_model_2s_minus_1_times():
    calls = []
    field = lambda x, t: calls.append(1) or x  # noqa: E731
    heun(field, torch.zeros(2, 2), time_grid(6))
    assert len(calls) == 2 * 6 - 1


@pytest.mark.parametrize("sampler", [euler, heun, ancestral])
def test_known_tokens_stay_clean_at_t0(sampler):
    known_mask = torch.tensor([True, False, True, False])
    known = torch.arange(8.0).view(4, 2)
    seen_t = []

    def field(x, t):
        seen_t.append(t.clone())
        assert torch.equal(x[known_mask], known[known_mask])  # the model always sees them clean
        return torch.ones_like(x)

    out = sampler(field, torch.randn(4, 2), time_grid(4), known, known_mask)
    assert torch.equal(out[known_mask], known[known_mask])
    assert all(torch.all(t[known_mask] == 0) and torch.all(t[~known_mask] > 0) for t in seen_t)


def gaussian_velocity(mu: float, sd: float):
    """The exact velocity E[eps - x0 | x_t] when the data is N(mu, sd^2) (one dimension)."""
    def field(x, t):
        t = t[:, None]
        var = (1 - t) ** 2 * sd ** 2 + t ** 2  # of x_t
        r = x - (1 - t) * mu
        return t / var * r - (mu + (1 - t) * sd ** 2 / var * r)
    return field


def test_ancestral_at_eta_0_is_euler_and_at_eta_1_samples_the_data_distribution():
    field = gaussian_velocity(2.0, 0.5)
    x1 = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = time_grid(12, 3.0).double()
    assert torch.allclose(ancestral(field, x1, grid, eta=0.0), euler(field, x1, grid), atol=1e-12)
    # with fine steps it draws the data distribution; with few it draws a narrower one (12
    # steps at shift 3: sd ~0.34, Euler ~0.39), as every sampler that steps on E[x0 | x_t] does
    fine = time_grid(1000, 3.0).double()
    g = torch.Generator().manual_seed(1)
    out = ancestral(field, x1, fine, noise_fn=lambda: torch.randn(4000, 1, generator=g, dtype=torch.float64))
    assert abs(out.mean().item() - 2.0) < 0.03 and abs(out.std().item() - 0.5) < 0.02, (out.mean(), out.std())
    few = ancestral(field, x1, grid, noise_fn=lambda: torch.randn(4000, 1, generator=g, dtype=torch.float64))
    assert abs(few.mean().item() - 2.0) < 0.03 and 0.25 < few.std().item() < euler(field, x1, grid).std().item()
    again = ancestral(field, x1, fine, noise_fn=lambda: torch.randn(4000, 1, generator=g.manual_seed(1),
                                                                   dtype=torch.float64))
    assert not torch.equal(again, out)  # the noise drawn each step matters (one draw repeated here)
    with pytest.raises(AssertionError, match="eta"):
        ancestral(field, x1, grid, eta=1.5)


def tiny_model():
    cfg = DiTConfig.preset("tiny", in_channels=2, text_dim=16, depth=2)
    model = DiT(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_batched_cfg_equals_separate_cond_and_uncond_forwards():
    model = tiny_model()
    grids = [(2, 2, 3), (1, 3, 3)]
    positions = torch.cat([position_ids(g) for g in grids])
    seq_ids = torch.cat([torch.full((math.prod(g),), b) for b, g in enumerate(grids)])
    text = torch.randn(2, 4, 16)
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    x = torch.randn(seq_ids.numel(), model.config.in_dim)
    t = torch.full((x.shape[0],), 0.6)
    with torch.no_grad():
        v_c = model(x, positions, t, seq_ids, text, text_mask)
        v_u = model(x, positions, t, seq_ids, text, torch.zeros_like(text_mask))
        guided = guided_velocity(model, positions, seq_ids, text, text_mask, 4.0)(x, t)
        cond_only = guided_velocity(model, positions, seq_ids, text, text_mask, 1.0)(x, t)
    torch.testing.assert_close(guided, v_u + 4.0 * (v_c - v_u), atol=1e-5, rtol=1e-4)
    assert torch.equal(cond_only, v_c)
    assert (v_c - v_u).abs().max() > 1e-3  # the prompt matters, so the test means something


def test_sampling_is_deterministic_for_a_seed():
    model = tiny_model()
    grid = (2, 3, 3)
    positions, seq_ids = position_ids(grid), torch.zeros(18, dtype=torch.long)
    text, text_mask = torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.bool)
    v = guided_velocity(model, positions, seq_ids, text, text_mask, 3.0)

    def run(seed):
        x = initial_noise((18, model.config.in_dim), torch.Generator().manual_seed(seed))
        return euler(v, x, time_grid(4, shift=2.0))

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
