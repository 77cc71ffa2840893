"""`sora serve`: the OpenAI-style videos API on Ray Serve, autoscaled, until Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading

from flows.commands.common import formatter


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
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--api-key", default=None, help="required Bearer key (default: $SORA_API_KEY; none: open)")
    p.add_argument("--storage", default="sora-videos", help="job records + videos: directory or fsspec URL")
    p.add_argument("--min-replicas", type=int, default=1, help="generator replicas kept up (default 1)")
    p.add_argument("--max-replicas", type=int, default=4, help="most generator replicas (default 4)")
    p.add_argument("--max-queue", type=int, default=64, help="unfinished jobs before 429 (default 64)")
    p.add_argument("--max-batch-size", type=int, default=4, help="same-shape jobs per model call (default 4)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 if the cluster has any)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise SystemExit(f"sora serve: --model {args.model!r} is not a model directory (no model_index.json)")
    if not 0 <= args.min_replicas <= args.max_replicas or args.max_replicas < 1:
        raise SystemExit("sora serve: need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1")
    if not 0 < args.port < 65536:
        raise SystemExit(f"sora serve: --port must be 1..65535, got {args.port}")
    from ray import serve

    from pipelines.ray_utils import ensure_ray
    from pipelines.serve import run_server

    config = {"model": os.path.abspath(args.model), "storage": args.storage, "min_replicas": args.min_replicas,
              "max_replicas": args.max_replicas, "max_queue": args.max_queue, "max_batch_size": args.max_batch_size,
              "num_gpus": args.num_gpus, "num_cpus": args.num_cpus}
    if args.api_key is not None:
        config["api_key"] = args.api_key
    elif os.environ.get("SORA_API_KEY"):  # the replicas of a local Ray may not share this shell's env
        config["api_key"] = os.environ["SORA_API_KEY"]
    ensure_ray()
    run_server(config, host=args.host, port=args.port)
    print(json.dumps({"api": f"http://{args.host}:{args.port}/v1", "storage": args.storage,
                      "auth": "bearer" if "api_key" in config else "none"}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
