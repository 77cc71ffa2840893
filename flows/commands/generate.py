"""`sora generate`: one video from a model directory, in any mode, with progress per step."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from flows.commands.common import formatter

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
PREVIEW_EXTS = (".gif", ".webp")
MODES = ("extend-forward", "extend-backward", "edit", "loop")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate one video (text, image, extend, join, loop, edit, draft)",
        formatter_class=formatter,
        description="Generate one video with a trained model directory (see `sora train`).\n"
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
        "  sora generate --model model --prompt 'A shape moves.' --join a.mp4 b.mp4 --out ab.mp4",
    )
    p.add_argument("--model", required=True, help="model directory (model_index.json, vae/, dit/)")
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (CFG's other branch)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT, any size (default: the model's)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, default=None, help="number of output frames")
    length.add_argument("--seconds", type=float, default=None, help="duration in seconds (frames = seconds x fps)")
    p.add_argument("--fps", type=float, default=None, help="frame rate (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same video")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--sampler", choices=("euler", "heun", "ancestral"), default=None,
                   help="the ODE samplers euler, heun or the stochastic ancestral (default: the model's, euler)")
    p.add_argument("--image", default=None, help="an image (or video: its first frame) to start from")
    p.add_argument("--video", default=None, help="a video to extend, edit or loop (see --mode)")
    p.add_argument("--mode", choices=MODES, default=None, help="what to do with --video (default extend-forward)")
    p.add_argument("--join", nargs=2, metavar=("A", "B"), default=None, help="generate from the end of A to the start of B")
    p.add_argument("--draft", action="store_true", help="low-resolution draft, then refine at full size")
    p.add_argument("--strength", type=float, default=None, help="edit / draft refinement noise level in [0, 1] (defaults: edit 0.7, draft 0.4)")
    p.add_argument("--context-frames", type=int, default=None, help="keep at most this many given frames")
    p.add_argument("--upsample-prompt", action="store_true", help="rewrite the prompt with the model's upsampler")
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


def check_args(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """Every input check that needs no model: a clear message instead of a traceback."""
    from sora.conditioning import parse_size

    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        _fail(f"--model {args.model!r} is not a model directory (no model_index.json)")
    width = height = None
    if args.size is not None:
        try:
            width, height = parse_size(args.size)
        except ValueError as e:
            _fail(f"--size: {e}")
    ext = os.path.splitext(args.out.rsplit("/", 1)[-1])[1].lower()
    if ext not in VIDEO_EXTS + PREVIEW_EXTS:
        _fail(f"--out {args.out!r}: unknown extension; use one of {' '.join(VIDEO_EXTS + PREVIEW_EXTS)}")
    if ext in VIDEO_EXTS and width is not None and (width % 2 or height % 2):
        _fail(f"--size {args.size}: {ext} video (4:2:0 chroma) needs even width and height; use .gif/.webp for odd sizes")
    if args.frames is not None and args.frames < 1:
        _fail(f"--frames must be at least 1, got {args.frames}")
    if args.seconds is not None and args.seconds <= 0:
        _fail(f"--seconds must be positive, got {args.seconds}")
    if args.fps is not None and args.fps <= 0:
        _fail(f"--fps must be positive, got {args.fps}")
    if args.steps is not None and args.steps < 1:
        _fail(f"--steps must be at least 1, got {args.steps}")
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        _fail(f"--strength must be in [0, 1], got {args.strength}")
    if args.video is not None and args.join is not None:
        _fail("give --video or --join, not both")
    if args.mode is not None and args.mode != "loop" and args.video is None:
        _fail(f"--mode {args.mode} needs --video")
    if args.image is not None and (args.join is not None or (args.video is not None)):
        _fail("--image cannot be combined with --video or --join")
    if args.draft and (args.video is not None or args.join is not None or args.mode is not None):
        _fail("--draft works with text or --image only")
    for flag, value in (("--image", args.image), ("--video", args.video)) + (
            (("--join", args.join[0]), ("--join", args.join[1])) if args.join else ()):
        if value is not None and not _exists(value):
            _fail(f"{flag}: no such file: {value}")
    if not args.prompt.strip():
        _fail("--prompt is empty")
    return width, height


def mode_of(args: argparse.Namespace) -> str:
    if args.join is not None:
        return "join"
    if args.draft:
        return "draft"
    if args.video is not None:
        return args.mode or "extend-forward"
    if args.mode == "loop":
        return "loop"
    return "image-to-video" if args.image is not None else "text-to-video"


def run(args: argparse.Namespace) -> int:
    width, height = check_args(args)
    import torch

    from sora.pipeline import SoraPipeline, export_to_video, to_frames
    from sora.video_io import VideoError, write_gif, write_webp

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    try:
        pipe = SoraPipeline.from_pretrained(args.model, device=device)
    except (OSError, ValueError, AssertionError) as e:
        _fail(f"cannot load model {args.model!r}: {e}")
    mode = mode_of(args)
    try:
        image = None if args.image is None else to_frames(args.image, "image")[:1]
        video = None
        if args.video is not None:
            video = to_frames(args.video, "video")
        if args.join is not None:
            video = (to_frames(args.join[0], "A"), to_frames(args.join[1], "B"))
    except (VideoError, OSError, ValueError) as e:
        _fail(f"cannot read input: {e}")

    def on_step(step: int, total: int, stage: str) -> None:
        sys.stderr.write(f"\r{stage}: step {step}/{total}")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    try:
        out = pipe(args.prompt, negative_prompt=args.negative_prompt, width=width, height=height,
                   num_frames=args.frames, seconds=args.seconds, fps=args.fps, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed), image=image,
                   video=video, strength=args.strength, mode=mode, upsample_prompt=args.upsample_prompt,
                   sampler=args.sampler, callback=on_step, context_frames=args.context_frames)
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
    print(json.dumps({"out": args.out, "mode": mode, "width": W, "height": H, "frames": T, "fps": out.fps,
                      "seed": args.seed, "generated_size": out.info["generated_size"], "prompt": out.info["prompt"],
                      "seconds": round(time.perf_counter() - t0, 3)}))
    return 0
