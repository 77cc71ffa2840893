"""The generation flow: bulk generation of a prompt file with Ray Data (on demand).

    from flows.generation import generation_flow
    generation_flow(model="runs/model", prompts="prompts.jsonl", out="runs/videos")
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact


@task(retries=2, retry_delay_seconds=2, log_prints=True)
def bulk_task(model: str, prompts: str, out: str) -> dict:
    from pipelines.generate_bulk import run_generate_bulk
    from pipelines.ray_utils import ensure_ray

    ensure_ray()
    summary = run_generate_bulk(model, prompts, out)
    print("generate-bulk:", {k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    return summary


@flow(name="sora-generation", log_prints=True)
def generation_flow(model: str, prompts: str, out: str) -> dict:
    """Generate every prompt of PROMPTS (JSONL/CSV/Parquet) not yet done into OUT."""
    summary = bulk_task(model, prompts, out)
    create_table_artifact(key="generation-summary",
                          table=[{"key": k, "value": str(v)} for k, v in summary.items() if not isinstance(v, (list, dict))])
    return summary
