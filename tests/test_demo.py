"""`sora demo --quick` end to end (a real subprocess: its own Ray, a temporary Prefect server):
what it writes, what its console shows (and what goes to its log file instead), then its report
rendered in headless Chromium and checked not to be blank."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = str(root / "demo")
    # (a fresh PREFECT_HOME registers Prefect's block types on every start: the demo uses none)
    env = dict(os.environ, PYTHONPATH=REPO, PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_BLOCKS_REGISTER_ON_START="false", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               HF_HUB_OFFLINE="1")
    env.pop("PREFECT_API_URL", None)
    env["RAY_ADDRESS"] = "local"  # a Ray of its own, whatever cluster runs on this machine
    console = root / "console.txt"  # a file, not a pipe: a process the demo leaves behind cannot hold the test
    with open(console, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--out", out, "--quick"], env=env, cwd=REPO,
                              stdout=f, stderr=subprocess.STDOUT, timeout=1800)  # a hang guard: a busy box takes 5x
    text = console.read_text(encoding="utf-8", errors="replace")
    assert proc.returncode == 0, text[-6000:]
    return out, text


def test_demo_quick_writes_metrics_samples_and_report(demo_dir):
    out, log = demo_dir
    assert "about" in log and "minutes" in log  # says how long it will take at the start
    assert "8/8 eval" in log  # shows progress through every phase
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    ev = metrics["eval"]
    assert ev["n"] == 6 and set(ev["accuracy"]) >= {"color", "shape", "size", "motion"}
    assert ev["size_correct"] == 1.0 and ev["frames_correct"] == 1.0
    assert metrics["vae"]["steps"] > 0 and metrics["dit"]["steps"] > 0
    from sora.model_dir import read_index

    assert read_index(os.path.join(out, "model"))["training"]["optimizer"] == "muon"  # the demo's recipe, via Ray Train
    assert set(metrics["captioner"]["accuracy"]) == {"color", "shape", "motion"}
    assert metrics["captioner"]["train"]["workers"] == min(2, os.cpu_count() or 1)  # both cores when there are two
    drafts = metrics["eval_draft"]  # drafts refined at full size, compared with their own drafts
    assert drafts["n"] == 2 and set(drafts["draft_agreement"]) >= {"color", "shape", "motion"}
    assert drafts["size_correct"] == 1.0 and drafts["frames_correct"] == 1.0
    from sora.shapes import make_eval_prompts

    trained = {(p["width"], p["height"]) for p in make_eval_prompts(6, seed=0)}  # the 64p sizes it trained on
    rows = json.load(open(os.path.join(out, "model", "eval_draft.json")))["rows"]
    assert {(r["width"] // 2, r["height"] // 2) for r in rows} <= trained  # refined at twice the trained sizes
    assert all(r["width"] % 2 == 0 and r["height"] % 2 == 0 and r["draft"] is not None for r in rows)
    html = open(os.path.join(out, "report.html")).read()
    assert "same as the draft" in html
    for name in ("t2v_16x9", "t2v_9x16", "t2v_2_39x1", "i2v", "extend_forward", "extend_backward", "join", "refined"):
        assert f"samples/{name}.mp4" in html and os.path.getsize(os.path.join(out, "samples", f"{name}.mp4")) > 0


def test_demo_console_shows_progress_once_and_logs_rays_output(demo_dir):
    """The terminal: the demo's own lines and one progress line per stage (count, rate, ETA), no
    line twice, none of Ray's chatter; DIR/logs/ray.log holds that chatter instead."""
    out, console = demo_dir
    lines = [line.strip() for line in re.split(r"[\r\n]+", console) if line.strip()]
    twice = [line for line, n in Counter(lines).items() if n > 1]
    assert not twice, twice
    for chatter in ("Failed to query", "Reporting training result", "core_worker.cc", "PreemptionWatcher",
                    "RayTrainWorker", "TrainController", "Running Dataset", "Loading weights", "Finished in state"):
        assert chatter not in console, (chatter, console[-3000:])
    # (the VAE and the captioner report every 25 / 10 steps: a loaded box may run fewer in --quick)
    for stage in ("synth clips", "ingest sources", "encode clips", "DiT training steps", "samples", "eval prompts"):
        assert re.search(rf"^{stage}: \d+.*\[\d+s\] \(", console, re.M), (stage, console[-3000:])
    assert re.search(r"^eval prompts: 6/6 \[\d+s\] \([\d.]+/s\)", console, re.M)  # the final state, with its rate
    ray_log = open(os.path.join(out, "logs", "ray.log"), encoding="utf-8").read()
    assert "Started a local Ray instance" in ray_log  # the driver's Ray loggers
    assert "Reporting training result" in ray_log  # Ray Train's worker lines
    steps = Counter(line for line in ray_log.splitlines() if "RayTrainWorker" in line and "[train] step " in line)
    assert steps and set(steps.values()) == {1}, steps  # each training worker line arrives once


def test_report_renders_in_headless_chromium(demo_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    out, _ = demo_dir
    shot = str(tmp_path / "report.png")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'u'}",
                    "--window-size=1200,1600", f"--screenshot={shot}", "file://" + os.path.join(out, "report.html")],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    # not blank: many distinct colours, real variation, and the dark title text is there
    assert img.std() > 10, img.std()
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 50
    assert (img.mean(axis=2) < 100).mean() > 0.001


def test_eval_task_rejects_a_fractional_size_scale():
    from flows.training import eval_task

    with pytest.raises(ValueError, match="size_scale"):
        eval_task.fn("no-model-needed", 2, size_scale=1.5)
