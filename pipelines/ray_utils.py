"""Connecting to Ray: the cluster at RAY_ADDRESS when set, else a local instance."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process. With RAY_ADDRESS set, join that cluster;
    otherwise start a local one without the dashboard (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # a private local instance: no token auth to set up (docs/setup-notes.md), no dashboard
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False)  # worker prints (training progress) reach the console


def has_gpus() -> bool:
    """Whether the Ray cluster has GPUs (stages then ask for `num_gpus`)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def table_blocks(table, batch_size: int, max_blocks: int = 256) -> list:
    """Cut a pyarrow table into about batch-sized slices (at most `max_blocks`) for
    `ray.data.from_arrow(list)`: one table is ONE block, which one actor of a pool takes whole
    (the rest idle, and progress moves only at the end). Cut on the driver because a
    `repartition` task waits forever for a CPU when the actor pool holds them all."""
    n = table.num_rows
    blocks = max(1, min(-(-n // max(1, batch_size)), max_blocks))
    step = max(1, -(-n // blocks))
    return [table.slice(i, step) for i in range(0, n, step)] or [table]
