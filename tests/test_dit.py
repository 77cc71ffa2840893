"""The DiT: packed == separate, rotary relativity, adaLN-Zero init, checkpoints, sizes."""

from __future__ import annotations

import json
import time

import pytest
import torch

from sora.attention import SegmentMask, VarlenMask, attention, build_attention_mask
from sora.dit import (
    DiT,
    DiTConfig,
    PRESETS,
    apply_rope,
    flops_per_token,
    pack_flops,
    rope_angles,
    rope_rotation,
)
from sora.patches import position_ids


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


TEXT_DIM = 32  # small text width keeps these tests fast; the model is agnostic to it


def tiny_config(**kw) -> DiTConfig:
    return DiTConfig.preset("tiny", in_channels=4, text_dim=TEXT_DIM, depth=2, **kw)


def randomize(model: DiT, seed: int = 0) -> DiT:
    """Random weights everywhere, including the zero-initialised ones: at init the model
    outputs exactly 0, which would make any equivalence test pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> DiT:
    torch.manual_seed(0)
    return randomize(DiT(tiny_config()))


def make_video(grid, text_len, valid_text, seed, cfg: DiTConfig, clean_frames=0):
    """One video's inputs: tokens (N, D_in), positions (N, 3), timesteps (N,), text (L, Dt), mask (L,)."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(n, cfg.in_dim, generator=g)
    t = torch.full((n,), torch.rand(1, generator=g).item())
    t[: clean_frames * grid[1] * grid[2]] = 0.0  # the first frames are clean conditioning
    text = torch.randn(text_len, cfg.text_dim, generator=g)
    mask = torch.arange(text_len) < valid_text
    return x, position_ids(grid), t, text, mask


def pack_videos(videos):
    """Concatenate per-video inputs into one pack with text padded to the longest."""
    L = max(v[3].shape[0] for v in videos)
    text = torch.zeros(len(videos), L, videos[0][3].shape[1])
    mask = torch.zeros(len(videos), L, dtype=torch.bool)
    for b, v in enumerate(videos):
        text[b, : v[3].shape[0]] = v[3]
        mask[b, : v[4].shape[0]] = v[4]
    seq_ids = torch.cat([torch.full((v[0].shape[0],), b) for b, v in enumerate(videos)])
    return (
        torch.cat([v[0] for v in videos]),
        torch.cat([v[1] for v in videos]),
        torch.cat([v[2] for v in videos]),
        seq_ids,
        text,
        mask,
    )


VIDEOS = [  # (grid, text_len, valid text tokens, clean frames): different sizes, aspects, prompts
    ((3, 4, 5), 7, 5, 1),
    ((2, 6, 3), 11, 11, 0),
    ((1, 3, 3), 3, 2, 0),
    ((4, 2, 2), 5, 0, 2),  # empty prompt: the CFG-unconditional case
]


def assert_packed_equals_alone(model, videos, packed):
    """Each video's slice of the pack's output equals the model run on that video alone."""
    start = 0
    for v in videos:
        n = v[0].shape[0]
        alone = model(v[0], v[1], v[2], torch.zeros(n, dtype=torch.long), v[3][None], v[4][None])
        torch.testing.assert_close(packed[start : start + n], alone, atol=2e-5, rtol=1e-4)
        start += n


@torch.no_grad()
def test_packed_equals_each_video_alone(model):
    cfg = model.config
    videos = [make_video(g, L, lv, seed, cfg, cf) for seed, (g, L, lv, cf) in enumerate(VIDEOS)]
    x, pos, t, seq, text, mask = pack_videos(videos)
    packed = model(x, pos, t, seq, text, mask)  # (N, D_in)
    assert packed.abs().max() > 1e-3, "randomised model should give a non-trivial output"
    assert_packed_equals_alone(model, videos, packed)


@torch.no_grad()
def test_padded_forward_matches_packed(model):
    cfg = model.config
    videos = [make_video(g, L, lv, seed, cfg, cf) for seed, (g, L, lv, cf) in enumerate(VIDEOS)]
    x, pos, t, seq, text, mask = pack_videos(videos)
    packed = model(x, pos, t, seq, text, mask)
    B, n_max = len(videos), max(v[0].shape[0] for v in videos)
    xp = torch.randn(B, n_max, cfg.in_dim)  # garbage in the padding must not leak
    pp = torch.randint(0, 9, (B, n_max, 3))
    tp = torch.rand(B, n_max)
    keep = torch.zeros(B, n_max, dtype=torch.bool)
    for b, v in enumerate(videos):
        n = v[0].shape[0]
        xp[b, :n], pp[b, :n], tp[b, :n], keep[b, :n] = v[0], v[1], v[2], True
    padded = model.forward_padded(xp, pp, tp, keep, text, mask)  # (B, N_max, D_in)
    torch.testing.assert_close(padded[keep], packed, atol=2e-5, rtol=1e-4)
    assert torch.equal(padded[~keep], torch.zeros_like(padded[~keep]))


@torch.no_grad()
def test_text_of_one_video_does_not_reach_another(model):
    cfg = model.config
    videos = [make_video(g, L, lv, seed, cfg) for seed, (g, L, lv, _) in enumerate(VIDEOS[:2])]
    x, pos, t, seq, text, mask = pack_videos(videos)
    base = model(x, pos, t, seq, text, mask)
    text2 = text.clone()
    text2[1] += 1.0  # change only video 1's prompt
    out = model(x, pos, t, seq, text2, mask)
    assert torch.equal(out[seq == 0], base[seq == 0])
    assert (out[seq == 1] - base[seq == 1]).abs().max() > 1e-3


def test_rope_logits_depend_only_on_relative_position():
    cfg = tiny_config()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(cfg.num_heads, 50, cfg.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(cfg.num_heads, 50, cfg.head_dim, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 20, (50, 3), generator=g)
    logits = []
    for shift in ([0, 0, 0], [5, -3, 17]):
        a = rope_angles(pos + torch.tensor(shift), cfg.axes_dims, cfg.rope_theta).double()
        logits.append(apply_rope(q, a) @ apply_rope(k, a).transpose(-1, -2))  # (heads, N, N)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-5)
    # and positions matter: a different layout gives different logits
    a = rope_angles(pos.flip(0), cfg.axes_dims, cfg.rope_theta).double()
    assert (apply_rope(q, a) @ apply_rope(k, a).transpose(-1, -2) - logits[0]).abs().max() > 1e-2


def test_rope_is_a_rotation_per_axis():
    cfg = tiny_config()
    x = torch.randn(3, 7, cfg.head_dim)
    a = rope_angles(torch.randint(0, 9, (7, 3)), cfg.axes_dims, cfg.rope_theta)
    torch.testing.assert_close(apply_rope(x, a).norm(dim=-1), x.norm(dim=-1))  # norm-preserving
    dt, dh, dw = cfg.axes_dims
    # moving along w changes only the w part of the angles
    p = torch.tensor([[1, 2, 3], [1, 2, 4]])
    diff = rope_angles(p, cfg.axes_dims, cfg.rope_theta).diff(dim=0)[0]
    assert torch.all(diff[: (dt + dh) // 2] == 0) and torch.all(diff[(dt + dh) // 2 :] != 0)


@torch.no_grad()
def test_model_output_invariant_to_shifting_all_positions(model):
    cfg = model.config
    x, pos, t, text, mask = make_video((3, 4, 5), 6, 6, 3, cfg, clean_frames=1)
    seq = torch.zeros(x.shape[0], dtype=torch.long)
    a = model(x, pos, t, seq, text[None], mask[None])
    b = model(x, pos + torch.tensor([4, 7, 2]), t, seq, text[None], mask[None])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_adaln_zero_init_outputs_exactly_zero():
    cfg = tiny_config()
    m = DiT(cfg).eval()
    x, pos, t, seq, text, mask = pack_videos(
        [make_video(g, L, lv, s, cfg, cf) for s, (g, L, lv, cf) in enumerate(VIDEOS)]
    )
    out = m(x, pos, t, seq, text, mask)
    assert torch.equal(out, torch.zeros_like(out))
    # every block starts as the identity: modulation gates and cross-attn output are zero
    h = torch.randn(x.shape[0], cfg.hidden_size)
    c = m.t_embedder(torch.tensor([0.0, 0.5]))
    inverse = torch.zeros(x.shape[0], dtype=torch.long)
    angles = rope_angles(pos, cfg.axes_dims, cfg.rope_theta)
    txt = torch.randn(3, cfg.hidden_size)
    tid = torch.tensor([0, 1, 2])
    out_h = m.blocks[0](h, c, inverse, angles, build_attention_mask(seq, seq), txt, build_attention_mask(seq, tid))
    assert torch.equal(out_h, h)


def test_training_from_zero_init_gets_gradients():
    cfg = tiny_config()
    m = DiT(cfg)
    x, pos, t, seq, text, mask = pack_videos([make_video((2, 3, 3), 4, 4, 0, cfg)])
    m(x, pos, t, seq, text, mask).sub(torch.randn_like(x)).pow(2).mean().backward()
    assert m.final_layer.linear.weight.grad.abs().sum() > 0  # the zero layer still learns


def test_save_and_from_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "dit")
    assert (tmp_path / "dit" / "config.json").is_file() and (tmp_path / "dit" / "model.safetensors").is_file()
    loaded = DiT.from_pretrained(tmp_path / "dit").eval()
    assert loaded.config == model.config
    cfg = model.config
    x, pos, t, seq, text, mask = pack_videos(
        [make_video(g, L, lv, s, cfg, cf) for s, (g, L, lv, cf) in enumerate(VIDEOS)]
    )
    with torch.no_grad():
        assert torch.equal(loaded(x, pos, t, seq, text, mask), model(x, pos, t, seq, text, mask))


def test_checkpoints_with_removed_options_load_only_when_they_are_off(model, tmp_path):
    """config.json files written before an option was removed: the option at its "off" value is
    ignored and the model loads with the same outputs; switched on, loading fails naming it."""
    model.save_pretrained(tmp_path / "dit")
    config_path = tmp_path / "dit" / "config.json"
    saved = json.loads(config_path.read_text())
    old = {**saved, "text_refiner_layers": 0, "aspect_cond": False, "parameterization": "velocity"}
    config_path.write_text(json.dumps(old))
    loaded = DiT.from_pretrained(tmp_path / "dit").eval()
    assert loaded.config == model.config
    x, pos, t, seq, text, mask = pack_videos([make_video((2, 3, 4), 5, 4, 0, model.config)])
    with torch.no_grad():
        assert torch.equal(loaded(x, pos, t, seq, text, mask), model(x, pos, t, seq, text, mask))
    for key, on in (("text_refiner_layers", 2), ("aspect_cond", True), ("parameterization", "edm")):
        config_path.write_text(json.dumps({**saved, key: on}))
        with pytest.raises(ValueError, match=key):
            DiT.from_pretrained(tmp_path / "dit")
    config_path.write_text(json.dumps({**saved, "pooled_text": "attention"}))
    with pytest.raises(ValueError, match="pooled_text"):
        DiT.from_pretrained(tmp_path / "dit")
    config_path.write_text(json.dumps({**saved, "no_such_field": 1}))
    with pytest.raises(ValueError, match="no_such_field"):
        DiT.from_pretrained(tmp_path / "dit")


@pytest.mark.parametrize("bad,match", [
    ({"abs_pos": "learned"}, "abs_pos"), ({"pooled_text": "max"}, "pooled_text"),
    ({"hidden_size": 130}, "divisible by num_heads"), ({"rope_dims": (8, 8, 8)}, "rope_dims")])
def test_invalid_configs_raise_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        DiTConfig.preset("huge")


def test_gradient_checkpointing_gives_identical_gradients():
    cfg = tiny_config()
    m = randomize(DiT(cfg)).train()
    x, pos, t, seq, text, mask = pack_videos(
        [make_video(g, L, lv, s, cfg, cf) for s, (g, L, lv, cf) in enumerate(VIDEOS[:2])]
    )
    grads = []
    for flag in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = flag
        m(x, pos, t, seq, text, mask).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_preset_parameter_counts():
    # with in_channels=16, text_dim=384 (MiniLM): tiny fits a CPU, xl is the ~1B+ model
    counts = {}
    for name in ("tiny", "xl"):
        with torch.device("meta"):
            counts[name] = DiT(DiTConfig.preset(name)).num_params()
    # + the pooled-text MLP and null; + the fractional-position projection (3 axes x 8 sin/cos pairs)
    assert counts["tiny"] == 1_617_984 + (384 * 128 + 128) + (128 * 128 + 128) + 128 + (48 * 128 + 128)
    assert counts["xl"] == 1_257_117_760 + (48 * 1536 + 1536)
    for name, cfg in PRESETS.items():
        assert sum(cfg.axes_dims) == cfg.head_dim, name


def test_flops_per_token_counts_the_per_token_weights():
    """Training FLOPs with no attention span = 6 x the weights each video token passes through."""
    cfg = tiny_config()
    m = DiT(cfg)
    per_token = [m.x_embedder, m.final_layer.linear]
    for b in m.blocks:
        per_token += [b.attn.qkv, b.attn.proj, b.cross_attn.q, b.cross_attn.proj, b.mlp[0], b.mlp[2]]
    weights = sum(lin.weight.numel() for lin in per_token)
    base = flops_per_token(cfg, seq_len=0, text_len=0)
    attn_one_key = 3 * 2 * cfg.depth * 2 * cfg.hidden_size  # the null text key
    assert base == 6 * weights + attn_one_key
    # attention adds 12 * depth * D FLOPs per key in the video's own sequence
    assert flops_per_token(cfg, 1000) - flops_per_token(cfg, 0) == 12 * cfg.depth * cfg.hidden_size * 1000
    # a pack costs each video's tokens at that video's own length and valid text
    from sora.packing import Sample

    videos = [Sample(tokens=torch.zeros(n, cfg.in_dim), positions=position_ids((1, 1, n)), grid=(1, 1, n),
                     text=torch.zeros(6, cfg.text_dim), text_mask=torch.arange(6) < valid) for n, valid in ((7, 6), (30, 2))]
    assert pack_flops(videos, cfg) == 7 * flops_per_token(cfg, 7, 6) + 30 * flops_per_token(cfg, 30, 2)


def test_tiny_forward_backward_time_for_1k_tokens():
    """Golden figure for the tiny preset (MiniLM text width, 4 channels): one fwd+bwd of a
    ~1,000-token pack. Printed for the report; the bound only catches pathologies."""
    cfg = DiTConfig.preset("tiny", in_channels=4)
    m = randomize(DiT(cfg)).train()
    grids = [(5, 6, 8), (5, 8, 6), (5, 7, 7), (5, 6, 7)]  # 240+240+245+210 = 935 tokens
    x, pos, t, seq, text, mask = pack_videos(
        [make_video(g, 12, 10, s, cfg) for s, g in enumerate(grids)]
    )
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        m(x, pos, t, seq, text, mask).pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    print(f"tiny DiT ({m.num_params():,} params) fwd+bwd of {x.shape[0]} tokens: {1000 * min(times):.0f} ms")
    assert min(times) < 5.0


def test_segment_attention_matches_the_dense_mask_forward_and_backward():
    """The CPU default (one SDPA per video) gives the dense-mask result and gradients, packed
    (with padding keys) and padded; queries of a video that are not contiguous fall back to
    the dense mask."""
    cfg = tiny_config()
    videos = [make_video(g, L, lv, s, cfg, cf) for s, (g, L, lv, cf) in enumerate(VIDEOS)]
    x, pos, t, seq, text, mask = pack_videos(videos)
    valid = torch.ones_like(seq, dtype=torch.bool)
    valid[-3:] = False  # padding keys at the end of the last video
    results = {}
    for backend in ("sdpa", "segments"):
        m = randomize(DiT(cfg))  # same seed inside: identical weights
        m.attention_backend = backend
        out = m(x, pos, t, seq, text, mask, valid=valid)
        (out[valid] ** 2).sum().backward()
        results[backend] = (out[valid].detach(), [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(results["segments"][0], results["sdpa"][0], atol=1e-5, rtol=1e-4)
    for g_seg, g_dense in zip(results["segments"][1], results["sdpa"][1]):
        torch.testing.assert_close(g_seg, g_dense, atol=1e-4, rtol=1e-3)
    seg = build_attention_mask(seq, torch.where(valid, seq, -1), "segments")
    assert isinstance(seg, SegmentMask) and len(seg.q_slices) == len(VIDEOS)
    assert seg.q_slices[-1][1] == seq.numel() and isinstance(seg.k_index[0], slice)
    interleaved = torch.tensor([0, 0, 1, 1, 0])
    dense = build_attention_mask(interleaved, interleaved, "segments")
    assert torch.equal(dense, interleaved[:, None] == interleaved[None, :])


def test_varlen_mask_offsets_and_fallbacks():
    """The "varlen" backend's cumulative offsets describe each video's queries and keys; keys
    that are not consecutive per video (padding between videos) fall back to segments. Off
    CUDA it runs as segments, so the model's output equals the dense mask's."""
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    kv = torch.where(torch.arange(9) == 8, -1, seq)  # one trailing padding key
    mask = build_attention_mask(seq, kv, "varlen")
    assert isinstance(mask, VarlenMask)
    assert mask.cu_q.tolist() == [0, 3, 5, 9] and mask.cu_k.tolist() == [0, 3, 5, 8]
    assert (mask.max_q, mask.max_k) == (4, 3) and mask.cu_q.dtype == torch.int32
    text_ids = torch.tensor([0, 0, 1, 2, 2, 2])
    cross = build_attention_mask(seq, text_ids, "varlen")
    assert cross.cu_k.tolist() == [0, 2, 3, 6]
    padded_between = torch.tensor([0, 0, -1, 1, 1, 2, 2, 2, 2])  # keys of video 1 start after a gap
    gap = build_attention_mask(seq, padded_between, "varlen")
    assert isinstance(gap, SegmentMask) and not isinstance(gap, VarlenMask)
    with pytest.raises(ValueError, match="unknown attention backend"):
        build_attention_mask(seq, seq, "flash")
    cfg = tiny_config()
    x, pos, t, seq, text, tmask = pack_videos(
        [make_video(g, L, lv, s, cfg, cf) for s, (g, L, lv, cf) in enumerate(VIDEOS)])
    m = randomize(DiT(cfg))
    with torch.no_grad():
        m.attention_backend = "sdpa"
        ref = m(x, pos, t, seq, text, tmask)
        m.attention_backend = "varlen"
        out = m(x, pos, t, seq, text, tmask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")  # eager flex warns that it is slow
def test_flex_attention_mask_matches_sdpa(model):
    """The flex_attention document mask (eager on CPU) gives the dense-mask result, packed
    and padded: checks the mask logic the CUDA path uses."""
    cfg = model.config
    videos = [make_video(g, L, lv, s, cfg, cf) for s, (g, L, lv, cf) in enumerate(VIDEOS[:3])]
    x, pos, t, seq, text, mask = pack_videos(videos)
    valid = torch.ones_like(seq, dtype=torch.bool)
    valid[-4:] = False  # a few padding keys too
    with torch.no_grad():
        model.attention_backend = "sdpa"
        ref = model(x, pos, t, seq, text, mask, valid=valid)
        model.attention_backend = "flex"
        try:
            out = model(x, pos, t, seq, text, mask, valid=valid)
        finally:
            model.attention_backend = "auto"
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_flex_attention_matches_sdpa_on_cuda():
    cfg = tiny_config()
    m = randomize(DiT(cfg)).cuda()
    videos = [make_video(g, L, lv, s, cfg, cf) for s, (g, L, lv, cf) in enumerate(VIDEOS)]
    inputs = [v.cuda() for v in pack_videos(videos)]
    with torch.no_grad():
        m.attention_backend = "sdpa"
        ref = m(*inputs)
        m.attention_backend = "flex"
        out = m(*inputs)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_varlen_attention_matches_sdpa_on_cuda_in_bf16(monkeypatch):
    import sora.attention

    calls = []
    kernel = sora.attention._varlen_attention
    monkeypatch.setattr(sora.attention, "_varlen_attention", lambda *a: calls.append(1) or kernel(*a))
    cfg = tiny_config()
    m = randomize(DiT(cfg)).cuda()
    videos = [make_video(g, L, lv, s, cfg, cf) for s, (g, L, lv, cf) in enumerate(VIDEOS)]
    inputs = [v.cuda() for v in pack_videos(videos)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        m.attention_backend = "sdpa"
        ref = m(*inputs).float()
        m.attention_backend = "varlen"
        out = m(*inputs).float()
    assert len(calls) == 2 * cfg.depth  # self- and cross-attention of every block ran the flash kernel
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


@torch.no_grad()
@pytest.mark.parametrize("pooled_text,abs_pos", [
    ("none", "none"), ("mean", "none"), ("mean", "fractional"), ("none", "fractional")])
def test_packing_and_text_isolation_hold_with_and_without_pooled_text(pooled_text, abs_pos):
    torch.manual_seed(0)
    model = randomize(DiT(tiny_config(pooled_text=pooled_text, abs_pos=abs_pos)))
    cfg = model.config
    videos = [make_video(g, L, lv, seed, cfg, cf) for seed, (g, L, lv, cf) in enumerate(VIDEOS)]
    x, pos, t, seq, text, mask = pack_videos(videos)
    packed = model(x, pos, t, seq, text, mask)
    assert_packed_equals_alone(model, videos, packed)
    # masked-out text slots (padding, and every slot of the empty prompt) change nothing
    junk = text.clone()
    junk[~mask] = 100.0
    assert torch.equal(model(x, pos, t, seq, junk, mask), packed)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["mean"])
def test_pooled_text_reaches_the_modulation_of_its_own_video_only(mode):
    """With cross-attention switched off (zero output projection), the prompt can reach the
    tokens only through the pooled adaLN path: it must, and only within its own video."""
    torch.manual_seed(0)
    model = randomize(DiT(tiny_config(pooled_text=mode)))
    for block in model.blocks:
        block.cross_attn.proj.weight.zero_()
        block.cross_attn.proj.bias.zero_()
    cfg = model.config
    videos = [make_video(g, L, lv, seed, cfg) for seed, (g, L, lv, _) in enumerate(VIDEOS[:2])]
    x, pos, t, seq, text, mask = pack_videos(videos)
    base = model(x, pos, t, seq, text, mask)
    text2 = text.clone()
    text2[1] += 1.0
    out = model(x, pos, t, seq, text2, mask)
    assert torch.equal(out[seq == 0], base[seq == 0])
    assert (out[seq == 1] - base[seq == 1]).abs().max() > 1e-3
    # the unconditional branch (no valid token) uses the learnt null vector, not the zeros
    empty = torch.zeros_like(mask)
    uncond = model(x, pos, t, seq, text, empty)
    model.pooled_embedder.null += 1.0
    assert (model(x, pos, t, seq, text, empty) - uncond).abs().max() > 1e-3


@torch.no_grad()
def test_fractional_positions_are_per_video_absolute_and_shift_invariant():
    """abs_pos="fractional": a token's embedding depends on where it sits within ITS video
    (so left differs from right, which RoPE alone cannot tell), not on the other videos of the
    pack, nor on where the position ids start."""
    torch.manual_seed(0)
    model = randomize(DiT(tiny_config(abs_pos="fractional")))
    emb = model.pos_embedder
    a, b = position_ids((2, 3, 4)), position_ids((5, 7, 2))
    alone = emb(a, torch.zeros(len(a), dtype=torch.long), 1)
    pack = emb(torch.cat([b, a]), torch.cat([torch.zeros(len(b)), torch.ones(len(a))]).long(), 2)
    torch.testing.assert_close(pack[len(b):], alone)
    shifted = emb(a + torch.tensor([3, 5, 9]), torch.zeros(len(a), dtype=torch.long), 1)
    torch.testing.assert_close(shifted, alone)
    mirrored = a.clone()
    mirrored[:, 2] = 3 - mirrored[:, 2]  # w -> W - 1 - w
    flipped = emb(mirrored, torch.zeros(len(a), dtype=torch.long), 1)
    assert (flipped - alone).abs().amax(dim=1).min() > 1e-3  # every off-centre token moved
    # the same fraction of the extent embeds the same at any size: the centre of a 3-wide and
    # of a 5-wide video (both at 0.5) get one embedding, the cell left of it does not
    three, five = position_ids((1, 1, 3)), position_ids((1, 1, 5))
    e3 = emb(three, torch.zeros(3, dtype=torch.long), 1)
    e5 = emb(five, torch.zeros(5, dtype=torch.long), 1)
    torch.testing.assert_close(e3[1], e5[2])
    assert (e3[0] - e5[1]).abs().max() > 1e-3
    # a whole model run stays invariant to shifting all positions (RoPE relative, fractions too)
    x, pos, t, text, mask = make_video((3, 4, 5), 6, 6, 3, model.config, clean_frames=1)
    seq = torch.zeros(x.shape[0], dtype=torch.long)
    out = model(x, pos, t, seq, text[None], mask[None])
    torch.testing.assert_close(model(x, pos + torch.tensor([4, 7, 2]), t, seq, text[None], mask[None]), out,
                               atol=1e-4, rtol=1e-4)
    flipped_pos = pos.clone()
    flipped_pos[:, 2] = 4 - flipped_pos[:, 2]
    assert (model(x, flipped_pos, t, seq, text[None], mask[None]) - out).abs().max() > 1e-3


def test_cpu_fast_paths_equal_the_plain_ones():
    """What makes a CPU step cheaper changes no number: the one-node per-video flash attention
    equals one SDPA per video through plain autograd (values and gradients, same kernels), and
    RoPE as a complex multiply equals the cos/sin form."""
    g = torch.Generator().manual_seed(3)
    heads, hd, lengths = 2, 8, [5, 9, 1, 7]
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    q, k, v = (torch.randn(heads, seq.numel(), hd, generator=g, requires_grad=True) for _ in range(3))
    grad = torch.randn(heads, seq.numel(), hd, generator=g)
    results = []
    for fast in (True, False):
        mask = build_attention_mask(seq, seq, "segments" if fast else "segments_unfused")
        assert all(isinstance(k, slice) for k in mask.k_index) and mask.fused == fast
        out = attention(q, k, v, mask)
        assert (out.grad_fn.name() == "_SegmentFlashAttentionBackward") == fast
        results.append((out.detach(), *torch.autograd.grad(out, (q, k, v), grad)))
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-5)

    x = torch.randn(3, 11, 32, generator=g).transpose(0, 1)  # a non-contiguous view, as q after the qkv split
    angles = rope_angles(torch.randint(0, 9, (3, 3), generator=g), (8, 12, 12), 10000.0)
    rotation = rope_rotation(angles)
    assert rotation.is_complex()
    torch.testing.assert_close(apply_rope(x, rotation), apply_rope(x, angles), atol=1e-6, rtol=1e-5)
