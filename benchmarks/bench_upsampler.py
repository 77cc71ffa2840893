"""Prompt upsampling: our small T5 upsampler vs passing the short prompt through unchanged.

A good upsampler turns "blue square moving up" into a full descriptive caption (size, colour,
shape, motion and background of every object, as the video model was trained on) while
keeping everything the user said. Both are measured exactly with `sora.shapes.parse_prompt`:

- faithful: every attribute the prompt names (main and second object) comes back unchanged;
- complete: the output names all five attributes of the main object;
- the metric is the fraction of prompts that are both.

    python -m benchmarks.bench_upsampler             # 4000 pairs, 2 cpu-minutes, 300 unseen prompts
    python -m benchmarks.bench_upsampler --quick     # a smoke run

Baseline, side by side in the same run: the prompt unchanged (faithful by construction, but
complete only when the user already wrote everything). Training pairs come from seed 0 with the
held-out combinations excluded; test prompts from seed 7 over all combinations.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from benchmarks.common import report
from sora import shapes
from sora.upsampler import PromptUpsampler, shapes_pairs, train_upsampler

MAIN = ("color", "shape", "size", "motion", "background")
SECOND = ("color2", "shape2", "size2", "motion2")


def score(prompts: list[str], outputs: list[str]) -> dict[str, float]:
    """Per-attribute kept rates (over prompts naming it), faithful, complete and both."""
    kept = {k: [0, 0] for k in MAIN + SECOND}
    faithful = complete = both = 0
    for p, o in zip(prompts, outputs):
        asked, got = shapes.parse_prompt(p), shapes.parse_prompt(o)
        ok = True
        for k in MAIN + SECOND:
            if asked[k] is not None:
                kept[k][1] += 1
                kept[k][0] += asked[k] == got[k]
                ok &= asked[k] == got[k]
        full = all(got[k] is not None for k in MAIN)
        faithful += ok
        complete += full
        both += ok and full
    n = len(prompts)
    out = {f"kept_{k}": round(a / m, 4) for k, (a, m) in kept.items() if m}
    out.update(faithful=faithful / n, complete=complete / n, faithful_and_complete=both / n)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1000 pairs, 0.3 minutes, 100 prompts")
    ap.add_argument("--pairs", type=int, default=4000, help="training pairs")
    ap.add_argument("--prompts", type=int, default=300, help="unseen test prompts")
    ap.add_argument("--minutes", type=float, default=2.0, help="training budget in minutes")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="what --minutes measures")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.prompts, args.minutes = 1000, 100, 0.3
    torch.set_num_threads(args.threads)
    out_dir = tempfile.mkdtemp(prefix="bench_upsampler_")

    pairs = shapes_pairs(args.pairs, 0, exclude=shapes.held_out_combinations())
    prompts = [p for p, _ in shapes_pairs(args.prompts, 7)]
    load_before = os.getloadavg()[0]
    stats = train_upsampler(pairs, out_dir, max_minutes=args.minutes, seed=args.seed, clock=args.clock)
    up = PromptUpsampler.from_pretrained(out_dir)
    t0 = time.perf_counter()
    outs = up.upsample(prompts)
    upsample_s = time.perf_counter() - t0
    ours, base = score(prompts, outs), score(prompts, prompts)
    single = [i for i, p in enumerate(prompts) if " and " not in p]
    sampled = up.upsample(prompts[:50], seed=1)
    extra = {
        "ours": {k: round(v, 4) for k, v in ours.items()},
        "unchanged_prompt": {k: round(v, 4) for k, v in base.items()},
        "ours_single_object_prompts": score([prompts[i] for i in single], [outs[i] for i in single]),
        "ours_sampled_seed1_first50": score(prompts[:50], sampled),
        "pairs": args.pairs, "prompts": args.prompts, "budget_minutes": args.minutes, "clock": args.clock,
        "threads": args.threads, "steps": stats["steps"], "params": stats["params"],
        "final_loss": round(stats["final_loss"], 4), "train_minutes_wall": round(stats["minutes"], 2),
        "train_minutes_cpu": round(stats["cpu_minutes"], 2),
        "competed_for_cpu": {"wall_over_cpu": round(stats["minutes"] / max(stats["cpu_minutes"], 1e-9), 2),
                             "load_average_before": round(load_before, 2),
                             "load_average_after": round(os.getloadavg()[0], 2)},
        "upsample_ms_per_prompt": round(1000 * upsample_s / len(prompts), 2),
        "examples": [{"prompt": p, "ours": o} for p, o in list(zip(prompts, outs))[:4]],
    }
    report("prompt_upsampler", "faithful and complete captions", ("prompt unchanged", base["faithful_and_complete"]),
           (f"sora.upsampler T5-tiny, {args.minutes:g} {args.clock}-min", ours["faithful_and_complete"]),
           higher_is_better=True, unit="fraction of prompts", extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
