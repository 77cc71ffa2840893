"""Deployments: the data flow nightly, the training flow weekly, generation on demand.

`sora deploy ...` registers the three deployments on the Prefect server at PREFECT_API_URL
(or a temporary local one) and serves them from this process: scheduled runs and runs
triggered from the UI/API (`prefect deployment run sora-generation/generation`) execute here.
For a Kubernetes work pool instead, see prefect.yaml at the repository root.
"""

from __future__ import annotations

from dataclasses import dataclass

DATA_CRON = "0 2 * * *"  # nightly at 02:00
TRAINING_CRON = "0 4 * * 0"  # weekly, Sunday 04:00


@dataclass
class DeploySettings:
    sources: list[str]  # raw video sources for the nightly data flow
    data: str  # dataset directory or URL
    model: str  # model directory the training flow writes (and generation reads)
    vae: str | None = None  # VAE directory (none: the training flow trains one)
    publish_to: str | None = None  # where trained models are published (dir or URL)
    training_minutes: float = 20.0  # DiT training budget per weekly run
    prompts: str | None = None  # default prompt file for on-demand generation
    videos: str | None = None  # default output directory of on-demand generation
    timezone: str = "UTC"  # time zone of the cron schedules


def build_deployments(s: DeploySettings) -> list:
    from prefect.client.schemas.schedules import CronSchedule

    from flows.data import data_flow
    from flows.generation import generation_flow
    from flows.training import training_flow

    return [
        data_flow.to_deployment(
            name="nightly", schedule=CronSchedule(cron=DATA_CRON, timezone=s.timezone),
            parameters={"sources": s.sources, "data": s.data, "vae": s.vae},
            description="ingest -> caption -> encode, nightly", tags=["sora", "data"]),
        training_flow.to_deployment(
            name="weekly", schedule=CronSchedule(cron=TRAINING_CRON, timezone=s.timezone),
            parameters={"data": s.data, "out": s.model, "vae": s.vae, "max_minutes": s.training_minutes,
                        "publish_to": s.publish_to},
            description="train -> eval -> publish, weekly", tags=["sora", "training"]),
        generation_flow.to_deployment(
            name="on-demand",
            parameters={"model": s.model, "prompts": s.prompts or "", "out": s.videos or ""},
            description="bulk generation of a prompt file, on demand", tags=["sora", "generation"]),
    ]


def serve_deployments(s: DeploySettings) -> None:
    """Register and serve (blocks; Ctrl-C stops serving, the deployments stay registered)."""
    from prefect import serve

    serve(*build_deployments(s), print_starting_message=True)
