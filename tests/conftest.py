"""Shared test set-up: offline, one local Ray per test process (started only if a test asks;
the README's command runs two processes, `-n 2`, each taking whole files, the longest first),
GPU skips."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Offline and quiet everywhere (docs/setup-notes.md). Set before anything imports transformers or ray.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train on the test's one-node Ray: nothing preempts it, so no preemption-watcher actor per
# run; the controller polls its workers every 0.5 s instead of 2 s (a run ends that much sooner)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# A test session runs stage after stage on one Ray: its idle worker processes stay up for the next
# one (Ray kills those past one per CPU after a second idle, and each new one boots and imports
# again: test_train.py 139-149 busy CPU-s with them kept against 155-161)
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
# the commands tests start run on a Ray of their own, never on a cluster that another process
# (another test session, a test's ray.cluster_utils.Cluster) runs on this machine
os.environ.setdefault("RAY_ADDRESS", "local")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


# The files that take longest on 2 cores, longest first. The README's command hands whole files
# (`--dist loadfile`) to two test processes in collection order (`--no-loadscope-reorder`; xdist
# would otherwise start the files with the most tests first), each taking the next file when it
# is free: starting the long ones first lets both processes end together
# (longest-processing-time-first scheduling). The multi-node scenarios, the longest file, come
# first: started last, the other process would sit idle for their whole run.
LONGEST_FIRST = ("test_multinode.py", "test_demo.py", "test_train.py", "test_serve.py", "test_train_wan.py",
                 "test_ingest.py", "test_flows.py", "test_upsampler.py", "test_train_vae.py", "test_generate_bulk.py",
                 "test_train_captioner.py", "test_caption.py", "test_ingest_scores.py", "test_captioner.py",
                 "test_encode.py", "test_video_io.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every other file keeps its place
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session of this process (ray.init takes ~3 s).

    Its temp dir lives under the checkout's .tmp so nothing lands outside it (keep that
    path short: Ray's unix sockets have a ~100-character path limit)."""
    import ray

    os.makedirs(os.path.join(REPO, ".tmp"), exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir=os.path.join(REPO, ".tmp"))
    ray.init(
        address="local",  # a new instance of our own, even with RAY_ADDRESS set in the environment
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def shapes_ds(tmp_path_factory):
    """A small ingested + captioned shapes-world dataset (24 tiny clips, sidecar captions).

    Built with the sequential ingest (no Ray needed); tests must not modify it: copy it first."""
    from pipelines.caption import CaptionConfig, run_caption
    from pipelines.ingest import IngestConfig, run_sequential
    from sora.shapes import TINY, synth_dataset

    root = tmp_path_factory.mktemp("shapes")
    raw, data = str(root / "raw"), str(root / "ds")
    synth_dataset(raw, 24, seed=3, ranges=TINY)
    run_sequential([raw], data, IngestConfig(min_motion=0.0))
    run_caption(data, CaptionConfig(model=None))
    return data


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A tiny random-init CausalVideoVAE saved with save_pretrained."""
    import torch

    from sora.vae import CausalVideoVAE, VAEConfig

    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("vae") / "vae")
    CausalVideoVAE(VAEConfig.preset("tiny")).save_pretrained(d)
    return d


@pytest.fixture
def single_thread():
    """One intra-op torch thread for the test: tiny ops on a shared 2-core box run far faster on
    one thread than on two oversubscribed ones, and bit-level results then do not depend on the
    machine's thread count (use with `pytestmark = pytest.mark.usefixtures("single_thread")`)."""
    from threads import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny RANDOM model directory of tests/tiny_model.py, built once per session through
    `SoraPipeline.save_pretrained`; tests must not modify it (copy it first)."""
    from tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def wan_dirs(tmp_path_factory):
    """Tiny RANDOM diffusers Wan directories (tests/wan_tiny.py): "t2v" (Wan 2.1 text-to-video
    style) and "ti2v" (Wan 2.2 TI2V style), built once per session; tests must not modify them."""
    from wan_tiny import build_tiny_wan

    root = tmp_path_factory.mktemp("wan")
    return {f: build_tiny_wan(str(root / f), f) for f in ("t2v", "ti2v")}


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """Inputs for the generation modes, 64x48: a.mp4 (a red square crossing a textured
    background, 13 frames at 8 fps), b.mp4 (a green one), first.png (a.mp4's first frame)."""
    from PIL import Image

    from sora.video_io import write_video
    from tiny_model import moving_square

    d = tmp_path_factory.mktemp("media")
    write_video(str(d / "a.mp4"), moving_square(64, 48, 13), 8)
    write_video(str(d / "b.mp4"), moving_square(64, 48, 13, color=(0, 255, 0), seed=1), 8)
    Image.fromarray(moving_square(64, 48, 1)[0]).save(d / "first.png")
    return d


@pytest.fixture
def loopback_s3(monkeypatch):
    """A fresh empty bucket on moto's S3 server on 127.0.0.1 (endpoint from fsspec config, as
    FSSPEC_S3_ENDPOINT_URL would set it); its URL, ``s3://NAME``."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import uuid

    import fsspec
    import fsspec.config

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})
        bucket = f"test-{uuid.uuid4().hex[:12]}"  # moto keeps buckets per process: a name of its own
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
