"""Flags generated from config dataclasses: help from field comments, types, defaults, round trip."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from flows.commands.config_args import add_config_arguments, config_from_args, field_comments


@dataclass
class Base:
    lr: float = 1e-4  # peak learning rate
    # how many workers train
    # (one process each)
    workers: int = 2


@dataclass
class Example(Base):
    name: str = "tiny"  # preset name
    bf16: bool = True  # autocast to bfloat16
    max_steps: int | None = 2000  # stop after this step (none: only by time)
    optimizer: Literal["adamw", "muon"] = "adamw"  # which optimizer
    patch: tuple[int, int, int] = (1, 2, 2)  # t,h,w cells per token
    drops: tuple[int, ...] = ()  # steps to drop
    probs: dict[str, float] = field(default_factory=dict)  # not a flag
    plain: float = 0.5


def parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x")
    add_config_arguments(p, Example, exclude=("probs",), **kw)
    return p


def test_comments_are_read_from_the_source_trailing_or_above():
    c = field_comments(Example)
    assert c["lr"] == "peak learning rate"
    assert c["workers"] == "how many workers train (one process each)"
    assert c["max_steps"] == "stop after this step (none: only by time)"
    assert "plain" not in c


def test_defaults_round_trip_to_an_equal_config():
    assert config_from_args(Example, parser().parse_args([])) == Example()


def test_every_type_parses():
    args = parser().parse_args(["--lr", "3e-4", "--workers", "4", "--no-bf16", "--max-steps", "none",
                                "--optimizer", "muon", "--patch", "1,4,4", "--drops", "3,5", "--name", "xl"])
    cfg = config_from_args(Example, args)
    assert cfg == Example(lr=3e-4, workers=4, bf16=False, max_steps=None, optimizer="muon", patch=(1, 4, 4),
                          drops=(3, 5), name="xl")


@pytest.mark.parametrize("argv", [["--optimizer", "sgd"], ["--patch", "1,2"], ["--patch", "a,b,c"],
                                  ["--workers", "two"]])
def test_bad_values_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    assert e.value.code == 2
    assert "x: error:" in capsys.readouterr().err


def test_help_shows_comment_and_default():
    text = parser().format_help()
    assert "peak learning rate (default: 0.0001)" in text
    assert "t,h,w cells per token (default: 1,2,2)" in text
    assert "--bf16, --no-bf16" in text


def test_command_defaults_flags_and_overrides():
    p = parser(defaults={"workers": 1}, flags={"max_steps": "--steps"})
    args = p.parse_args(["--steps", "7"])
    assert config_from_args(Example, args, name="small") == Example(workers=1, max_steps=7, name="small")


def test_a_field_without_a_flag_form_must_be_excluded():
    with pytest.raises(AssertionError, match="probs"):
        add_config_arguments(argparse.ArgumentParser(), Example)
    with pytest.raises(AssertionError, match="no fields"):
        add_config_arguments(argparse.ArgumentParser(), Example, exclude=("nope",))
