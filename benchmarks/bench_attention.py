"""Packed DiT training step on CPU: dense-mask SDPA over the whole pack vs one SDPA per video,
and per-video SDPA through plain autograd vs as one autograd node (the CPU default).

A pack holds many videos; attention must stay inside each one. A dense (N, N) mask gives the
right answer but scores every query against every key of the pack, so a pack of ~20 videos
does ~20x the attention work it needs. The "segments" backend runs SDPA per video on its own
keys. Through plain autograd each video's slices of q, k and v are their own nodes, whose
backward zero-fills a whole-pack gradient per video; the default runs every video's flash
kernels inside one node instead ("segments_unfused" is the plain way, kept as the baseline).
Same model, same pack, forward + backward + optimizer step, side by side.

    python -m benchmarks.bench_attention [--quick] [--preset tiny] [--tokens 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import random

from benchmarks.common import median, report, side_by_side


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 1024-token pack, 1 repeat")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per pack (the demo trains on 4096)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one Ray Train worker uses 1)")
    args = ap.parse_args()

    import torch

    from sora.dit import DiT, DiTConfig
    from sora.flow import FlowConfig, flow_matching_loss
    from sora.packing import Sample, pack
    from sora.patches import position_ids

    torch.set_num_threads(args.threads)
    budget = 1024 if args.quick else args.tokens
    # the shapes world's 64p grids: (latent frames, h, w) tokens of 48..112 px clips of 9..33 frames
    rng = random.Random(0)
    grids = [(t, h, w) for t in (3, 5, 7, 9) for h, w in ((4, 7), (7, 4), (3, 4), (4, 3), (5, 5), (3, 7), (7, 3))]
    cfg = DiTConfig.preset(args.preset, in_channels=8)
    samples, n = [], 0
    while True:
        g = rng.choice(grids)
        size = g[0] * g[1] * g[2]
        if n + size > budget:
            break
        samples.append(Sample(tokens=torch.randn(size, cfg.in_dim), positions=position_ids(g), grid=g,
                              text=torch.randn(14, cfg.text_dim)))
        n += size
    batch = pack(samples)
    model = DiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(backend: str):
        def run():
            model.attention_backend = backend
            loss, _ = flow_matching_loss(model, batch, FlowConfig(), torch.Generator().manual_seed(0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    repeats = 1 if args.quick else 5
    info = {"preset": args.preset, "pack_tokens": n, "videos": len(samples), "threads": args.threads}
    tb, to = side_by_side(step("sdpa"), step("segments_unfused"), repeats=repeats)
    report("dit_packed_train_step", "tokens/s", ("dense (N, N) mask SDPA", n / median(tb)),
           ("SDPA per video (segments, plain autograd)", n / median(to)), higher_is_better=True,
           extra={**info, "seconds_dense": [round(x, 3) for x in tb], "seconds_segments": [round(x, 3) for x in to]})
    tb, to = side_by_side(step("segments_unfused"), step("segments"), repeats=max(repeats, 3))
    report("dit_segment_attention_node", "tokens/s", ("SDPA per video, plain autograd", n / median(tb)),
           ("per-video flash kernels in one autograd node", n / median(to)), higher_is_better=True,
           extra={**info, "seconds_unfused": [round(x, 3) for x in tb], "seconds_fused": [round(x, 3) for x in to]})


if __name__ == "__main__":
    main()
