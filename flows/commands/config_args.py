"""Command-line flags generated from a config dataclass, so each default is written once.

    p = sub.add_parser("train", ...)
    add_config_arguments(p, TrainConfig, exclude=("cond_mode_probs",))
    ...
    cfg = config_from_args(TrainConfig, args)

Each field ``lr: float = 1e-4  # peak learning rate`` becomes ``--lr LR`` with the help text
"peak learning rate (default: 0.0001)". The help is the field's trailing comment, or else the
comment lines directly above it. Types map to argparse as follows:

    bool                       --flag / --no-flag
    int, float, str            type=int / float / str
    X | None                   type X; the word "none" gives None
    Literal["a", "b"]          choices
    tuple[int, int, int]       "1,2,2" (comma-separated, exactly that many)
    tuple[int, ...]            "1,2,..." (comma-separated, any count)

A field of any other type (a dict, a nested config) cannot be a flag: leave it out with
``exclude`` or give it a flag of your own.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import types
import typing
from typing import Any, Iterable


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class source: the trailing ``# ...`` on the field's
    line, else the comment lines right above the field (joined). Fields of dataclass bases
    are read from their own class."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a frozen app): flags without help text
            continue
        out.update(_comments_in(source, {f.name for f in dataclasses.fields(klass)}))
    return out


def _comments_in(source: str, names: set[str]) -> dict[str, str]:
    lines = source.splitlines()
    trailing: dict[int, str] = {}  # line number (1-based) -> comment text on a code line
    own_line: dict[int, str] = {}  # line number -> comment text of a comment-only line
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, col = tok.start
        text = tok.string.lstrip("#").strip()
        (own_line if not lines[row - 1][:col].strip() else trailing)[row] = text
    out: dict[str, str] = {}
    body_indent = None
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        name = stripped.split(":", 1)[0].strip()
        if body_indent is None and name in names:
            body_indent = indent
        if indent != body_indent or name not in names or name in out:
            continue
        if i in trailing:
            out[name] = trailing[i]
            continue
        above, j = [], i - 1
        while j in own_line:
            above.insert(0, own_line[j])
            j -= 1
        if above:
            out[name] = " ".join(above)
    return out


def _optional_of(hint: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None`` / ``Optional[X]``, else (hint, False)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _tuple_parser(item: type, count: int | None, flag: str):
    def parse(text: str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = tuple(item(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated {item.__name__}s, got {text!r}") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"{flag} takes {count} comma-separated values, got {text!r}")
        return values

    parse.__name__ = f"{count or 'N'} x {item.__name__}"
    return parse


def _none_or(kind):
    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _argument(flag: str, hint: Any) -> dict[str, Any] | None:
    """argparse keyword arguments for a field of type ``hint``, or None if it has no flag form."""
    hint, optional = _optional_of(hint)
    origin = typing.get_origin(hint)
    if hint is bool:
        return None if optional else {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        kind = type(choices[0])
        return {"type": _none_or(kind) if optional else kind, "choices": choices + ((None,) if optional else ())}
    if hint in (int, float, str):
        return {"type": _none_or(hint) if optional else hint}
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
            parse = _tuple_parser(args[0], None, flag)
        elif args and all(a is args[0] for a in args) and args[0] in (int, float, str):
            parse = _tuple_parser(args[0], len(args), flag)
        else:
            return None
        return {"type": _none_or(parse) if optional else parse}
    return None


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                         include: Iterable[str] | None = None, exclude: Iterable[str] = (),
                         defaults: dict[str, Any] | None = None, flags: dict[str, str] | None = None,
                         help: dict[str, str] | None = None) -> list[str]:
    """Add one flag per field of dataclass ``cls`` to ``parser``; returns the field names added.

    include/exclude: which fields (default: all). defaults: a command's own default for a
    field (the dataclass's otherwise). flags: a field's flag when it is not ``--field-name``.
    help: a field's help when its comment does not read well on the command line. The flag's
    ``dest`` is always the field name, so ``config_from_args`` finds it."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    defaults, flags, help = defaults or {}, flags or {}, help or {}
    wanted = None if include is None else list(include)
    skip = set(exclude)
    unknown = (set(wanted or ()) | skip | set(defaults) | set(flags) | set(help)) - {f.name for f in dataclasses.fields(cls)}
    assert not unknown, f"{cls.__name__} has no fields {sorted(unknown)}"
    added = []
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in wanted if wanted is not None else list(by_name):
        f = by_name[name]
        if name in skip or not f.init:
            continue
        flag = flags.get(name, "--" + name.replace("_", "-"))
        kwargs = _argument(flag, hints[name])
        assert kwargs is not None, (
            f"{cls.__name__}.{name} ({hints[name]}) has no flag form: exclude it or add its flag by hand")
        if name in defaults:
            default = defaults[name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            kwargs["required"] = True
            default = None
        text = help.get(name, comments.get(name, ""))
        if not kwargs.get("required"):
            text = f"{text} (default: {_show(default)})" if text else f"(default: {_show(default)})"
        parser.add_argument(flag, dest=name, default=default, help=text.replace("%", "%%"), **kwargs)
        added.append(name)
    return added


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """An instance of ``cls`` from the flags ``add_config_arguments`` added (fields without a
    flag keep their defaults); ``overrides`` win over the flags."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)
