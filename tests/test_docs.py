"""The repository's documents and references hold together.

- Every Markdown file and repository path that a tracked file mentions (README, docs, code
  comments and docstrings, benchmarks, infra, tests) exists in the repository.
- Nothing points at a lab-diary entry by session number; findings are cited by topic.
- BENCHMARKS.md is what `python -m benchmarks.run_all` renders from benchmarks/recorded.json, and
  run_all merges bench rows into the recorded figures (one row per figure, machine beside it)
  without touching anything but its outputs.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import run_all

ROOT = Path(__file__).resolve().parents[1]
TOP_DIRS = ("sora", "pipelines", "flows", "benchmarks", "tests", "docs", "infra")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".json", ".txt", ".cfg", ".ini", ".sh", ""}

MD_REF = re.compile(r"(?<![\w/.-])((?:\.{1,2}/)*(?:[\w-]+/)*[\w-]+\.md)\b")
PATH_REF = re.compile(r"(?<![\w/.-])((?:%s)/[\w*.<>{}-]+(?:/[\w*.<>{}-]+)*)" % "|".join(TOP_DIRS))
URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+")
ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|"
            "fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|thirtieth|fortieth")
# Names of files the code writes (outputs), which a mention does not promise in the repository.
WRITTEN = {"gpu_check.md"}
SESSION_REF = re.compile(r"\b(?:(?:twenty|thirty|forty)-)?(?:%s)\s+(?:and\s+\w+\s+)?sessions?\b|\bsession\s+\d+\b"
                         % ORDINALS, re.IGNORECASE)


def tracked_files() -> list[Path]:
    """The repository's text files, except this one (its scanner test holds dangling examples)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / p for p in out.decode().split("\0") if p]
    return [f for f in files if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.name == "Dockerfile")
            and f != Path(__file__).resolve()]


def md_refs(text: str) -> list[str]:
    return MD_REF.findall(URL.sub(" ", text))


def path_refs(text: str) -> list[str]:
    refs = []
    for ref in PATH_REF.findall(URL.sub(" ", text)):
        ref = ref.rstrip(".,:;")
        if any(ch in ref for ch in "<>{}"):  # a template such as tests/<name>.py: not one file
            continue
        refs.append(ref)
    return refs


def resolves(ref: str, source: Path, names: set[str]) -> bool:
    """A reference resolves when it names a path of the repository, relative to the repository root
    or to the file that mentions it; a bare file name (no directory) may live in any directory."""
    if ref.rsplit("/", 1)[-1] in WRITTEN:
        return True
    for base in (ROOT, source.parent):
        target = (base / ref).resolve()
        if ROOT in (target, *target.parents) and (glob.glob(str(target)) if "*" in ref else target.exists()):
            return True
    return "/" not in ref and ref in names


def dangling(files: list[Path]) -> list[str]:
    names = {f.name for f in files}
    bad = []
    for f in files:
        text = f.read_text(errors="replace")
        for ref in sorted(set(md_refs(text)) | set(path_refs(text))):
            if not resolves(ref, f, names):
                bad.append(f"{f.relative_to(ROOT)}: {ref}")
    return bad


def test_the_reference_scanner_finds_what_it_should(tmp_path):
    """The matchers behind the repository-wide checks below, on text written for them."""
    missing_note = "DE" + "SIGN.md"  # spelt in two halves, so this file does not mention it
    text = (f"see {missing_note}, ../docs/SCALING.md and [a](docs/architecture.md); "
            "https://example.com/x/NOTES.md is a URL; `sora/dit.py`, sora/missing.py, benchmarks/bench_*.py, "
            "tests/<name>.py, DATA/clips/x.parquet.")
    assert md_refs(text) == [missing_note, "../docs/SCALING.md", "docs/architecture.md"]
    assert path_refs(text) == ["docs/architecture.md", "sora/dit.py", "sora/missing.py",
                               "benchmarks/bench_*.py"]
    src = ROOT / "infra" / "README.md"
    names = {f.name for f in tracked_files()}
    assert resolves("../docs/SCALING.md", src, names) and resolves("benchmarks/bench_*.py", src, names)
    assert not resolves(missing_note, src, names) and not resolves("sora/missing.py", src, names)
    assert not resolves("../../outside.md", src, names | {"outside.md"})
    diary = "BENCHMARKS.md, " + "twenty-first" + " session; (sixth and seventh " + "sessions)"
    assert len(SESSION_REF.findall(diary)) == 2
    assert not SESSION_REF.findall("one Ray per test session; the session fixture; session-scoped")


def test_every_markdown_file_and_repo_path_mentioned_exists():
    bad = dangling(tracked_files())
    assert not bad, "references to files the repository does not contain:\n" + "\n".join(bad)


def test_no_pointer_to_a_diary_session():
    bad = []
    for f in tracked_files():
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if SESSION_REF.search(line):
                bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "cite findings by topic (docs/experiments.md), not by session:\n" + "\n".join(bad)


def test_readme_keeps_its_ci_markers_and_points_at_the_docs():
    readme = (ROOT / "README.md").read_text()
    for marker in ("<!-- setup -->", "<!-- test -->"):
        after = readme.split(marker, 1)[1].lstrip("\n")
        assert readme.count(marker) == 1 and after.startswith("```bash\n"), marker
    for doc in ("docs/architecture.md", "docs/experiments.md", "BENCHMARKS.md"):
        assert f"]({doc})" in readme, doc


# --------------------------------------------------------------------------- BENCHMARKS.md


def section(markdown: str, heading: str) -> str:
    return markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_benchmarks_md_renders_the_recorded_figures():
    rec = run_all.load_recorded()
    md = (ROOT / "BENCHMARKS.md").read_text()
    assert md.startswith("# Benchmarks\n") and "Written by `python -m benchmarks.run_all" in md
    expected = section(run_all.render([], rec, quick=False, ran=False), "Recorded figures")
    assert section(md, "Recorded figures") == expected, "re-render: python -m benchmarks.run_all --render"
    rows = [line for line in expected.splitlines() if line.startswith("| ") and not line.startswith(("| area", "| ---"))]
    assert len(rows) == len(rec["figures"]) == len({f["figure"] for f in rec["figures"]})
    areas = {f["area"] for f in rec["figures"]}
    assert {"demo", "benchmark"} <= areas


def bench_row(benchmark: str, ours: float, *, gpu: str | None = None) -> dict:
    return {"benchmark": benchmark, "metric": "tokens/s", "unit": "", "higher_is_better": True,
            "baseline": {"name": "dense", "value": 100.0}, "ours": {"name": "packed", "value": ours},
            "ratio": ours / 100.0, "command": "benchmarks/bench_attention.py --tokens 4096",
            "machine": {"cpus": 16, "cpu": "Some CPU", "isa": "avx2", "memory_gib": 128, "gpu": gpu}}


def test_run_all_merges_rows_renders_and_touches_nothing_else(tmp_path):
    rec_path, out = tmp_path / "recorded.json", tmp_path / "BENCHMARKS.md"
    rec = run_all.load_recorded()
    rec_path.write_text(json.dumps(rec))
    rows = tmp_path / "gpu_rows.jsonl"
    rows.write_text("progress line\n" + json.dumps(bench_row("dit_packed_train_step", 250.0, gpu="NVIDIA H100")) + "\n"
                    + json.dumps(bench_row("brand_new_bench", 150.0)) + "\n{not json\n")
    experiments = ROOT / "docs" / "experiments.md"
    before = experiments.read_bytes()

    assert run_all.main(["--render", "--merge", str(rows), "--out", str(out), "--recorded", str(rec_path)]) == 0

    assert experiments.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["BENCHMARKS.md", "gpu_rows.jsonl", "recorded.json"]
    merged = run_all.load_recorded(str(rec_path))
    figures = {f["figure"]: f for f in merged["figures"]}
    assert len(merged["figures"]) == len(rec["figures"]) + 1  # one replaced in place, one new
    new = figures["dit_packed_train_step: tokens/s"]
    assert "ours 250" in new["value"] and "ratio 2.5" in new["value"]
    assert merged["machines"][new["machine"]]["gpu"] == "NVIDIA H100"
    assert new["how"] == "`python -m benchmarks.bench_attention --tokens 4096`"
    old_index = [f["figure"] for f in rec["figures"]].index("dit_packed_train_step: tokens/s")
    assert merged["figures"][old_index]["figure"] == "dit_packed_train_step: tokens/s"
    md = out.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| benchmark | dit_packed_train_step"))
    assert "16 cores, Some CPU, avx2, 128 GiB, NVIDIA H100" in row
    assert "## This run" not in md  # --render runs no bench
    assert md.count("dit_packed_train_step: tokens/s") == 1


def test_recorded_figures_are_checked(tmp_path):
    rec = run_all.load_recorded()
    cases = [
        ("how", None, "lacks ['how']"),
        ("machine", "a-machine-nobody-described", "is not under 'machines'"),
        ("area", "misc", "is not one of"),
        ("date", "4 Dec 2026", "is not YYYY-MM-DD"),
    ]
    for key, value, message in cases:
        broken = json.loads(json.dumps(rec))
        if value is None:
            del broken["figures"][0][key]
        else:
            broken["figures"][0][key] = value
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=re.escape(message)):
            run_all.load_recorded(str(path))
    twice = json.loads(json.dumps(rec))
    twice["figures"].append(dict(twice["figures"][0]))
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(ValueError, match="appears twice"):
        run_all.load_recorded(str(tmp_path / "twice.json"))
    with pytest.raises(SystemExit, match="--record keeps full-size figures"):
        run_all.main(["--quick", "--record", "--out", str(tmp_path / "x.md")])


def test_this_runs_table_has_one_row_per_bench_row_and_notes_what_did_not_run():
    rec = run_all.load_recorded()
    results = [("benchmarks/bench_attention.py", [bench_row("dit_packed_train_step", 250.0)], ""),
               ("benchmarks/bench_vae.py", [], "timed out after 1800 s"),
               ("benchmarks/bench_dit_vs_wan.py", [], "skipped: needs `diffusers` (`pip install -e '.[bench]'`)")]
    md = run_all.render(results, rec, quick=True, ran=True)
    assert "Written by `python -m benchmarks.run_all --quick`" in md
    this_run = section(md, "This run (`--quick`: small inputs, a smoke check, not figures to quote)")
    rows = [line for line in this_run.splitlines() if line.startswith("| dit_packed")]
    assert rows == ["| dit_packed_train_step | tokens/s | dense: 100 | packed: 250 | **2.5** | higher | "
                    "16 cores, Some CPU, avx2, 128 GiB, no GPU |"]
    assert "- `bench_vae.py`: timed out after 1800 s" in this_run and "`bench_dit_vs_wan.py`: skipped" in this_run
    assert section(md, "Recorded figures") == section(run_all.render([], rec, quick=False, ran=False), "Recorded figures")
