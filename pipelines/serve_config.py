"""`ServeConfig`: everything the videos API on Ray Serve takes (`pipelines.serve.build_app`).

The same fields arrive as `sora serve` flags, as `serve run pipelines.serve:build_app key=value`
strings, or as a RayService serveConfigV2 `args` mapping; `from_args` reads all three.
`limits` (what one generation request may ask for, `sora.request.Limits`) and `http_limits`
(body and upload sizes, `pipelines.video_requests.HTTPLimits`) are nested mappings there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipelines.video_requests import HTTPLimits
from sora.request import DEFAULT_STRENGTH, Limits


@dataclass
class ServeConfig:
    """Everything `build_app` takes (serveConfigV2 `args`, `sora serve` flags)."""

    model: str  # model directory (ours or a diffusers Wan directory, sora.model_dir), readable where the replicas run
    lora: str | None = None  # LoRA adapter directory for a Wan model (diffusers' layout), readable by the replicas
    lora_scale: float = 1.0  # strength of the LoRA adapter (1: as trained, 0: the base model)
    storage: str = "sora-videos"  # job records and videos: a directory or fsspec URL shared by all replicas
    api_key: str | None = None  # required Bearer key (None: $SORA_API_KEY in the ingress's environment; neither: open)
    model_name: str = "sora-ray"  # the `model` the API reports; OpenAI's sora-2 names are accepted as aliases
    min_replicas: int = 1  # generator replicas kept running
    max_replicas: int = 4  # most generator replicas the autoscaler starts
    target_ongoing_requests: float = 4.0  # jobs queued + running per replica before Serve adds one
    upscale_delay_s: float = 5.0  # seconds the load must stay high before a replica is added
    downscale_delay_s: float = 300.0  # seconds the load must stay low before a replica is removed
    metrics_interval_s: float = 2.0  # how often replicas report their load to the autoscaler
    look_back_period_s: float = 10.0  # window the autoscaler averages the load over
    max_batch_size: int = 4  # same-shape jobs that arrive together and run as one packed pipeline call
    batch_wait_timeout_s: float = 0.2  # seconds a replica waits to fill a batch
    max_queue: int = 64  # unfinished jobs accepted; beyond, POST answers 429
    max_attempts: int = 3  # runs a job gets in all when its replica dies, before it is failed
    heartbeat_s: float = 2.0  # how often a replica stamps its running jobs
    stale_after_s: float = 60.0  # a running job unstamped for this long is presumed lost and re-queued
    health_check_period_s: float = 10.0  # Serve's health check period for both deployments
    health_check_timeout_s: float = 30.0  # a health check slower than this marks the replica unhealthy
    num_cpus: float = 1.0  # CPUs per generator replica
    num_gpus: float | None = None  # GPUs per generator replica (None: 1 if the Ray cluster has GPUs)
    torch_threads: int = 0  # intra-op threads per generator replica (0: torch's default)
    generator_nice: int = 10  # niceness added to generation threads (0-19; higher yields the CPU to the ingress more)
    # niceness of the ingress's event loop and the threads it starts (Ray starts every worker at 15;
    # 0: the API answers before Ray's workers and generation take the CPU; None: as Ray started it).
    # Raising a priority needs CAP_SYS_NICE or RLIMIT_NICE; without them the ingress warns and keeps Ray's
    ingress_nice: int | None = 0
    ingress_max_ongoing: int = 512  # concurrent HTTP requests per ingress replica (on http_port: connections too)
    poll_after_ms: int = 1000  # the openai-poll-after-ms hint on unfinished jobs
    fast_path: bool = True  # POST /v1/videos and GET /v1/videos/{id} skip FastAPI's routing (same answers, less CPU)
    http_port: int | None = None  # the ingress replica also answers HTTP itself on this port, no Serve proxy hop
    http_host: str = "127.0.0.1"  # the interface http_port listens on (0.0.0.0: all)
    remix_strength: float = DEFAULT_STRENGTH["edit"]  # SDEdit noise level of a remix without its own strength
    limits: Limits = field(default_factory=Limits)  # what one request may ask for (sora.request.Limits)
    http_limits: HTTPLimits = field(default_factory=HTTPLimits)  # body and upload sizes

    def __post_init__(self) -> None:
        if not (0 <= self.min_replicas <= self.max_replicas and self.max_replicas >= 1):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                             f"got {self.min_replicas}..{self.max_replicas}")
        for name in ("max_queue", "max_attempts", "max_batch_size", "ingress_max_ongoing"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.stale_after_s <= 2 * self.heartbeat_s:
            raise ValueError(f"stale_after_s ({self.stale_after_s}) must exceed two heartbeats "
                             f"(heartbeat_s {self.heartbeat_s})")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 (or None: from the cluster), got {self.num_gpus}")
        if not math.isfinite(self.lora_scale):
            raise ValueError(f"lora_scale must be a finite number, got {self.lora_scale}")
        if self.http_port is not None and not 0 < self.http_port < 65536:
            raise ValueError(f"http_port must be 1..65535 (or None: only Serve's proxy), got {self.http_port}")
        if not 0 <= self.generator_nice <= 19:
            raise ValueError(f"generator_nice must be 0..19 (0: the same CPU priority as the ingress), "
                             f"got {self.generator_nice}")
        if self.ingress_nice is not None and not -20 <= self.ingress_nice <= 19:
            raise ValueError(f"ingress_nice must be -20..19 (or None: as Ray started the replica), "
                             f"got {self.ingress_nice}")
        if not 0.0 <= self.remix_strength <= 1.0:
            raise ValueError(f"remix_strength must be in [0, 1], got {self.remix_strength}")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeConfig":
        """From a flat dict whose values may be strings (`serve run ... key=value`, YAML);
        `limits` / `http_limits` may be dicts of their fields. Unknown keys raise ValueError."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(args) - set(known)
        if unknown:
            raise ValueError(f"unknown serve options {sorted(unknown)}; known: {sorted(known)}")
        if "model" not in args:
            raise ValueError("serve needs model=MODEL_DIR")
        values = {}
        for k, v in args.items():
            if k not in ("limits", "http_limits"):
                try:
                    values[k] = _coerce(known[k].type, v)
                except ValueError as e:
                    raise ValueError(f"serve option {k}={v!r}: {e}") from e
        nested = {"limits": Limits, "http_limits": HTTPLimits}
        for key, kind in nested.items():
            given = args.get(key) or {}
            if not isinstance(given, kind):
                names = {f.name: f for f in fields(kind)}
                bad = set(given) - set(names)
                if bad:
                    other = next(k for k in nested if k != key)
                    raise ValueError(f"unknown {key} {sorted(bad)}; known: {sorted(names)} (the others belong "
                                     f"in {other}: {sorted(f.name for f in fields(nested[other]))})")
                given = kind(**{k: _coerce(names[k].type, v) for k, v in given.items()})
            values[key] = given
        return cls(**values)

    def to_args(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(annotation: Any, value: Any) -> Any:
    """A config value from text (serve run key=value, YAML) to its field's type."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in kind):
        return None
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    if kind.startswith("bool"):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    return str(value)
