"""`sora eval`: prompt adherence of a model in the shapes world (accuracy per attribute)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from flows.commands.common import Progress, formatter


def add(sub: argparse._SubParsersAction) -> None:
    from flows.commands.config_args import add_config_arguments
    from sora.eval_suite import EvalSettings
    from sora.model_dir import ModelSource

    p = sub.add_parser(
        "eval",
        help="generate eval prompts and score them with the shapes-world evaluator",
        formatter_class=formatter,
        description="Generate each prompt and read the video back with the analytic evaluator\n"
        "(sora.evaluator): accuracy of colour, shape, size and motion against what the prompt\n"
        "asks for, plus whether every output has exactly the requested size and frame count.\n"
        "Prompts come from --prompts (JSONL/CSV/Parquet rows with `prompt` and optionally the\n"
        "attributes, size and frames, as `sora.shapes.make_eval_prompts` writes them; missing\n"
        "attributes are parsed from the text) or --held-out N (N prompts over attribute\n"
        "combinations never captioned in training). --draft scores draft-then-refine output and\n"
        "how often refinement keeps the draft's attributes. --from-reference S is a diagnostic:\n"
        "each held-out prompt's reference clip is noised to strength S and denoised with the\n"
        "prompt (SDEdit), showing at which noise level the model loses what the clip had.",
        epilog="examples:\n  sora eval --model model --held-out 100 --out eval.json\n"
        "  sora eval --model model --prompts eval_prompts.jsonl --out eval.json --steps 30\n"
        "  sora eval --model model --held-out 60 --from-reference 0.7 --out eval_ref07.json\n"
        "  sora eval --model wan-dir --lora adapter --held-out 100 --out eval_lora.json",
    )
    add_config_arguments(p, ModelSource)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompts file or URL (.jsonl, .csv, .parquet)")
    src.add_argument("--held-out", type=int, metavar="N", help="make N held-out prompts (make_eval_prompts)")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of --held-out prompts (default 0)")
    p.add_argument("--resolution", default="64p", help="size class of --held-out prompts (default 64p)")
    p.add_argument("--out", required=True, help="report JSON path")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_config_arguments(p.add_argument_group("generation"), EvalSettings,
                         flags={"num_inference_steps": "--steps", "guidance_scale": "--guidance",
                                "save_dir": "--save-videos"})
    p.set_defaults(func=run)


def load_prompts(args: argparse.Namespace) -> list[dict]:
    if args.held_out is not None:
        from sora.shapes import make_eval_prompts

        if args.held_out < 1:
            raise SystemExit("sora eval: --held-out must be at least 1")
        return make_eval_prompts(args.held_out, args.prompt_seed, resolution=args.resolution)
    from pipelines.generate_bulk import read_prompt_rows

    try:
        records = read_prompt_rows(args.prompts)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sora eval: {e}")
    rows = []
    for n, (rec, problem) in enumerate(records):
        if problem is not None or not isinstance((rec or {}).get("prompt"), str) or not rec["prompt"].strip():
            raise SystemExit(f"sora eval: {args.prompts} row {n}: {problem or 'missing prompt'}")
        for k in ("width", "height", "num_frames", "frames", "fps", "seed"):
            if rec.get(k) in ("", None):
                rec.pop(k, None)
        if "frames" in rec and "num_frames" not in rec:
            rec["num_frames"] = rec.pop("frames")
        if "size" in rec and rec["size"] and "width" not in rec:
            from sora.conditioning import parse_size

            rec["width"], rec["height"] = parse_size(rec["size"])
        rows.append(rec)
    return rows


def run(args: argparse.Namespace) -> int:
    from flows.commands.config_args import config_from_args
    from sora.model_dir import ModelSource

    try:  # the model directory and adapter (their JSON, no weights)
        source = config_from_args(ModelSource, args)
        source.check()
    except (OSError, ValueError) as e:
        raise SystemExit(f"sora eval: --model/--lora: {e}")
    prompts = load_prompts(args)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    if not prompts:
        raise SystemExit("sora eval: no prompts")
    import torch

    from sora.eval_suite import EvalSettings, evaluate
    from sora.pipeline import SoraPipeline

    settings = config_from_args(EvalSettings, args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = SoraPipeline.from_pretrained(source.model, device=device, lora=source.lora, lora_scale=source.lora_scale)
    bar = Progress(len(prompts), "eval prompts")
    try:
        report = evaluate(pipe, prompts, **dataclasses.asdict(settings), progress=lambda done, total: bar.update(done))
    except ValueError as e:
        raise SystemExit(f"sora eval: {e}")
    report["model"] = source.absolute().model
    if source.lora is not None:
        report["lora"] = {"path": source.absolute().lora, "scale": source.lora_scale}
    report["prompts"] = args.prompts or f"held-out:{args.held_out}:seed{args.prompt_seed}:{args.resolution}"
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in ("n", "accuracy", "size_correct", "frames_correct", "seconds")}
                     | ({"draft_agreement": report["draft_agreement"]} if args.draft else {})
                     | ({"proportions": report["proportions"]} if "proportions" in report else {})))
    return 0
