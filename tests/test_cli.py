"""The CLI: every subcommand explains itself with an example, and bad input is a clear error."""

import os
import subprocess
import sys

import pytest

from flows.cli import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    for name in subcommands():
        assert name in out


@pytest.mark.parametrize("name", subcommands())
def test_each_subcommand_has_help_with_an_example(name, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"sora {name}" in out, out


def test_unknown_command_fails_cleanly():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "frobnicate"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.parametrize("command", ["train-captioner", "train-vae"])
@pytest.mark.parametrize("exists", [False, True])
def test_training_on_a_missing_or_empty_dataset_says_so(command, exists, tmp_path, ray_session):
    from flows.cli import main

    data = tmp_path / "ds"
    if exists:
        data.mkdir()
    with pytest.raises(SystemExit) as exc:
        main([command, "--data", str(data), "--out", str(tmp_path / "out")])
    message = str(exc.value.code)
    want = "the dataset has no clips" if exists else "no such dataset"
    assert message.startswith(f"sora {command}: {data}: {want}"), message
    assert f"sora ingest SOURCES --out {data}" in message
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_progress_line_shows_rate_and_eta_and_never_repeats_itself(monkeypatch):
    import io

    import flows.commands.common as common

    clock = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    log = io.StringIO()  # not a terminal: a fresh line when the count moved, at most every 5 s
    bar = common.Progress(10, "clips", stream=log, budget_s=60)
    # 6 s: nothing new to say; 10 s: too soon after 8 s; 19 s: the final state was shown
    for t, done in ((0, 0), (6, 0), (8, 4), (10, 5), (18, 10), (19, 10)):
        clock[0] = 100.0 + t
        bar.update(done, note="ok")
    bar.finish()
    assert log.getvalue().splitlines() == [
        "clips: 0/10 [0s] (-/s, eta 60s) ok",  # no rate yet: the ETA is the budget's
        "clips: 4/10 [8s] (0.50/s, eta 12s) ok",  # the count's ETA, sooner than the budget's 52 s
        "clips: 10/10 [18s] (0.56/s) ok",  # the final state, once
    ]


def test_worker_step_lines_become_one_progress_line_per_training_loop(monkeypatch):
    import io

    import flows.commands.common as common

    clock = [0.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    monkeypatch.setattr(common, "_terminal", log)
    bars = common.WorkerProgress()
    bars.budget("train", 120)
    from pipelines.ray_utils import PROGRESS_LINE

    for t, line in ((0, "[train] step 10/30 | epoch 0 | loss 0.5000 | 300 tok/s"),
                    (10, "[train] step 20/30 | epoch 1 | loss 0.2500 | 300 tok/s"),
                    (20, "[train] step 30/30 | epoch 2 | loss 0.1250 | 300 tok/s"),
                    (30, "[train-vae] step 25 loss 0.0100 psnr 20.00 dB (0.5/7.0 min)")):
        clock[0] = t
        m = PROGRESS_LINE.match(line)
        bars(m["tag"], int(m["step"]), int(m["total"]) if m["total"] else None, m["rest"])
    common.finish_progress()
    assert log.getvalue().splitlines() == [
        "DiT training steps: 10/30 [0s] (-/s, eta 120s) loss 0.5000",  # the rate counts from the first line
        "DiT training steps: 20/30 [10s] (1.00/s, eta 10s) loss 0.2500",
        "DiT training steps: 30/30 [20s] (1.00/s) loss 0.1250",
        "VAE training steps: 25 [0s] (-/s) loss 0.0100",
    ]


def test_ray_log_sends_rays_native_lines_to_its_file_and_passes_the_rest(tmp_path, capfd):
    """RayLog puts a filter on file descriptor 2: a line in the format of Ray's C++ logger goes to
    the log file, anything else written there reaches the terminal unchanged."""
    import os as os_

    from pipelines.ray_utils import RayLog

    path = tmp_path / "logs" / "ray.log"
    native = b"[2026-12-06 13:47:03,400 E 7001 7001] core_worker.cc:2465: Actor with class name: 'X'\n"
    with RayLog(str(path)):
        os_.write(2, native)
        os_.write(2, b"a line of our own\n")
        os_.write(2, b"\rredrawn progress")  # a partial line goes out at once
        print("a Python warning of ours", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert "a line of our own\n" in err and "\rredrawn progress" in err and "a Python warning of ours" in err
    assert "core_worker.cc" not in err
    assert native.decode() in path.read_text()
    os_.write(2, b"after\n")  # descriptor 2 is given back
    assert capfd.readouterr().err == "after\n"


def test_a_stale_ray_address_file_does_not_hang_a_command(monkeypatch):
    """`ray start` leaves the cluster's address in TEMP/ray/ray_current_cluster, and a file whose
    cluster is gone would make a bare `ray.init()` retry it forever: a command starts its own
    local Ray instead, and joins the cluster only while its GCS answers."""
    import shutil
    import socket
    import tempfile

    from pipelines.ray_utils import running_local_cluster

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    os.makedirs(os.path.join(temp, "ray"))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
        f.write(f"127.0.0.1:{dead}")
    env = dict(os.environ, RAY_TMPDIR=temp, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    code = ("from pipelines.ray_utils import ensure_ray, running_local_cluster; import ray\n"
            "assert running_local_cluster() is None\n"
            "ensure_ray(num_cpus=1); print('cpus', ray.cluster_resources()['CPU']); ray.shutdown()")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "cpus 1.0" in proc.stdout, proc.stderr[-2000:]
    # a live address is the one a command joins
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
            f.write(f"127.0.0.1:{live.getsockname()[1]}")
        monkeypatch.setenv("RAY_TMPDIR", temp)
        assert running_local_cluster() == f"127.0.0.1:{live.getsockname()[1]}"
        # RAY_ADDRESS=local: a private local Ray all the same (what ray.init is asked for)
        import ray

        import pipelines.ray_utils as ray_utils

        asked = []
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", lambda **kw: asked.append(kw))
        monkeypatch.setenv("RAY_ADDRESS", "local")
        ray_utils.ensure_ray(num_cpus=1)
        monkeypatch.delenv("RAY_ADDRESS")
        ray_utils.ensure_ray(num_cpus=1)
        assert [kw.get("address") for kw in asked] == ["local", f"127.0.0.1:{live.getsockname()[1]}"], asked
    shutil.rmtree(temp, ignore_errors=True)


def test_a_command_keeps_the_large_blocks_its_work_frees(tmp_path):
    """A `sora` command's process serves every block from the heap and keeps what it frees
    (`sora.process_memory`): a model's activations and decoded frames are not faulted in again
    item after item; and its exit skips the collector's last walk over what it loaded (an object
    in a cycle is not finalized there). A fresh interpreter: both are per process."""
    from sora.process_memory import MODEL_TRIM_MB, _glibc

    code = ("import sys; from flows.cli import main; from sora.process_memory import kept_memory\n"
            "class Cycle:\n"
            "    def __del__(self): print('walked at exit', flush=True)\n"
            "c = Cycle(); c.me = c\n"
            "assert kept_memory() is None\n"
            "main(['synth', '--out', sys.argv[1], '--n', '1'])\n"
            "print(kept_memory())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "raw")], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "raw" / "captions.jsonl").exists()
    expected = (MODEL_TRIM_MB, None) if _glibc() is not None else None
    assert out.stdout.strip().splitlines()[-1] == str(expected), out.stdout
    assert "walked at exit" not in out.stdout, out.stdout
