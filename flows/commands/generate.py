"""`sora generate`: one video from a model directory, in any mode, with progress per step."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields, replace

from flows.commands.common import formatter
from flows.commands.config_args import add_config_arguments, config_from_args
from sora.model_dir import ModelSource
from sora.request import NO_LIMITS, GenerationRequest, RequestError

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
PREVIEW_EXTS = (".gif", ".webp")
MODES = ("extend-forward", "extend-backward", "edit", "loop")
# The request's fields whose flag is not --field-name.
FLAGS = {"num_frames": "--frames", "guidance_scale": "--guidance"}
# How errors name a request's fields: by their flags.
NAMES = {**{f.name: "--" + f.name.replace("_", "-") for f in fields(GenerationRequest)}, **FLAGS,
         "size": "--size", "width": "--size", "height": "--size"}


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate one video (text, image, extend, join, loop, edit, draft)",
        formatter_class=formatter,
        description="Generate one video with a model directory: ours (see `sora train`) or a diffusers\n"
        "Wan directory (Wan 2.1 T2V, Wan 2.2 TI2V; --lora adds a LoRA adapter), a path or URL.\n"
        "Text-to-video by default; --image makes the image frame 0; --video with --mode extends\n"
        "it forward or backward, edits it by prompt (SDEdit, --strength) or makes it loop;\n"
        "--join A B generates a transition from the end of A to the start of B; --draft makes a\n"
        "fast low-resolution draft and refines it at full size. Any --size works (e.g. 100x178):\n"
        "the output is exactly that size and exactly --frames long (or --seconds at --fps).",
        epilog="examples:\n"
        "  sora generate --model model --prompt 'A large red circle moves left.' --size 160x90 \\\n"
        "      --seconds 2 --seed 0 --out red.mp4\n"
        "  sora generate --model model --prompt 'A blue square rises.' --image first.png --out up.mp4\n"
        "  sora generate --model model --prompt 'A circle keeps moving.' --video in.mp4 \\\n"
        "      --mode extend-forward --frames 33 --out longer.mp4\n"
        "  sora generate --model model --prompt 'A shape moves.' --join a.mp4 b.mp4 --out ab.mp4\n"
        "  sora generate --model Wan2.1-T2V-1.3B-Diffusers --lora adapter --lora-scale 0.8 \\\n"
        "      --prompt 'A red circle moves left.' --size 832x480 --frames 81 --out wan.mp4",
    )
    add_config_arguments(p, ModelSource)
    add_config_arguments(p, GenerationRequest, include=("prompt", "negative_prompt"))
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT, any size (default: the model's)")
    length = p.add_mutually_exclusive_group()
    add_config_arguments(length, GenerationRequest, include=("num_frames", "seconds"), flags=FLAGS)
    add_config_arguments(p, GenerationRequest, include=("fps", "seed", "steps", "guidance_scale", "sampler"),
                         flags=FLAGS, defaults={"seed": 0})
    p.add_argument("--image", default=None, help="an image (or video: its first frame) to start from")
    p.add_argument("--video", default=None, help="a video to extend, edit or loop (see --mode)")
    p.add_argument("--mode", choices=MODES, default=None, help="what to do with --video (default extend-forward)")
    p.add_argument("--join", nargs=2, metavar=("A", "B"), default=None, help="generate from the end of A to the start of B")
    p.add_argument("--draft", action="store_true", help="low-resolution draft, then refine at full size")
    add_config_arguments(p, GenerationRequest, include=("strength", "context_frames", "draft_scale", "upsample_prompt"),
                         flags=FLAGS)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, help="output video (.mp4 .webm .mov .mkv .avi, or .gif .webp), path or URL")
    p.set_defaults(func=run)


def _fail(message: str) -> None:
    raise SystemExit(f"sora generate: {message}")


def _exists(url: str) -> bool:
    if "://" not in url:
        return os.path.isfile(url)
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def check_args(args: argparse.Namespace) -> GenerationRequest:
    """The request the flags ask for, checked before any model is loaded: a clear message
    instead of a traceback. What the request itself may ask is `GenerationRequest.validate`'s
    to say; here only what belongs to the command line (files, flag combinations, --out)."""
    from sora.conditioning import parse_size

    width = height = None
    if args.size is not None:
        try:
            width, height = parse_size(args.size)
        except ValueError as e:
            _fail(f"--size: {e}")
    ext = os.path.splitext(args.out.rsplit("/", 1)[-1])[1].lower()
    if ext not in VIDEO_EXTS + PREVIEW_EXTS:
        _fail(f"--out {args.out!r}: unknown extension; use one of {' '.join(VIDEO_EXTS + PREVIEW_EXTS)}")
    if args.video is not None and args.join is not None:
        _fail("give --video or --join, not both")
    if args.image is not None and (args.join is not None or (args.video is not None)):
        _fail("--image cannot be combined with --video or --join")
    if args.draft and (args.video is not None or args.join is not None or args.mode is not None):
        _fail("--draft works with text or --image only")
    for flag, value in (("--image", args.image), ("--video", args.video)) + (
            (("--join", args.join[0]), ("--join", args.join[1])) if args.join else ()):
        if value is not None and not _exists(value):
            _fail(f"{flag}: no such file: {value}")
    request = config_from_args(GenerationRequest, args, width=width, height=height, mode=mode_of(args),
                               image=args.image, video=tuple(args.join) if args.join else args.video)
    # any size for GIF/WebP; video containers (H.264, 4:2:0 chroma) need even sides
    limits = replace(NO_LIMITS, empty_prompt=False, even_sides=ext in VIDEO_EXTS)
    try:
        request = request.validate(limits, names=NAMES)
    except RequestError as e:
        _fail(f"{e}; use .gif/.webp for odd sizes" if e.code == "odd_size" else str(e))
    try:  # the model directory and adapter (their JSON, no weights); the mode comes after loading
        config_from_args(ModelSource, args).check()
    except (OSError, ValueError) as e:
        _fail(f"--model/--lora: {e}")
    return request


def mode_of(args: argparse.Namespace) -> str | None:
    if args.join is not None:
        return "join"
    if args.draft:
        return "draft"
    if args.mode is not None:
        return args.mode
    return "extend-forward" if args.video is not None else None  # None: from --image


def run(args: argparse.Namespace) -> int:
    request = check_args(args)
    import torch

    from sora.pipeline import SoraPipeline, export_to_video
    from sora.video_io import VideoError, write_gif, write_webp

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        pipe = SoraPipeline.from_pretrained(args.model, device=device, lora=args.lora, lora_scale=args.lora_scale)
    except (OSError, ValueError, AssertionError) as e:
        _fail(f"cannot load model {args.model!r}: {e}")
    try:
        pipe.check_mode(request.mode, request.image is not None)
    except ValueError as e:
        _fail(str(e))

    def on_step(step: int, total: int, stage: str) -> None:
        sys.stderr.write(f"\r{stage}: step {step}/{total}")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    try:
        out = pipe.generate(request, callback=on_step)
    except (VideoError, OSError) as e:
        _fail(f"cannot read input: {e}")
    except ValueError as e:
        _fail(str(e))
    ext = os.path.splitext(args.out.rsplit("/", 1)[-1])[1].lower()
    if ext == ".gif":
        write_gif(args.out, out.frames, out.fps)
    elif ext == ".webp":
        write_webp(args.out, out.frames, out.fps)
    else:
        export_to_video(out.frames, args.out, fps=out.fps)
    T, H, W, _ = out.frames.shape
    print(json.dumps({"out": args.out, "mode": out.info["mode"], "width": W, "height": H, "frames": T,
                      "fps": out.fps, "seed": request.seed, "generated_size": out.info["generated_size"],
                      "prompt": out.info["prompt"], "seconds": round(time.perf_counter() - t0, 3)}))
    return 0
