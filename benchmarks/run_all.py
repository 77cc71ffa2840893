"""Run the benchmarks and write BENCHMARKS.md: the current figures, one row each, machine beside it.

    python -m benchmarks.run_all                      # every benchmarks/bench_*.py at full size
    python -m benchmarks.run_all --quick              # small inputs: a smoke run of every bench
    python -m benchmarks.run_all --only serve         # those whose file name contains "serve"
    python -m benchmarks.run_all --record             # also keep this run's rows in recorded.json
    python -m benchmarks.run_all --merge rows.jsonl   # keep rows a bench printed elsewhere (a GPU box)
    python -m benchmarks.run_all --render             # run nothing, re-render BENCHMARKS.md

BENCHMARKS.md is written whole, from two sources, every time:

1. "This run": the JSON lines the bench scripts just printed (see benchmarks/common.py), baseline
   and ours side by side, with the machine they ran on.
2. "Recorded figures": benchmarks/recorded.json, checked in. It holds the figures no bench script
   produces (a default `sora demo`'s held-out scores, training-run figures, one-off measurements)
   and the full-size bench rows kept with --record or --merge. One row per figure: a newer row
   for the same figure replaces the older one.

What was tried to reach these figures, and why the defaults are what they are, is in
docs/experiments.md; this script never touches it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RECORDED = os.path.join(HERE, "recorded.json")
FIGURE_KEYS = ("area", "figure", "value", "machine", "date", "how")
AREAS = ("demo", "training", "data", "curation", "generation", "serving", "open weights", "benchmark")


# ----------------------------------------------------------------------------- running benches


def run_one(path: str, quick: bool, timeout: float) -> tuple[list[dict], str]:
    """Run one bench script; return its JSON rows and "" or a one-line note of what went wrong."""
    cmd = [sys.executable, "-m", f"benchmarks.{os.path.basename(path)[:-3]}"] + (["--quick"] if quick else [])
    print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:.0f} s"
    rows = parse_rows(proc.stdout)
    sys.stderr.write(proc.stderr[-2000:])
    print(f"== {os.path.basename(path)}: {len(rows)} row(s) in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    if proc.returncode == 0:
        return rows, ""
    missing = re.search(r"No module named '([\w.]+)'", proc.stderr)
    if missing:
        return rows, f"skipped: needs `{missing.group(1)}` (`pip install -e '.[bench]'`)"
    last = proc.stderr.strip().splitlines()[-1:] or [""]
    return rows, f"exit {proc.returncode}: {last[0]}"


def parse_rows(text: str) -> list[dict]:
    """The benchmark rows among the lines of a bench script's output (other lines are ignored)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and {"benchmark", "metric", "baseline", "ours"} <= row.keys():
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- recorded figures


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_id(m: dict[str, Any]) -> str:
    """A stable name for a machine: cores, CPU model and GPU, e.g. "2cpu-amd-epyc"."""
    return slug(f"{m.get('cpus')}cpu {m.get('cpu') or ''} {m.get('gpu') or ''}")


def describe_machine(m: dict[str, Any]) -> str:
    parts = [f"{m.get('cpus')} cores", m.get("cpu") or "unknown CPU"]
    if m.get("isa"):
        parts.append(m["isa"])
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']:g} GiB")
    parts.append(m.get("gpu") or "no GPU")
    return ", ".join(parts)


def load_recorded(path: str = RECORDED) -> dict[str, Any]:
    """recorded.json, checked: every figure has FIGURE_KEYS, a known area and machine, an ISO date."""
    with open(path) as f:
        rec = json.load(f)
    machines, figures = rec.get("machines"), rec.get("figures")
    if not isinstance(machines, dict) or not isinstance(figures, list):
        raise ValueError(f"{path}: expected {{'machines': {{id: {{...}}}}, 'figures': [...]}}")
    seen = set()
    for i, fig in enumerate(figures):
        where = f"{path}: figures[{i}]"
        missing = [k for k in FIGURE_KEYS if not str(fig.get(k, "")).strip()]
        if missing:
            raise ValueError(f"{where} lacks {missing}: every figure says {list(FIGURE_KEYS)}")
        if fig["area"] not in AREAS:
            raise ValueError(f"{where}: area {fig['area']!r} is not one of {AREAS}")
        if fig["machine"] not in machines:
            raise ValueError(f"{where}: machine {fig['machine']!r} is not under 'machines' (add it there)")
        try:
            dt.date.fromisoformat(fig["date"])
        except ValueError:
            raise ValueError(f"{where}: date {fig['date']!r} is not YYYY-MM-DD") from None
        if fig["figure"] in seen:
            raise ValueError(f"{where}: figure {fig['figure']!r} appears twice (keep the latest only)")
        seen.add(fig["figure"])
    return rec


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def figure_from_row(row: dict[str, Any], date: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A bench row as a recorded figure (and the machine it ran on)."""
    m = row.get("machine", {})
    unit = f" {row['unit']}" if row.get("unit") else ""
    better = "higher" if row.get("higher_is_better") else "lower"
    value = (f"ours {fmt(row['ours']['value'])}{unit} ({row['ours']['name']}) vs baseline "
             f"{fmt(row['baseline']['value'])}{unit} ({row['baseline']['name']}): ratio {row.get('ratio')}, "
             f"{better} is better")
    figure = {"area": "benchmark", "figure": f"{row['benchmark']}: {row['metric']}", "value": value,
              "machine": machine_id(m), "date": date, "how": f"`python -m {module_of(row.get('command', ''))}`"}
    return figure, m


def module_of(command: str) -> str:
    """`benchmarks/bench_<name>.py --quick` -> `benchmarks.bench_<name> --quick`."""
    head, _, rest = command.partition(" ")
    mod = head[:-3].replace("/", ".") if head.endswith(".py") else head
    return f"{mod} {rest}".strip()


def merge_rows(rec: dict[str, Any], rows: list[dict[str, Any]], date: str) -> int:
    """Put bench rows into the recorded figures, replacing older rows of the same figure."""
    for row in rows:
        fig, m = figure_from_row(row, date)
        rec["machines"].setdefault(fig["machine"], {k: m.get(k) for k in ("cpus", "cpu", "isa", "memory_gib", "gpu")})
        figures = rec["figures"]
        same = [i for i, f in enumerate(figures) if f["figure"] == fig["figure"]]
        if same:
            figures[same[0]] = fig
        else:  # after the last figure of its area, so the file keeps its order by area
            area = [i for i, f in enumerate(figures) if f["area"] == fig["area"]]
            figures.insert(area[-1] + 1 if area else len(figures), fig)
    return len(rows)


def save_recorded(rec: dict[str, Any], path: str = RECORDED) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- BENCHMARKS.md


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def render(results: list[tuple[str, list[dict], str]], rec: dict[str, Any], *, quick: bool, ran: bool,
           now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    command = "python -m benchmarks.run_all" + (" --quick" if quick else "") + ("" if ran else " --render")
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {now:%Y-%m-%d %H:%M} UTC; do not edit it by hand. Figures that no",
        "bench script produces live in `benchmarks/recorded.json` (the second table is rendered from it).",
        "What was tried to reach them, and why the defaults are what they are: `docs/experiments.md`.",
        "",
    ]
    if ran:
        lines += [
            "## This run" + (" (`--quick`: small inputs, a smoke check, not figures to quote)" if quick else ""),
            "",
            "Baseline and ours run side by side in one process; ratio = ours / baseline.",
            "",
            "| benchmark | metric | baseline | ours | ratio | better | machine |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        notes = []
        for path, rows, err in results:
            if err:
                notes.append(f"- `{os.path.basename(path)}`: {cell(err)}")
            for r in rows:
                unit = f" ({cell(r['unit'])})" if r.get("unit") and r["unit"] not in r["metric"] else ""
                lines.append(
                    f"| {cell(r['benchmark'])} | {cell(r['metric'])}{unit} | "
                    f"{cell(r['baseline']['name'])}: {fmt(r['baseline']['value'])} | "
                    f"{cell(r['ours']['name'])}: {fmt(r['ours']['value'])} | **{fmt(r.get('ratio'))}** | "
                    f"{'higher' if r.get('higher_is_better') else 'lower'} | {cell(describe_machine(r.get('machine', {})))} |"
                )
        if notes:
            lines += ["", "Not measured in this run:", ""] + notes
        lines.append("")
    lines += [
        "## Recorded figures",
        "",
        "The latest figure of each kind, with the machine and the way it was measured.",
        "",
        "| area | figure | value | machine | date | how measured |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in sorted(rec["figures"], key=lambda f: AREAS.index(f["area"])):
        mach = describe_machine(rec["machines"][f["machine"]])
        lines.append(f"| {f['area']} | {cell(f['figure'])} | {cell(f['value'])} | {cell(mach)} | {f['date']} | {cell(f['how'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only benchmarks whose file name contains this")
    ap.add_argument("--quick", action="store_true", help="pass --quick to each bench (small inputs, a smoke run)")
    ap.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"), help="markdown file to write")
    ap.add_argument("--recorded", default=RECORDED, help="the recorded figures (JSON) to render and merge into")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per bench script (default 3600, quick 1800)")
    ap.add_argument("--record", action="store_true", help="keep this run's rows in the recorded figures")
    ap.add_argument("--merge", nargs="*", default=[], metavar="FILE",
                    help="JSON lines printed by bench scripts elsewhere (e.g. on a GPU machine) to keep")
    ap.add_argument("--render", action="store_true", help="run no bench; only re-render the recorded figures")
    args = ap.parse_args(argv)
    if args.record and (args.quick or args.render):
        raise SystemExit("run_all: --record keeps full-size figures; drop --quick/--render to record")
    rec = load_recorded(args.recorded)
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    merged = 0
    for path in args.merge:
        with open(path) as f:
            merged += merge_rows(rec, parse_rows(f.read()), today)
    results: list[tuple[str, list[dict], str]] = []
    if not args.render:
        paths = sorted(p for p in glob.glob(os.path.join(HERE, "bench_*.py")) if args.only in os.path.basename(p))
        if not paths:
            print(f"no benchmark matches {args.only!r}", file=sys.stderr)
            return 2
        timeout = args.timeout or (1800 if args.quick else 3600)
        results = [(p, *run_one(p, args.quick, timeout)) for p in paths]
        if args.record:
            merged += merge_rows(rec, [r for _, rows, _ in results for r in rows], today)
    if merged:
        save_recorded(rec, args.recorded)
        print(f"kept {merged} figure(s) in {args.recorded}", file=sys.stderr)
    text = render(results, rec, quick=args.quick, ran=not args.render)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    failed = [err for _, _, err in results if err and not err.startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
