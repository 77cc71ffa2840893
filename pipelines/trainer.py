"""The Ray Train loop shape every model trains through (DiT, VAE, captioner, upsampler), and
the one training-checkpoint format.

    driver:  result = run_trainer(train_loop_per_worker, config, workers=2, storage_path=..., name=...)
    worker:  ctx = ray.train.get_context()                       # rank, world size
             checkpoint = ray.train.get_checkpoint()             # set on a re-run or a restart
             state = load_checkpoint(checkpoint_url(checkpoint), model, optimizers) if checkpoint else {...}
             reports = MetricsReports(world, device)
             ... steps ...
             reports(metrics)                                    # every rank, the same steps; sent at most every 10 s
             report(metrics, model=model, optimizers=optimizers, state=state)   # with a checkpoint

A checkpoint is written with ``torch.distributed.checkpoint`` (DCP): model and optimizer state
come from ``torch.distributed.checkpoint.state_dict.get_state_dict`` (FQN-keyed, sharded
DTensors under FSDP2), and every rank writes only its own shards (replicated DDP tensors are
written once, by one rank) into a local temporary directory; Ray Train merges the ranks'
files into one checkpoint directory in the run's storage (a local path or any fsspec URL, e.g.
``s3://``). Beside the shards: ``state.json`` (steps, history, config; rank 0). Nothing is
gathered on one rank. Loading reads the shards each rank needs straight from storage
(``FsspecReader``), so a checkpoint written by N workers resumes on M. Exporting a model
consolidates on the driver (`load_tensors`: one process, no process group).

FOOTGUN: DCP keeps its index (``.metadata``) and non-tensor values as pickles. A training
checkpoint is only ever read from the run's own storage, written by this trainer; never point
a run at storage someone else can write. Published models are config.json + safetensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

from pipelines import storage

STATE_FILE = "state.json"

# Ray Train's controller takes a worker's next report when it polls the workers (its health
# check, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: 2 s by default) and a worker holds one report at
# a time, so a report made sooner than a poll after the one before waits for that poll, and the
# training loop with it. Metrics-only reports are kept at least this far apart (`MetricsReports`).
METRICS_EVERY_S = 10.0


def pyarrow_fs(url: str):
    """(pyarrow filesystem, path) for any fsspec URL, so Ray Train/Data use the same
    credentials and endpoints as the rest of the project (e.g. s3 on a custom endpoint)."""
    import pyarrow.fs as pafs

    fs, path = storage.fs_and_path(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def run_trainer(train_loop_per_worker: Callable[[dict], None], loop_config: dict[str, Any], *, workers: int,
                storage_path: str, name: str, cpus_per_worker: float = 1.0, use_gpu: bool = False,
                max_failures: int = 3, keep_checkpoints: int = 2, datasets: dict | None = None,
                placement: str = "pack"):
    """Run ``train_loop_per_worker(loop_config)`` on ``workers`` Ray Train workers (torch DDP
    process group set up by Ray: gloo on CPU, NCCL on GPU), placed "pack" (on as few nodes as
    hold them) or "spread" (each on another node where it can). Checkpoints go to
    ``storage_path/name``; the same storage path and name again resumes from the latest one
    (Ray Train V2). A dead worker (or a lost node) restarts the group, placed again on the
    nodes there are, from the last checkpoint, up to ``max_failures`` times. Returns the
    ``ray.train.Result``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store_fs, store_path = pyarrow_fs(storage_path)
    resources = {"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement.upper()),
        run_config=RunConfig(name=name, storage_path=store_path, storage_filesystem=store_fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
        datasets=datasets,
    )
    return trainer.fit()


def checkpoint_url(checkpoint) -> str:
    """Where a ``ray.train.Checkpoint`` lives, as a path or fsspec URL (for `load_checkpoint`)."""
    import pyarrow.fs as pafs

    fs = checkpoint.filesystem
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, pafs.FSSpecHandler):
        inner = fs.handler.fs
        protocol = inner.protocol if isinstance(inner.protocol, str) else inner.protocol[0]
        return checkpoint.path if protocol in ("file", "local") else inner.unstrip_protocol(checkpoint.path)
    if isinstance(fs, pafs.LocalFileSystem):
        return checkpoint.path
    return f"{fs.type_name}://{checkpoint.path}"


def read_state(url: str) -> dict[str, Any]:
    """The checkpoint's ``state.json``."""
    return storage.read_json(storage.join(url, STATE_FILE))


@contextlib.contextmanager
def _single_process_intended():
    """DCP warns whenever it runs without a process group; here that is the intent (a test, a
    one-worker run, the driver's export)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _reader(url: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url) if "://" in url else FileSystemReader(url)


def _options(trainable_only: bool):
    """DCP state-dict options: with ``trainable_only`` the frozen parameters (a LoRA run's base
    model, loaded from its own directory) are neither written nor expected when loading."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False) if trainable_only else None


def save_checkpoint(directory: str, model: nn.Module, optimizers, state: dict[str, Any],
                    extra: dict[str, torch.Tensor] | None = None, trainable_only: bool = False) -> None:
    """Every rank (a collective): write this rank's shards of the model, the optimizers and
    ``extra`` tensors (e.g. an EMA, held like the parameters) to ``directory`` with DCP; the
    coordinating rank also writes ``state.json`` (plain JSON values). Without a process group
    this process writes everything. ``trainable_only``: only the parameters that require grad."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizers, options=_options(trainable_only))
    alone = not (dist.is_available() and dist.is_initialized())
    with _single_process_intended():
        dcp.save({"model": model_sd, "optim": optim_sd, "extra": dict(extra or {})},
                 storage_writer=dcp.FileSystemWriter(directory), no_dist=alone)
    if alone or dist.get_rank() == 0:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)


def load_checkpoint(url: str, model: nn.Module, optimizers, extra: dict[str, torch.Tensor] | None = None,
                    trainable_only: bool = False) -> dict[str, Any]:
    """Inverse of `save_checkpoint`, on every rank (a collective) of any world size: loads the
    model, the optimizers and ``extra`` (in place) from ``url`` (a directory or fsspec URL);
    returns ``state.json``. ``trainable_only``: as saved (frozen parameters stay as they are)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not storage.exists(storage.join(url, ".metadata")):
        raise ValueError(f"{url} is not a sharded (torch.distributed.checkpoint) training checkpoint; it may come "
                         f"from an older version: train into a new output or run name")
    state = read_state(url)
    options = _options(trainable_only)
    # templates: this rank's shards, optimizer state initialised
    model_sd, optim_sd = get_state_dict(model, optimizers, options=options)
    sd = {"model": model_sd, "optim": optim_sd, "extra": dict(extra or {})}
    with _single_process_intended():  # strict: every tensor of the templates must be in the checkpoint
        dcp.load(sd, storage_reader=_reader(url), no_dist=not (dist.is_available() and dist.is_initialized()))
    set_state_dict(model, optimizers, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=options)
    return state


def load_tensors(url: str, template: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Consolidate parts of a checkpoint in this one process (no process group): ``template``
    maps a top-level key ("model", "extra") to full-size tensors, e.g. a fresh model's
    ``state_dict()``, which are filled in place from every rank's shards and returned."""
    import torch.distributed.checkpoint as dcp

    with _single_process_intended():
        dcp.load(template, storage_reader=_reader(url), no_dist=True)
    return template


def report(metrics: dict[str, Any], *, model: nn.Module | None = None, optimizers=None,
           state: dict[str, Any] | None = None, extra: dict[str, torch.Tensor] | None = None,
           trainable_only: bool = False) -> None:
    """``ray.train.report`` from every rank (a barrier: all ranks, the same steps). With
    ``model``, also a checkpoint (`save_checkpoint` into a temporary directory per rank, which
    Ray Train uploads and merges into one checkpoint in the run's storage)."""
    import ray.train

    if model is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, optimizers, state or {}, extra, trainable_only=trainable_only)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class MetricsReports:
    """Metrics-only `report` calls, at most one every ``every_s`` seconds of rank 0's clock, so a
    loop that logs often never waits on the controller. Call it at the same steps on every rank:
    rank 0's decision is broadcast (one float, on ``device``), then all ranks report or none does
    (a report is a barrier). `reported` restarts the clock (after a report with a checkpoint)."""

    def __init__(self, world: int, device: torch.device | str = "cpu", every_s: float = METRICS_EVERY_S):
        self.world, self.device, self.every_s = world, device, every_s
        self.last = time.monotonic()

    def due(self) -> bool:
        """Whether ``every_s`` has passed since the last report, by rank 0's clock (a collective)."""
        due = time.monotonic() - self.last >= self.every_s
        if self.world > 1:
            flag = torch.tensor([float(due)], device=self.device)
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def reported(self) -> None:
        self.last = time.monotonic()

    def __call__(self, metrics: dict[str, Any]) -> bool:
        """Report ``metrics`` if one is due; returns whether it did."""
        if not self.due():
            return False
        report(metrics)
        self.reported()
        return True


def report_directory(metrics: dict[str, Any], directory: str | None) -> None:
    """``ray.train.report`` from every rank, with the files of ``directory`` as the checkpoint
    where one is given: for runs whose result is a plain directory (a Hugging Face model that
    rank 0 saved), not a sharded training state."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


def default_run(out: str, storage_path: str | None, name: str | None, kind: str) -> tuple[str, str]:
    """(storage path, run name) for a run whose output directory is ``out``: storage defaults to
    ``OUT/_train`` beside it, the name to ``kind`` (the same name again resumes, where the loop
    resumes)."""
    root = storage_path or storage.join(out if "://" in out else os.path.abspath(out), "_train")
    return (root if "://" in root else os.path.abspath(root)), (name or kind)


def remove_run(storage_path: str, name: str, default_storage: bool) -> None:
    """Delete a finished run's directory (and the default storage directory once empty)."""
    fs, path = storage.fs_and_path(storage.join(storage_path, name))
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if default_storage and "://" not in storage_path:
        try:
            os.rmdir(storage_path)
        except OSError:  # other runs still there
            pass


def train_to_directory(train_loop_per_worker: Callable[[dict], None], loop_config: dict[str, Any], out: str, *,
                       kind: str, workers: int, cpus_per_worker: float, storage_path: str | None) -> dict[str, Any]:
    """A run from scratch whose checkpoint is a plain model directory (`report_directory`): the
    directory lands in ``out``, the run's storage is removed, the last metrics are returned."""
    import uuid

    store, name = default_run(out, storage_path, f"{kind}-{uuid.uuid4().hex[:8]}", kind)
    result = run_trainer(train_loop_per_worker, loop_config, workers=workers, cpus_per_worker=cpus_per_worker,
                         storage_path=store, name=name, max_failures=0, keep_checkpoints=1)
    if result.checkpoint is None:
        raise RuntimeError(f"{kind} training reported no model")
    result.checkpoint.to_directory(out)
    remove_run(store, name, default_storage=storage_path is None)
    return dict(result.metrics)
