"""Peak memory of ingest and encode against the corpus size: N small videos, then 10N.

    python -m benchmarks.bench_memory [--quick] [--videos N] [--scale 10] [--work DIR]
    python -m benchmarks.bench_memory --stages ingest --sizes 500,5000,20000 --work DIR

Memory that stays flat as the corpus grows is what lets a stage run on any corpus: the driver
must not hold every row of a stage's output, and a worker must not keep state per item it has
done. Each (stage, corpus) runs in a fresh driver process with its own local Ray (this script
with `--measure`); this process samples, every `--interval` seconds with psutil, the resident
memory (RSS) of that driver and of every process under it: the Ray workers (tasks and actors,
Ray Data's own actors) and their decode subprocesses; Ray's own services (GCS, raylet, agents)
are reported beside them. Figures, each at 10N over N, or with `--sizes` at each larger size over
the smallest (lower is better; flat memory reads 1.0, the goal is at most 1.2):

- the driver's peak RSS;
- the largest peak RSS of one worker process;
- (in "extra") the peak of the workers' summed RSS: shared pages, such as the object store's,
  count once per process that maps them.

The corpus is the shapes world (`sora.shapes`) at 64 pixels and 9 frames, its captions from the
sidecar it writes (`sora caption` without a model, not measured); encode uses a tiny random VAE
and the offline MiniLM text encoder. The corpus is made of parts of N videos (part i: seed i), a
corpus of k x N videos the first k parts; the parts, and each corpus's ingested DATA (reused by
`--stages encode`), are kept in `--work` (when given) for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from benchmarks.common import report, tiny_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
# Ray's own services: not workers of a stage (reported apart)
RAY_SERVICES = ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "dashboard/agent.py",
                "runtime_env/agent/main.py", "log_monitor.py", "monitor.py")


# ----------------------------------------------------------------------------- sampling


def label(cmdline: list[str]) -> str:
    """What a process under the driver is: "ray::<task or actor>", "decode worker", a Ray service."""
    line = " ".join(cmdline)
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split(" ")[0]
    if "sora.video_worker" in line:
        return "decode worker"
    for name in RAY_SERVICES:
        if name in line:
            return name.split("/")[-1]
    scripts = [os.path.basename(a) for a in cmdline[1:] if a.endswith(".py")]
    return " ".join([os.path.basename(cmdline[0]), *scripts[:1]]) if cmdline else "?"


def is_service(name: str) -> bool:
    return any(s.split("/")[-1] == name or s in name for s in RAY_SERVICES)


class TreeSampler:
    """Samples the RSS of a process (the driver) and of every process under it on a thread."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval = pid, interval
        self.driver = 0  # peak RSS of the driver, bytes
        self.workers_sum = 0  # peak of the summed RSS of the workers at one sample
        self.per_pid: dict[int, tuple[int, str]] = {}  # pid -> (peak RSS, the label it had at its peak)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    name = "driver" if p.pid == self.pid else label(p.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if p.pid == self.pid:
                    self.driver = max(self.driver, rss)
                    continue
                if rss > self.per_pid.get(p.pid, (0, ""))[0]:
                    self.per_pid[p.pid] = (rss, name)
                if not is_service(name):
                    total += rss
            self.workers_sum = max(self.workers_sum, total)
            self.samples += 1
            self._stop.wait(self.interval)

    def result(self) -> dict[str, Any]:
        workers = {pid: v for pid, v in self.per_pid.items() if not is_service(v[1])}
        by_label: dict[str, float] = {}
        for rss, name in self.per_pid.values():
            by_label[name] = max(by_label.get(name, 0), round(rss / MIB, 1))
        return {"driver_mib": round(self.driver / MIB, 1),
                "worker_mib": round(max((v[0] for v in workers.values()), default=0) / MIB, 1),
                "workers_sum_mib": round(self.workers_sum / MIB, 1),
                "worker_processes": len(workers), "peak_mib_by_process_kind": dict(sorted(by_label.items())),
                "samples": self.samples}


def measure(stage: str, args: list[str], work: str, interval: float) -> dict[str, Any]:
    """Run one stage in a fresh driver (`--measure`) while sampling its process tree."""
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--measure", stage, "--work", work, *args]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    log = os.path.join(work, "logs", f"{stage}-{time.strftime('%H%M%S')}.log")  # Ray's and the stage's output
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        with TreeSampler(proc.pid, interval) as sampler:
            out, _ = proc.communicate()
    if proc.returncode != 0:
        with open(log) as f:
            sys.stderr.write(f.read()[-3000:])
        raise SystemExit(f"bench_memory: `{' '.join(cmd[2:])}` failed with exit code {proc.returncode} (log: {log})")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return {**sampler.result(), "seconds": round(time.perf_counter() - t0, 1), "stage": json.loads(lines[-1])}


# ----------------------------------------------------------------------------- one stage, one driver


def start_ray(work: str) -> None:
    """A private local Ray for this driver (never a cluster another process runs here)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp = os.path.join(work, "ray")
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             _temp_dir=temp if len(temp) < 60 else None)  # Ray's socket paths are limited to ~100 characters


def run_stage(stage: str, work: str, data: str, sources: list[str], vae: str, actors: int | None) -> dict:
    import ray

    start_ray(work)
    try:
        if stage == "ingest":
            from pipelines.ingest import IngestConfig, run_ingest

            s = run_ingest(sources, data, IngestConfig(min_motion=0.0, actors=actors))
            return {k: s[k] for k in ("sources_listed", "sources_processed", "clips", "quarantine_rows")}
        from pipelines.encode import EncodeConfig, run_encode

        r = run_encode(data, EncodeConfig(vae=vae, actors=actors or 2, batch_size=8))
        return {k: r[k] for k in ("to_encode", "encoded", "failed")}
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- the corpus


def make_videos(root: str, n: int, seed: int) -> None:
    """n shapes-world clips at 64 pixels, 9 frames, and their captions.jsonl (kept when there)."""
    from sora.shapes import ClipRanges, synth_dataset

    done = os.path.join(root, "captions.jsonl")
    if os.path.exists(done):
        return
    synth_dataset(root, n, seed, ranges=ClipRanges(short_sides=(64,), frame_counts=(9,), fps=(8,)))


def corpus_sizes(args: argparse.Namespace) -> list[int]:
    """The corpus sizes to measure, smallest first: --sizes, or N and scale x N."""
    if args.sizes is None:
        n = args.videos or (50 if args.quick else 500)
        return [n, args.scale * n]
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"bench_memory: --sizes takes comma-separated numbers of videos, got {args.sizes!r}")
    if len(sizes) < 2 or sizes != sorted(set(sizes)) or sizes[0] < 1 or any(s % sizes[0] for s in sizes):
        raise SystemExit(f"bench_memory: --sizes takes two or more increasing sizes, each a multiple of the "
                         f"smallest (e.g. 500,5000,20000), got {args.sizes!r}")
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="50 and 500 videos instead of 500 and 5,000")
    ap.add_argument("--videos", type=int, default=None, help="N: the small corpus (default 500, quick 50)")
    ap.add_argument("--scale", type=int, default=10, help="the large corpus is scale x N videos")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated corpus sizes, smallest first, each a multiple of the smallest "
                         "(instead of --videos/--scale); each larger one is reported against the smallest")
    ap.add_argument("--stages", default="ingest,encode", help="comma-separated: ingest, encode")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between two samples of the process tree")
    ap.add_argument("--actors", type=int, default=None, help="workers per stage (default: one per CPU)")
    ap.add_argument("--work", default=None, help="working directory; its videos are kept for the next run")
    ap.add_argument("--measure", choices=("ingest", "encode"), help=argparse.SUPPRESS)  # the driver under test
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--sources", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        result = run_stage(args.measure, args.work, args.data, args.sources, os.path.join(args.work, "vae"), args.actors)
        print(json.dumps(result), flush=True)
        return

    sizes = corpus_sizes(args)
    stages = [s for s in args.stages.split(",") if s]
    if not stages or set(stages) - {"ingest", "encode"}:
        raise SystemExit(f"bench_memory: --stages takes ingest and/or encode, got {args.stages!r}")
    work = args.work or tempfile.mkdtemp(prefix="bench-memory-")
    os.makedirs(work, exist_ok=True)
    work = os.path.abspath(work)
    t0 = time.perf_counter()
    n = sizes[0]
    parts = [os.path.join(work, "raw", f"seed{i}-{n}") for i in range(sizes[-1] // n)]
    for i, part in enumerate(parts):
        make_videos(part, n, seed=i)
    synth_s = time.perf_counter() - t0
    print(f"corpus ready in {synth_s:.0f} s: {work}", file=sys.stderr, flush=True)
    corpora = {size: parts[:size // n] for size in sizes}
    extra_args = ["--actors", str(args.actors)] if args.actors else []
    results: dict[str, dict[int, dict]] = {s: {} for s in stages}
    for count, srcs in corpora.items():
        data = os.path.join(work, f"data-{count}")
        if "ingest" in stages or not os.path.isdir(data):
            shutil.rmtree(data, ignore_errors=True)
            r = measure("ingest", ["--data", data, "--sources", *srcs, *extra_args], work, args.interval)
            if "ingest" in stages:
                results["ingest"][count] = r
            print(f"ingest {count}: {json.dumps(r)}", file=sys.stderr, flush=True)
        if "encode" in stages:
            from pipelines.caption import CaptionConfig, run_caption

            shutil.rmtree(os.path.join(data, "latents"), ignore_errors=True)
            run_caption(data, CaptionConfig(model=None))  # the sidecars: not measured
            tiny_vae(work)
            r = measure("encode", ["--data", data, *extra_args], work, args.interval)
            results["encode"][count] = r
            print(f"encode {count}: {json.dumps(r)}", file=sys.stderr, flush=True)
    load = os.getloadavg()
    small = sizes[0]
    for stage in stages:
        for large in sizes[1:]:
            a, b = results[stage][small], results[stage][large]
            common = {"videos": [small, large], "goal_ratio_at_most": 1.2, "interval_s": args.interval,
                      "load_average_1_5_15": [round(x, 2) for x in load], "synth_s": round(synth_s, 1),
                      f"at_{small}": a, f"at_{large}": b}
            report(f"memory_{stage}", "driver peak RSS", (f"{small} videos", a["driver_mib"]),
                   (f"{large} videos", b["driver_mib"]), higher_is_better=False, unit="MiB", extra=common)
            report(f"memory_{stage}", "peak RSS of one worker", (f"{small} videos", a["worker_mib"]),
                   (f"{large} videos", b["worker_mib"]), higher_is_better=False, unit="MiB",
                   extra={"videos": [small, large], "goal_ratio_at_most": 1.2,
                          "workers_sum_mib": [a["workers_sum_mib"], b["workers_sum_mib"]]})
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
