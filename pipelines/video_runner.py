"""The generator side of the videos API: a `JobRunner` turns stored jobs into videos.

A plain class (testable without Serve) that `pipelines.serve.VideoGenerator` wraps: one
SoraPipeline; it claims job records from the store (`pipelines.video_jobs`), generates each
same-shape group (`GenerationRequest.shape_key`) as one packed `SoraPipeline.generate` call,
heartbeats its running jobs from a thread, and writes the video, a thumbnail, a spritesheet
and the final record. A group that fails is retried job by job, so only the job at fault fails.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import threading
import time
from typing import Any, Callable

from pipelines.serve_config import ServeConfig
from pipelines.stage import device_for
from pipelines.video_jobs import FINAL, JobStore, heartbeat_age

logger = logging.getLogger("ray.serve")  # lands in the replica's Serve log

# Called after every denoising step of every job: (step, steps, stage). Code, not configuration
# (e.g. a test slows generation down with it to kill a replica mid-job).
StepHook = Callable[[int, int, str], None]


def thumbnail_webp(frame) -> bytes:
    """(H, W, 3) uint8 -> WebP bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def spritesheet_jpeg(frames, max_tiles: int = 16) -> bytes:
    """(T, H, W, 3) uint8 -> a JPEG grid of up to ``max_tiles`` evenly spaced frames, row-major."""
    import numpy as np
    from PIL import Image

    T, H, W, _ = frames.shape
    n = min(T, max_tiles)
    idx = np.linspace(0, T - 1, n).round().astype(int)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = np.zeros((rows * H, cols * W, 3), dtype=np.uint8)
    for k, t in enumerate(idx):
        r, c = divmod(k, cols)
        sheet[r * H:(r + 1) * H, c * W:(c + 1) * W] = frames[t]
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class JobRunner:
    """One SoraPipeline; runs job ids from the store, heartbeats them, writes their results.
    `run_jobs` returns, per id: "completed", "failed", "deleted" or "busy" (running elsewhere)."""

    def __init__(self, cfg: ServeConfig, worker: str = "local", on_step: StepHook | None = None):
        import torch

        from sora.pipeline import SoraPipeline

        self.cfg = cfg
        self.on_step = on_step
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.pipe = SoraPipeline.from_pretrained(cfg.model, device=device_for(cfg.num_gpus), lora=cfg.lora,
                                                 lora_scale=cfg.lora_scale)
        self.store = JobStore(cfg.storage)
        self.worker = {"pid": os.getpid(), "replica": worker}
        self._lock = threading.Lock()  # guards _running and every record write of this replica
        self._running: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="sora-heartbeat", daemon=True)
        self._beat.start()

    def check(self) -> None:
        if not self._beat.is_alive():
            raise RuntimeError("the heartbeat thread died")

    def close(self) -> None:
        self._stop.set()

    # -- the job lifecycle ---------------------------------------------------------------

    def run_jobs(self, ids: list[str]) -> list[str]:
        outcome: dict[str, str] = {}
        claimed: list[dict[str, Any]] = []
        for vid in ids:
            rec = self.store.get(vid)
            if rec is None:
                outcome[vid] = "deleted"
            elif rec["status"] in FINAL:
                outcome[vid] = rec["status"]
            else:
                with self._lock:
                    fresh = rec["status"] == "in_progress" and heartbeat_age(rec) < self.cfg.stale_after_s
                    if vid in self._running or fresh:
                        outcome[vid] = "busy"
                        continue
                    now = time.time()
                    rec.update(status="in_progress", progress=0, attempts=int(rec.get("attempts", 0)) + 1,
                               worker=self.worker, started_at=now, heartbeat_at=now, error=None)
                    self._running[vid] = rec
                    self.store.put(rec)
                claimed.append(rec)
        groups: dict[str, list[dict[str, Any]]] = {}
        for rec in claimed:
            groups.setdefault(json.dumps(self.store.request_of(rec).shape_key()), []).append(rec)
        for group in groups.values():
            outcome.update(self._run_group(group))
        return [outcome[v] for v in ids]

    def _run_group(self, recs: list[dict[str, Any]]) -> dict[str, str]:
        try:
            frames = self._generate(recs)
        except Exception as e:  # noqa: BLE001
            if len(recs) > 1:  # find the job at fault: one by one
                out: dict[str, str] = {}
                for rec in recs:
                    out.update(self._run_group([rec]))
                return out
            logger.warning("job %s failed: %s: %s", recs[0]["id"], type(e).__name__, e)
            return {recs[0]["id"]: self._fail(recs[0], "generation_failed", f"{type(e).__name__}: {e}"[:500])}
        out = {}
        for rec, f in zip(recs, frames):
            try:
                out[rec["id"]] = self._finish(rec, f)
            except Exception as e:  # noqa: BLE001 - e.g. the store refused the write
                out[rec["id"]] = self._fail(rec, "output_failed", f"{type(e).__name__}: {e}"[:500])
        return out

    def _generate(self, recs: list[dict[str, Any]]) -> list:
        """One packed pipeline call for a same-shape group -> per job (T, H, W, 3) uint8."""
        reqs = [self.store.request_of(r) for r in recs]
        if reqs[0].mode == "edit":
            source = recs[0].get("remixed_from_video_id")
            src = None if source is None else self.store.get(source)
            if src is None or src.get("status") != "completed":
                raise RuntimeError(f"the source video {source} no longer exists")

        def on_step(step: int, steps: int, stage: str) -> None:
            with self._lock:
                for r in recs:
                    r["progress"] = min(95, 5 + int(90 * step / max(steps, 1)))
            if self.on_step is not None:
                self.on_step(step, steps, stage)

        return list(self.pipe.generate(reqs, callback=on_step).frames)

    def _finish(self, rec: dict[str, Any], frames) -> str:
        from sora.video_io import write_video

        vid = rec["id"]
        write_video(self.store.output_url(vid, "video"), frames, self.store.request_of(rec).fps)
        self.store.write_output(vid, "thumbnail", thumbnail_webp(frames[0]))
        self.store.write_output(vid, "spritesheet", spritesheet_jpeg(frames))
        return self._final(rec, status="completed", progress=100, completed_at=int(time.time()))

    def _fail(self, rec: dict[str, Any], code: str, message: str) -> str:
        return self._final(rec, status="failed", error={"code": code, "message": message})

    def _final(self, rec: dict[str, Any], **changes) -> str:
        vid = rec["id"]
        with self._lock:
            self._running.pop(vid, None)
            if self.store.is_deleted(vid):  # deleted while running: leave nothing behind
                self.store.remove_files(vid)
                return "deleted"
            rec.update(changes, heartbeat_at=time.time())
            self.store.put(rec)
        return rec["status"]

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat_s):
            with self._lock:
                for vid, rec in list(self._running.items()):
                    try:
                        if not self.store.is_deleted(vid):
                            rec["heartbeat_at"] = time.time()
                            self.store.put(rec)
                    except Exception as e:  # noqa: BLE001 - a storage hiccup must not kill the thread
                        logger.warning("heartbeat of %s failed: %s", vid, e)
