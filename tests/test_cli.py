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
