"""Our DiT vs a size-matched diffusers `WanTransformer3DModel`, forward + backward on the same
latent video, side by side in one run.

    python -m benchmarks.bench_dit_vs_wan [--quick] [--preset tiny|small] [--batch B]

Needs diffusers (in the `test` and `bench` extras; random init, no
weights are downloaded). Matched: width D = heads x head_dim, depth, heads, MLP width 4 D,
patch (1, 2, 2), latent channels, text width, text length. Both take the same latent video
(B, C, T, H, W) and the same text states; ours sees it patchified and packed (B videos in one
sequence, block-diagonal attention), Wan sees the dense batch. Not matched (architecture, not
size): Wan has one shared timestep MLP + per-block learned modulation tables and no null text
key; ours has per-block adaLN MLPs and per-token timesteps. Parameter counts are reported.
With B > 1 ours attends within each of the B videos of its pack (block-diagonal, see
sora.attention) while Wan attends within each batch row: the same work. The full-size GPU
comparison (Wan 2.1 1.3B against our preset of about its size) is part of benchmarks/gpu_check.py.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import median, report, side_by_side
from sora.dit import DiT, DiTConfig
from sora.patches import grid_for, patchify_batch, position_ids


# The transformer of Wan 2.1 T2V 1.3B (its released config.json): width 1536, 30 layers.
WAN_2_1_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6)


def wan_config_like(config: DiTConfig) -> dict:
    """WanTransformer3DModel arguments of the same width, depth, heads, MLP, patch and text width as ours."""
    return dict(patch_size=config.patch_size, num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
                in_channels=config.in_channels, out_channels=config.in_channels, text_dim=config.text_dim,
                freq_dim=config.frequency_embedding_size, ffn_dim=int(config.hidden_size * config.mlp_ratio),
                num_layers=config.depth, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


def build_wan(config: DiTConfig | dict):
    """A random-init diffusers WanTransformer3DModel: size-matched to a DiTConfig, or from Wan arguments."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**(wan_config_like(config) if isinstance(config, DiTConfig) else config))


def wan_flops_per_token(wan: dict, seq_len: int, text_len: int, training: bool = True) -> float:
    """Matmul FLOPs per video token of a WanTransformer3DModel, counted as ``sora.dit.flops_per_token``
    counts ours: self-attention q, k, v, o and cross-attention q, o (4 + 2 D^2), the FFN (2 D ffn),
    patch in/out, and attention against the own video and the text; not the text's k/v projections."""
    D, L = wan["num_attention_heads"] * wan["attention_head_dim"], wan["num_layers"]
    pt, ph, pw = wan["patch_size"]
    in_dim = wan["in_channels"] * pt * ph * pw
    linear = 2 * (L * (6 * D * D + 2 * D * wan["ffn_dim"]) + 2 * D * in_dim)
    attn = 2 * L * 2 * D * (seq_len + text_len)
    return float((3 if training else 1) * (linear + attn))


def randomize_zero_params(*models) -> None:
    """adaLN-Zero / zero-init output layers would make both backward passes partly trivial."""
    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller latent video, one repeat")
    ap.add_argument("--preset", default="tiny", help="our DiT preset; Wan is sized to match (default tiny)")
    ap.add_argument("--batch", type=int, default=1, help="videos per step (default 1)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise SystemExit("bench_dit_vs_wan needs diffusers: pip install -e .[test]")
    torch.manual_seed(0)
    config = DiTConfig.preset(args.preset)
    device = torch.device(args.device)
    ours, wan = DiT(config).train().to(device), build_wan(config).train().to(device)
    randomize_zero_params(ours, wan)

    B, C = args.batch, config.in_channels
    T, H, W = (3, 16, 28) if args.quick else (5, 24, 42)  # 16:9-ish latent: 96x168 px / 9 frames quick
    L = 24  # text tokens
    repeats = args.repeats or (1 if args.quick else 3)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(B, C, T, H, W, generator=g).to(device)  # the shared input (B, C, T, H, W)
    text = torch.randn(B, L, config.text_dim, generator=g).to(device)  # (B, L, text_dim)
    t = torch.rand(B, generator=g).to(device)  # (B,) in [0, 1]

    grid = grid_for((C, T, H, W), config.patch_size)
    N = grid[0] * grid[1] * grid[2]
    tokens = patchify_batch(latents, config.patch_size).reshape(B * N, -1)  # (B N, D_in)
    positions = position_ids(grid, device).repeat(B, 1)  # (B N, 3)
    seq_ids = torch.arange(B, device=device).repeat_interleave(N)  # (B N,)
    t_tok = t.repeat_interleave(N)  # (B N,)
    text_mask = torch.ones(B, L, dtype=torch.bool, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step_ours() -> None:
        out = ours(tokens, positions, t_tok, seq_ids, text, text_mask)  # (B N, D_in)
        out.float().pow(2).mean().backward()
        ours.zero_grad(set_to_none=True)
        sync()

    def step_wan() -> None:
        out = wan(latents, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]  # (B, C, T, H, W)
        out.float().pow(2).mean().backward()
        wan.zero_grad(set_to_none=True)
        sync()

    t_wan, t_ours = side_by_side(step_wan, step_ours, repeats=repeats, warmup=1)
    real = B * N
    report(
        "dit_vs_wan_fwd_bwd", "tokens/s, forward+backward",
        (f"diffusers WanTransformer3DModel (size-matched to {args.preset})", real / median(t_wan)),
        (f"sora.dit.DiT {args.preset}", real / median(t_ours)),
        higher_is_better=True, unit="tokens/s",
        extra={"device": str(device), "latent_shape": [B, C, T, H, W], "tokens": real, "text_tokens": L, "hidden_size": config.hidden_size,
               "depth": config.depth, "heads": config.num_heads, "params_ours": ours.num_params(),
               "params_wan": sum(p.numel() for p in wan.parameters()), "seconds_wan": t_wan, "seconds_ours": t_ours},
    )


if __name__ == "__main__":
    main()
