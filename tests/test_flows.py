"""Prefect flows on a real temporary Prefect server: re-runs add no rows, failing tasks retry,
deployments register with their schedules and a deployment run executes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as env:  # given back afterwards: later test modules see the environment as it was
        env.setenv("PREFECT_HOME", str(home))
        env.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        env.setenv("PREFECT_LOGGING_LEVEL", "WARNING")
        env.setenv("PREFECT_API_BLOCKS_REGISTER_ON_START", "false")  # a fresh database; these flows use no blocks
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value()


def _task_runs(flow_run_id):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def go():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(go())


def test_data_flow_is_idempotent_and_retries_a_failing_task(prefect_server, tmp_path, tiny_vae_dir, ray_session,
                                                             monkeypatch):
    import pipelines.ingest as ingest_mod
    from flows.data import data_flow
    from pipelines.ingest import read_clips
    from pipelines.latents import read_latents
    from sora.shapes import TINY, synth_dataset

    raw, data = str(tmp_path / "raw"), str(tmp_path / "ds")
    synth_dataset(raw, 8, seed=4, ranges=TINY)
    real = ingest_mod.run_ingest
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # the first attempt fails like a lost node would
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("simulated: lost the Ray cluster")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_mod, "run_ingest", flaky)
    state = data_flow(sources=[raw], data=data, vae=tiny_vae_dir, min_motion=0.0, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert calls["n"] == 2
    runs = {r.name.split("-")[0]: r for r in _task_runs(state.state_details.flow_run_id)}
    assert runs["ingest_task"].run_count == 2 and runs["ingest_task"].state.is_completed()
    n_clips, n_latents = read_clips(data).num_rows, read_latents(data).num_rows
    assert n_clips == 8 and n_latents == 8 and result["encode"]["encoded"] == 8
    # the same flow again: every stage skips what is done, no row is added
    again = data_flow(sources=[raw], data=data, vae=tiny_vae_dir, min_motion=0.0)
    assert again["ingest"]["sources_skipped_already_done"] == 8 and again["encode"]["encoded"] == 0
    assert read_clips(data).num_rows == n_clips and read_latents(data).num_rows == n_latents


def test_deployments_register_with_schedules_and_a_run_executes(prefect_server, tmp_path, ray_session):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from tiny_model import build_tiny_model

    model = build_tiny_model(str(tmp_path / "model"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"a red circle moving left {i}", "size": "32x32",
                                           "frames": 5, "seed": i}) + "\n" for i in range(3)))
    videos = str(tmp_path / "videos")
    env = dict(os.environ, PREFECT_API_URL=prefect_server, PYTHONPATH=REPO, RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    # the deployment's flow run joins this session's Ray by its address (RAY_ADDRESS as on a
    # cluster), whatever other cluster runs on this machine, rather than starting one of its own
    env["RAY_ADDRESS"] = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", "--sources", str(tmp_path / "raw"),
                             "--data", str(tmp_path / "ds"), "--model", model, "--prompts", str(prompts),
                             "--videos", videos], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "deploy.log", "w"), start_new_session=True)
    try:
        async def deployments():
            async with get_client() as client:
                return await client.read_deployments()

        deadline = time.monotonic() + 120
        found = {}
        while time.monotonic() < deadline and len(found) < 3:
            found = {d.name: d for d in asyncio.run(deployments())}
            time.sleep(1)
        assert set(found) == {"nightly", "weekly", "on-demand"}, (found, (tmp_path / "deploy.log").read_text()[-2000:])
        crons = {name: [s.schedule.cron for s in d.schedules] for name, d in found.items()}
        assert crons == {"nightly": ["0 2 * * *"], "weekly": ["0 4 * * 0"], "on-demand": []}
        run = run_deployment("sora-generation/on-demand", timeout=240)
        assert run.state.is_completed(), (run.state, (tmp_path / "deploy.log").read_text()[-3000:])
        from pipelines.generate_bulk import read_manifest

        manifest = read_manifest(videos).to_pylist()
        assert sorted(r["id"] for r in manifest) == ["p0", "p1", "p2"]
        assert all(r["status"] == "ok" for r in manifest), manifest
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
