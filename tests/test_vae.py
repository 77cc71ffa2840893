"""The causal video VAE: shapes, causality, chunked/tiled equivalence, checkpoints, adapters.

Tolerances (float32, random-init tiny VAE):
  * chunked vs all-at-once encode/decode: max abs diff < 1e-4 (we see ~1e-6: only the
    order of float operations differs, the math is identical because every conv is causal);
  * spatial tiles (64 px, 32 px overlap) vs untiled on a smooth 64x96 clip: mean abs diff
    < 0.01 (we see ~0.003 encode / ~0.002 decode, i.e. ~2% of the mean magnitude). Tiling
    is approximate because a tile sees less spatial context at its borders;
  * the tile blending itself is exact for a local function (tested with pooling).
"""

from __future__ import annotations

import json

import pytest
from dataclasses import asdict
import torch
import torch.nn.functional as F

from sora.vae import (
    CausalVideoVAE,
    DiffusersVideoVAE,
    VAEConfig,
    VideoVAE,
    load_vae,
    tiled_apply,
)
from sora.optim import Muon, Optimizers, orthogonalize
from sora.vae_train import VAELossConfig, evaluate_psnr, foreground_mask, muon_kernel_names, psnr, train_step, vae_loss


@pytest.fixture(scope="module")
def vae() -> CausalVideoVAE:
    torch.manual_seed(0)
    return CausalVideoVAE(VAEConfig.preset("tiny")).eval()


def _clip(T=9, H=32, W=48, B=1, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, T, H, W, generator=g) * 2 - 1


def _smooth_clip(T=5, H=64, W=96) -> torch.Tensor:
    t, y, x = torch.meshgrid(torch.linspace(0, 1, T), torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    return 0.8 * torch.stack([torch.sin(3 * x + y + t), torch.cos(2 * y - x), torch.sin(4 * x * y + t)])[None]


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("T", [1, 5, 9, 17])
def test_latent_shape_for_4k_plus_1_frames(vae, T):
    x = _clip(T=T, H=16, W=24, B=2)
    with torch.no_grad():
        z = vae.encode(x).mode()
        assert z.shape == (2, 8, 1 + (T - 1) // 4, 2, 3)
        assert tuple(z.shape[1:]) == vae.latent_shape(T, 16, 24)
        assert vae.decode(z).shape == x.shape  # 1 + 4k frames come back, an image stays an image


def test_invalid_frame_counts_and_sizes_are_rejected(vae):
    with pytest.raises(AssertionError, match="4k\\+1"):
        vae.encode(_clip(T=8, H=16, W=16))
    with pytest.raises(AssertionError, match="multiples of 8"):
        vae.encode(_clip(T=5, H=20, W=16))


def test_config_presets_and_interface(vae):
    base = VAEConfig.preset("base")
    assert (base.latent_channels, base.temporal_downsample, base.spatial_downsample) == (16, 4, 8)
    assert (vae.temporal_compression, vae.spatial_compression, vae.latent_channels) == (4, 8, 8)
    assert isinstance(vae, VideoVAE)
    with pytest.raises(ValueError, match="spatial_downsample"):
        VAEConfig(channel_multipliers=(1, 2), spatial_downsample=8)


# ----------------------------------------------------------------------------- causality and chunks


def test_chunked_encode_decode_match_all_at_once(vae):
    x = _clip(T=17, H=32, W=48)
    with torch.no_grad():
        full = vae.encode(x)
        for n in (1, 2):
            chunked = vae.encode(x, chunk_latent_frames=n)
            assert (chunked.mean - full.mean).abs().max() < 1e-4
            assert (chunked.logvar - full.logvar).abs().max() < 1e-4
        y = vae.decode(full.mean)
        for n in (1, 3):
            assert (vae.decode(full.mean, chunk_latent_frames=n) - y).abs().max() < 1e-4


def test_causality_prefix_and_future_edits(vae):
    x = _clip(T=17, H=32, W=48)
    with torch.no_grad():
        z = vae.encode(x).mean  # (1, 8, 5, 4, 6)
        # the first 4k+1 frames alone give the same first 1+k latents
        assert (vae.encode(x[:, :, :9]).mean - z[:, :, :3]).abs().max() < 1e-5
        assert (vae.encode(x[:, :, :1]).mean - z[:, :, :1]).abs().max() < 1e-5  # first frame on its own
        # changing the future never changes the past
        x2 = x.clone()
        x2[:, :, 9:] = -x2[:, :, 9:]
        z2 = vae.encode(x2).mean
        assert (z2[:, :, :3] - z[:, :, :3]).abs().max() < 1e-5
        assert (z2[:, :, 3:] - z[:, :, 3:]).abs().max() > 1e-3
        # and decoding is causal too: latents 0..2 decode to the same first 9 frames
        assert (vae.decode(z[:, :, :3]) - vae.decode(z)[:, :, :9]).abs().max() < 1e-5


# ----------------------------------------------------------------------------- tiling


def test_tile_blending_is_exact_for_local_functions():
    x = torch.randn(1, 2, 3, 64, 104)
    enc = lambda v: F.avg_pool3d(v, (1, 8, 8))  # each output pixel sees only its own 8x8 block
    assert torch.allclose(tiled_apply(x, enc, tile=32, overlap=16, scale=1 / 8), enc(x), atol=1e-6)
    z = torch.randn(1, 2, 3, 8, 13)
    dec = lambda v: F.interpolate(v, scale_factor=(1, 8, 8), mode="nearest")
    assert torch.allclose(tiled_apply(z, dec, tile=4, overlap=2, scale=8.0), dec(z), atol=1e-6)


def _lively(vae: CausalVideoVAE) -> CausalVideoVAE:
    """Variance-preserving random weights (He init, residual branches at half weight). With
    PyTorch's default init and no normalisation the untrained VAE's convolutions output a
    near-constant (std ~0.02), so a tiling check on it would prove little."""
    from torch import nn

    from sora.vae import ResBlock

    for m in vae.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.normal_(m.bias, std=0.1)
        if isinstance(m, ResBlock):
            m.conv2.conv.weight.data.mul_(0.5)
    for conv in (vae.encoder.conv_out.conv, vae.decoder.conv_out.conv):
        nn.init.kaiming_uniform_(conv.weight, a=5**0.5)
    return vae


@pytest.mark.parametrize("norm,tol", [("none", 0.01), ("group", 0.12)])
def test_tiled_encode_decode_close_to_untiled(norm, tol):
    # Stated tolerance (mean abs difference, values in [-1, 1]): convolutions alone tile almost
    # exactly (0.01); GroupNorm's per-frame statistics differ per tile, so tiles are within 0.12
    # (measured 0.07 on this smooth clip, random weights). The shortcut is off here (it tiles
    # exactly and would dilute the difference) and norm "none" gets lively weights.
    torch.manual_seed(0)
    vae = CausalVideoVAE(VAEConfig(**{**asdict(VAEConfig.preset("tiny")), "norm": norm, "norm_groups": 8, "shortcut": False})).eval()
    if norm == "none":
        _lively(vae)
    x = _smooth_clip()
    with torch.no_grad():
        z = vae.encode(x).mean
        assert z.std() > 0.05 and vae.decode(z).std() > 0.05  # a live signal, not a constant
        zt = vae.encode(x, tile_size=64, tile_overlap=32).mean
        assert zt.shape == z.shape
        assert (zt - z).abs().mean() < tol, (zt - z).abs().mean()
        y = vae.decode(z)
        yt = vae.decode(z, tile_size=64, tile_overlap=32)
        assert (yt - y).abs().mean() < tol, (yt - y).abs().mean()
        # tiles and temporal chunks compose: chunking inside tiles changes nothing
        ytc = vae.decode(z, tile_size=64, tile_overlap=32, chunk_latent_frames=1)
        assert (ytc - yt).abs().max() < 1e-4


def test_block_mean_shortcut_is_an_exact_codec_of_cell_constant_video():
    """BlockMean -> BlockRepeat reproduces any video that is constant on every latent cell
    (frame 0 alone, then 4 frames x 8 x 8 pixels), all at once and in chunks."""
    from sora.vae import BlockMean, BlockRepeat

    g = torch.Generator().manual_seed(0)
    cells = torch.rand(2, 3, 5, 3, 4, generator=g) * 2 - 1  # (B, 3, T', h, w)
    x = torch.cat([cells[:, :, :1], cells[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)  # (B, 3, 17, 3, 4)
    x = x.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)  # (B, 3, 17, 24, 32)
    mean, rep = BlockMean(4, 8), BlockRepeat(4, 8)
    assert torch.allclose(mean(x, {}), cells, atol=1e-6)
    assert torch.allclose(rep(cells, {}), x)
    cache: dict = {}
    chunked = torch.cat([mean(x[:, :, :1], cache), mean(x[:, :, 1:9], cache), mean(x[:, :, 9:], cache)], dim=2)
    assert torch.allclose(chunked, cells, atol=1e-6)


def test_shortcut_vae_at_init_is_the_block_mean_codec():
    """With the shortcut, the tiny preset starts as a colour codec: its reconstruction of a
    shapes-like clip at initialisation is already far better than a plain VAE's."""
    from sora.vae import BlockMean, BlockRepeat

    x = torch.full((1, 3, 9, 32, 48), -1.0)
    for t in range(9):
        x[:, 1:, t, 5:21, 7 + t : 30 + t] = 0.8  # a cyan box moving right on black, off the 8x8 grid
    torch.manual_seed(0)
    with torch.no_grad():
        shortcut = CausalVideoVAE(VAEConfig.preset("tiny")).eval()
        plain = CausalVideoVAE(VAEConfig(**{**asdict(VAEConfig.preset("tiny")), "shortcut": False})).eval()
        ideal = float(psnr(BlockRepeat(4, 8)(BlockMean(4, 8)(x, {}), {}), x)[0])
        got = float(psnr(shortcut.decode(shortcut.encode(x).mode()), x)[0])
        base = float(psnr(plain.decode(plain.encode(x).mode()), x)[0])
    assert shortcut.config.shortcut and got > base + 5, (got, base)  # we see 13.7 vs 6.4 dB
    assert got > ideal - 1.0, (got, ideal)  # the learned parts start near zero


# ----------------------------------------------------------------------------- latents and checkpoints


def test_fit_latent_stats_normalises_and_round_trips(vae, tmp_path):
    model = CausalVideoVAE(VAEConfig.preset("tiny")).eval()
    model.load_state_dict(vae.state_dict())
    x = _clip(T=5, H=32, W=48, B=2)
    with torch.no_grad():
        raw = model.encode(x).mode()
        shift, scale = model.fit_latent_stats(raw)
        zn = model.encode_latents(x)
        assert abs(zn.mean().item()) < 1e-4 and abs(zn.std().item() - 1.0) < 1e-4
        assert torch.allclose(model.decode_latents(zn), model.decode(raw), atol=1e-5)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["shift_factor"], cfg["scaling_factor"]) == (shift, scale)


def test_per_channel_latent_stats_normalise_each_channel_and_round_trip(vae, tmp_path):
    model = CausalVideoVAE(VAEConfig.preset("tiny")).eval()
    model.load_state_dict(vae.state_dict())
    x = _clip(T=5, H=32, W=48, B=2)
    with torch.no_grad():
        raw = model.encode(x).mode()  # (B, C, T', H', W')
        raw = raw * torch.linspace(0.2, 3.0, raw.shape[1]).view(1, -1, 1, 1, 1)  # channels of unequal spread
        model.fit_latent_stats(raw, per_channel=True)
        zn = model.normalize_latents(raw)
        per_channel = zn.transpose(0, 1).reshape(raw.shape[1], -1)
        assert per_channel.mean(dim=1).abs().max() < 1e-4 and (per_channel.std(dim=1) - 1).abs().max() < 1e-4
        # one video (C, T, H, W) normalises like its batched form, and the inverse is exact
        assert torch.allclose(model.normalize_latents(raw[1]), zn[1], atol=1e-6)
        assert torch.allclose(model.denormalize_latents(zn), raw, atol=1e-5)
        assert torch.allclose(model.decode_latents(zn), model.decode(raw), atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = CausalVideoVAE.from_pretrained(tmp_path)
    assert loaded.config.latents_std == model.config.latents_std and len(loaded.config.latents_std) == raw.shape[1]
    with torch.no_grad():
        assert torch.allclose(loaded.normalize_latents(raw), zn, atol=1e-6)
        model.fit_latent_stats(raw)  # a scalar fit clears the per-channel one
    assert model.config.latents_mean is None and model.config.latents_std is None
    with pytest.raises(ValueError, match="per-channel stats need"):
        VAEConfig(latent_channels=4, latents_mean=[0.0] * 3, latents_std=[1.0] * 3)


def test_save_and_from_pretrained_give_identical_outputs(vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_vae(tmp_path / "vae")
    assert isinstance(loaded, CausalVideoVAE) and loaded.config == vae.config
    x = _clip(T=5, H=16, W=24)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        assert torch.equal(loaded.encode_latents(x, sample=True, generator=g1), vae.encode_latents(x, sample=True, generator=g2))
        z = vae.encode_latents(x)
        assert torch.equal(loaded.decode_latents(z), vae.decode_latents(z))


# ----------------------------------------------------------------------------- training pieces


def test_psnr_analytic():
    x = torch.zeros(2, 3, 1, 4, 4)
    # MSE 0.01 on a [-1, 1] range (peak 2): 10 log10(4 / 0.01) = 26.0206 dB
    assert torch.allclose(psnr(x + 0.1, x), torch.full((2,), 26.0206), atol=1e-3)
    assert torch.isinf(psnr(x, x)).all()


def test_train_step_overfits_one_clip():
    torch.manual_seed(0)
    # a micro VAE (8 channels) keeps this test at ~60 ms a step on one core
    cfg = VAEConfig(latent_channels=4, base_channels=8, channel_multipliers=(1, 1, 1), num_res_blocks=1, patch_size=2,
                    norm_groups=4)
    model = CausalVideoVAE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.zeros(1, 3, 5, 16, 16) - 1.0
    x[:, 0, :, 4:12, 4:12] = 1.0  # a red square on black
    before = evaluate_psnr(model, [x])
    losses = [train_step(model, opt, x, VAELossConfig(sample_posterior=False))["loss"] for _ in range(40)]
    after = evaluate_psnr(model, [x])
    assert losses[-1] < 0.3 * losses[0], losses
    assert after > before + 4.0, (before, after)


def test_foreground_weighting_of_the_reconstruction_loss():
    x = torch.full((1, 3, 1, 16, 16), -0.5)
    x[:, :, :, 2:6, 2:6] = 0.5  # a 4x4 object on a flat background: 16 of 256 pixels
    mask = foreground_mask(x)
    assert mask.shape == (1, 1, 1, 16, 16) and mask.sum() == 16 and mask[0, 0, 0, 2:6, 2:6].all()

    class Echo(torch.nn.Module):  # "reconstructs" x with an error of 0.1 on the object only
        def forward(self, x, sample=True, generator=None):
            from sora.vae import DiagonalGaussian
            z = torch.zeros(1, 1, 1, 1, 1)
            return x + 0.1 * mask, DiagonalGaussian(z, z)

    f, k = 16 / 256, 8.0
    plain, _ = vae_loss(Echo(), x, VAELossConfig(grad_weight=0.0, kl_weight=0.0))
    weighted, _ = vae_loss(Echo(), x, VAELossConfig(grad_weight=0.0, kl_weight=0.0, fg_weight=k))
    assert torch.isclose(plain, torch.tensor(0.01 * f))
    assert torch.isclose(weighted, torch.tensor(0.01 * f * (1 + k) / (1 + k * f)))  # ~5.8x the plain loss


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
def test_orthogonalize_flattens_the_spectrum_and_keeps_the_singular_vectors(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(-1, 1, shape[1], dtype=torch.float64))
    O = orthogonalize(G.float(), dtype=torch.float32).double()
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.5 and s.max() < 1.3, s  # spread ~1e2 in G, ~[0.7, 1.2] after 5 steps
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    # same singular vectors: O is close to U V^T (cosine over all entries)
    assert F.cosine_similarity(O.flatten(), (U @ Vh).flatten(), dim=0) > 0.95


@pytest.fixture
def one_thread():
    """Pinned for the bit-for-bit comparisons (oneDNN/MKL results depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_muon_matches_torch_muon_on_matrices_and_flattens_kernels(one_thread):
    torch.manual_seed(0)
    w0 = torch.randn(24, 40)
    grads = [torch.randn(24, 40) for _ in range(3)]
    reference = {}
    for nesterov, wd in ((True, 0.0), (False, 0.1)):
        ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
        opt_ours = Muon([ours], lr=0.01, momentum=0.9, nesterov=nesterov, weight_decay=wd, ns_dtype=torch.bfloat16)
        opt_ref = torch.optim.Muon([ref], lr=0.01, momentum=0.9, nesterov=nesterov, weight_decay=wd,
                                   adjust_lr_fn="match_rms_adamw")
        for grad in grads:
            for p, o in ((ours, opt_ours), (ref, opt_ref)):
                p.grad = grad.clone()
                o.step()
        assert torch.equal(ours, ref)  # torch.optim.Muon is the reference: the same update, bit for bit
        assert torch.equal(opt_ours.state[ours]["momentum_buffer"], opt_ref.state[ref]["momentum_buffer"])
        reference[nesterov, wd] = ref
    # in float32 (what the VAE uses, and the default on a CPU without a bfloat16 path) the update
    # agrees with torch's bfloat16 one up to that rounding
    f32 = torch.nn.Parameter(w0.clone())
    opt = Muon([f32], lr=0.01, momentum=0.9, ns_dtype=torch.float32)
    for grad in grads:
        f32.grad = grad.clone()
        opt.step()
    d_ours, d_ref = (f32 - w0).detach(), (reference[True, 0.0] - w0).detach()
    assert F.cosine_similarity(d_ours.flatten(), d_ref.flatten(), dim=0) > 0.99
    # a conv kernel is updated as its (C_out, C_in * k) matrix: same step as that matrix alone
    k0, gk = torch.randn(6, 4, 3, 3, 3), torch.randn(6, 4, 3, 3, 3)
    kern, flat = torch.nn.Parameter(k0.clone()), torch.nn.Parameter(k0.reshape(6, -1).clone())
    for p, grad in ((kern, gk), (flat, gk.reshape(6, -1))):
        p.grad = grad
        Muon([p], lr=0.01).step()
    assert torch.equal(kern.detach().reshape(6, -1), flat.detach())
    with pytest.raises(ValueError, match="1-D"):
        Muon([torch.nn.Parameter(torch.zeros(5))])


def test_muon_trains_the_vae_kernels_and_round_trips_its_state():
    torch.manual_seed(0)
    cfg = VAEConfig(latent_channels=4, base_channels=8, channel_multipliers=(1, 1, 1), num_res_blocks=1, patch_size=2,
                    norm_groups=4)
    model = CausalVideoVAE(cfg)
    names = muon_kernel_names(model)
    assert "encoder.conv_in.conv.weight" not in names and "decoder.conv_out.conv.weight" not in names
    assert names and all(model.get_parameter(n).dim() >= 2 for n in names)
    muon = Muon([model.get_parameter(n) for n in names], lr=2e-3, ns_dtype=torch.float32)
    adam = torch.optim.AdamW([p for n, p in model.named_parameters() if n not in names], lr=1e-2)

    x = torch.zeros(1, 3, 5, 16, 16) - 1.0
    x[:, 0, :, 4:12, 4:12] = 1.0
    losses = [train_step(model, Optimizers([muon, adam]), x, VAELossConfig(sample_posterior=False))["loss"] for _ in range(30)]
    assert losses[-1] < 0.3 * losses[0], losses
    # the state (momentum buffers) survives a weights_only save/load
    import io
    buf = io.BytesIO()
    torch.save(muon.state_dict(), buf)
    again = Muon([model.get_parameter(n) for n in names], lr=2e-3, ns_dtype=torch.float32)
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    first = names[0]
    assert torch.equal(again.state[model.get_parameter(first)]["momentum_buffer"],
                       muon.state[model.get_parameter(first)]["momentum_buffer"])


# ----------------------------------------------------------------------------- bring your own VAE


def test_diffusers_wan_vae_adapter(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    mean, std = [0.1, 0.2, -0.1, 0.0], [1.5, 2.0, 0.5, 1.0]
    wan = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std,
    )  # fmt: skip
    wan.save_pretrained(str(tmp_path))
    vae = load_vae(tmp_path)
    assert isinstance(vae, DiffusersVideoVAE) and isinstance(vae, VideoVAE)
    assert (vae.temporal_compression, vae.spatial_compression, vae.latent_channels) == (4, 8, 4)
    x = _clip(T=5, H=16, W=24)
    zn = vae.encode_latents(x)
    assert zn.shape == (1, 4, 2, 2, 3)
    with torch.no_grad():
        raw = vae.model.encode(x).latent_dist.mode()
    expected = (raw - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
    assert torch.allclose(zn, expected, atol=1e-5)
    assert vae.decode_latents(zn).shape == x.shape
