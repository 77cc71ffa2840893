"""Run every benchmark side by side and write BENCHMARKS.md.

    python -m benchmarks.run_all                 # all of them
    python -m benchmarks.run_all --only video    # those whose file name contains "video"
    python -m benchmarks.run_all --quick         # pass --quick to each (smaller inputs)

Each `benchmarks/bench_*.py` prints JSON lines (see benchmarks/common.py); this collects
them into a table with the exact command that produced each figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def run_one(path: str, quick: bool, timeout: float) -> tuple[list[dict], str]:
    cmd = [sys.executable, "-m", f"benchmarks.{os.path.basename(path)[:-3]}"] + (["--quick"] if quick else [])
    print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:.0f} s"
    rows = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    err = "" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    sys.stderr.write(proc.stderr[-2000:])
    return rows, err


def fmt(v: float) -> str:
    return f"{v:.4g}"


def write_markdown(results: list[tuple[str, list[dict], str]], out: str, quick: bool) -> None:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python -m benchmarks.run_all{' --quick' if quick else ''}` on "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Baseline and ours run side by side "
        "in one process; ratio = ours / baseline.",
        "",
        "| benchmark | metric | baseline | ours | ratio | better | machine |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for path, rows, err in results:
        name = os.path.basename(path)
        if err:
            notes.append(f"- `{name}`: {err}")
        for r in rows:
            m = r.get("machine", {})
            mach = f"{m.get('cpus')} cpu" + (f", {m['gpu']}" if m.get("gpu") else "")
            better = "higher" if r["higher_is_better"] else "lower"
            lines.append(
                f"| {r['benchmark']} | {r['metric']}{' (' + r['unit'] + ')' if r.get('unit') else ''} | "
                f"{r['baseline']['name']}: {fmt(r['baseline']['value'])} | {r['ours']['name']}: {fmt(r['ours']['value'])} | "
                f"**{r['ratio']}** | {better} | {mach} |"
            )
            if r.get("extra"):
                notes.append(f"- `{r['benchmark']}` ({r['command']}): {json.dumps(r['extra'])}")
    if notes:
        lines += ["", "## Details", ""] + notes
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only benchmarks whose file name contains this")
    ap.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run)")
    ap.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"), help="markdown file to write")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark script")
    args = ap.parse_args()
    paths = sorted(p for p in glob.glob(os.path.join(HERE, "bench_*.py")) if args.only in os.path.basename(p))
    if not paths:
        print(f"no benchmark matches {args.only!r}", file=sys.stderr)
        return 2
    results = [(p, *run_one(p, args.quick, args.timeout)) for p in paths]
    write_markdown(results, args.out, args.quick)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(not err for _, _, err in results) else 1


if __name__ == "__main__":
    sys.exit(main())
