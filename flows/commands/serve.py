"""`sora serve`: the OpenAI-style videos API on Ray Serve, autoscaled, until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading

from flows.commands.common import formatter
from flows.commands.config_args import add_config_arguments, config_from_args
from pipelines.serve_config import ServeConfig
from pipelines.video_requests import HTTPLimits
from sora.model_dir import ModelSource
from sora.request import Limits


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the OpenAI-style /v1/videos API (Ray Serve, autoscaled replicas)",
        formatter_class=formatter,
        description="Start Ray Serve with an HTTP ingress and an autoscaled generator deployment that\n"
        "speak the OpenAI videos API: POST /v1/videos (JSON or multipart, input_reference image),\n"
        "GET /v1/videos[/{id}], GET /v1/videos/{id}/content?variant=video|thumbnail|spritesheet,\n"
        "DELETE /v1/videos/{id}, POST /v1/videos/{id}/remix. Jobs and outputs live in --storage, so\n"
        "a restarted server finds them. Requests need 'Authorization: Bearer KEY' when a key is set\n"
        "(--api-key or $SORA_API_KEY). The same app runs under `serve run` or a KubeRay RayService:\n"
        "import_path pipelines.serve:build_app with args model, storage, min_replicas, max_replicas.",
        epilog="example:\n  sora serve --model model --port 8000 --api-key $KEY --max-replicas 4 \\\n"
        "    --storage s3://bucket/api\n"
        "  OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=$KEY python -c \\\n"
        "    \"from openai import OpenAI; print(OpenAI().videos.create(prompt='A red circle moves left.'))\"",
    )
    add_config_arguments(p, ServeConfig, exclude=("limits", "http_limits"), help={
        "model": "model directory: ours (from `sora train`) or a diffusers Wan directory",
        "api_key": "required Bearer key (None: $SORA_API_KEY, else none: open)"})
    # an mp4 needs even sides and a request a prompt: those two limits are not for the command line
    add_config_arguments(p.add_argument_group("what one request may ask for"), Limits,
                         exclude=("empty_prompt", "even_sides"))
    add_config_arguments(p.add_argument_group("what one HTTP request may carry"), HTTPLimits)
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.set_defaults(func=run)


def config_of(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig the flags ask for (its own checks as a `sora serve: ...` exit)."""
    try:
        source = ModelSource(args.model, args.lora, args.lora_scale).absolute()  # as the replicas see them
        return config_from_args(ServeConfig, args, model=source.model, lora=source.lora,
                                limits=config_from_args(Limits, args), http_limits=config_from_args(HTTPLimits, args))
    except ValueError as e:
        raise SystemExit(f"sora serve: {e}")


def run(args: argparse.Namespace) -> int:
    try:  # the model directory and adapter (their JSON, no weights), before Ray starts
        ModelSource(args.model, args.lora, args.lora_scale).check()
    except (OSError, ValueError) as e:
        raise SystemExit(f"sora serve: --model/--lora: {e}")
    if not 0 < args.port < 65536:
        raise SystemExit(f"sora serve: --port must be 1..65535, got {args.port}")
    cfg = config_of(args)
    if cfg.http_port == args.port:
        raise SystemExit(f"sora serve: --http-port ({cfg.http_port}) is the ingress's own port; it must differ from "
                         f"--port, Serve's proxy")
    from ray import serve

    from pipelines.ray_utils import ensure_ray
    from pipelines.serve import run_server

    config = cfg.to_args()
    if cfg.api_key is None and os.environ.get("SORA_API_KEY"):  # the replicas of a local Ray may not share this env
        config["api_key"] = os.environ["SORA_API_KEY"]
    ensure_ray()
    run_server(config, host=args.host, port=args.port)
    urls = {"api": f"http://{args.host}:{args.port}/v1"}
    if cfg.http_port is not None:  # the same API without Serve's proxy hop
        urls["ingress_api"] = f"http://{cfg.http_host}:{cfg.http_port}/v1"
    print(json.dumps({**urls, "storage": cfg.storage, "auth": "bearer" if config["api_key"] else "none"}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
