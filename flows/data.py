"""The data flow: ingest -> caption -> encode, each a retried Prefect task over a Ray stage.

    from flows.data import data_flow
    data_flow(sources=["data/raw"], data="data/ds", vae="runs/vae")

Runs on the local Ray by default, on a cluster when RAY_ADDRESS is set. Every stage is
idempotent, so a retried task or a re-run of the whole flow adds no rows.
Artifacts: per-stage counts and throughput, the bucket histogram.
"""

from __future__ import annotations


from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.charts import bar_chart, data_url
from flows.commands.common import Progress


@task(retries=2, retry_delay_seconds=2, log_prints=True)
def ingest_task(sources: list[str], data: str, min_motion: float = 0.0005, resolution: str | None = None) -> dict:
    from pipelines.ingest import IngestConfig, run_ingest
    from pipelines.ray_utils import ensure_ray

    ensure_ray()
    bar = Progress(None, "ingest sources")
    summary = run_ingest(sources, data, IngestConfig(min_motion=min_motion, resolution=resolution),
                         progress=lambda one, done, total: bar.update(done, total))
    print(f"ingest: {summary['clips']} clips, {summary['quarantine_rows']} quarantined, "
          f"{summary['sources_skipped_already_done']} sources already done")
    return summary


@task(retries=2, retry_delay_seconds=2, log_prints=True)
def caption_task(data: str, captioner: str | None = None, batch_size: int = 8) -> dict:
    from pipelines.caption import CaptionConfig, run_caption
    from pipelines.ray_utils import ensure_ray

    ensure_ray()
    bar = Progress(None, "caption clips")
    result = run_caption(data, CaptionConfig(model=captioner, batch_size=batch_size),
                         progress=lambda done, total: bar.update(done, total))
    print(f"caption: {result['captioned']} new, {result['already_captioned']} already captioned")
    return result


@task(retries=2, retry_delay_seconds=2, log_prints=True)
def encode_task(data: str, vae: str, text_encoder: str | None = None, actors: int | None = None) -> dict:
    from pipelines.encode import EncodeConfig, run_encode
    from pipelines.ray_utils import ensure_ray

    ensure_ray()
    bar = Progress(None, "encode clips")
    result = run_encode(data, EncodeConfig(vae=vae, text_encoder=text_encoder, actors=actors),
                        progress=lambda done, total: bar.update(done, total))
    print(f"encode: {result['encoded']} new, {result['already_encoded']} already encoded, {result['failed']} failed")
    return result


def _stage_rows(ingest: dict, caption: dict, encode: dict | None) -> list[dict]:
    rows = [{"stage": "ingest", "items": ingest["clips"], "rejected": ingest["quarantine_rows"],
             "seconds": ingest["wall_seconds"], "per_second": ingest.get("sources_per_second")},
            {"stage": "caption", "items": caption["captioned"], "rejected": caption.get("failed", 0),
             "seconds": caption["seconds"],
             "per_second": round(caption["captioned"] / caption["seconds"], 2) if caption["seconds"] else None}]
    if encode:
        rows.append({"stage": "encode", "items": encode["encoded"], "rejected": encode["failed"],
                     "seconds": encode["seconds"],
                     "per_second": round(encode["encoded"] / encode["seconds"], 2) if encode["seconds"] else None})
    return rows


@flow(name="sora-data", log_prints=True)
def data_flow(sources: list[str], data: str, vae: str | None = None, captioner: str | None = None,
              text_encoder: str | None = None, min_motion: float = 0.0005, resolution: str | None = None) -> dict:
    """ingest SOURCES -> DATA/clips, caption (a captioner model dir, or sidecar captions.jsonl),
    and, when a VAE is given, encode -> DATA/latents."""
    ingest = ingest_task(sources, data, min_motion, resolution)
    caption = caption_task(data, captioner)
    encode = encode_task(data, vae, text_encoder) if vae else None
    rows = _stage_rows(ingest, caption, encode)
    create_table_artifact(key="data-stage-counts", table=rows, description="per-stage counts and throughput")
    buckets = ingest.get("buckets", {})
    create_markdown_artifact(
        key="data-bucket-histogram",
        markdown="## Bucket histogram\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in buckets.items())
        + f"\n\n![buckets]({data_url(bar_chart(buckets, 'clips per bucket'))})",
    )
    return {"ingest": ingest, "caption": caption, "encode": encode, "stages": rows}


__all__ = ["data_flow", "ingest_task", "caption_task", "encode_task"]
