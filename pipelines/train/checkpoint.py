"""DiT training state: the EMA of the weights, sharded checkpoints (`pipelines.trainer`), and
the export of a checkpoint to the model directory generation loads (``sora.model_dir``)."""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines import trainer
from pipelines.train.config import TrainConfig
from sora.dit import DiT, DiTConfig
from sora.optim import Muon

# Text encoder names the encode stage writes for the offline default (path None in the index).
DEFAULT_TEXT_ENCODERS = ("minilm", "", None)


class EMA:
    """Exponential moving average of the parameters, held like the parameters themselves
    (sharded DTensors under FSDP2, so it costs 1/world of the model per worker, and each rank
    checkpoints only its shards).

    The decay warms up as min(decay, (1 + u) / (10 + u)) after u updates, so early weights do
    not linger: a decay d only takes effect after ~9 / (1 - d) updates (0.995: ~1,800; 0.998:
    ~4,500; 0.9999: ~90,000). Until then the average spans about the last u / 9 steps.

    Only the parameters that require grad are averaged (a LoRA run: the adapter's)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(p.detach().float(), 1.0 - d)


def _trainable_only(model: nn.Module) -> bool:
    """Whether some parameters are frozen (a LoRA run): then checkpoints hold only the others."""
    return not all(p.requires_grad for p in model.parameters())


def save_checkpoint(directory: str, model: nn.Module, optimizer, ema: EMA, state: dict) -> None:
    """Every rank: its shards of model (the parameters that require grad, when some are
    frozen), optimizer(s) and EMA to ``directory`` (DCP), plus state.json (see
    `pipelines.trainer.save_checkpoint`)."""
    trainer.save_checkpoint(directory, model, optimizer, {**state, "ema_updates": ema.updates}, extra=ema.shadow,
                            trainable_only=_trainable_only(model))


def load_checkpoint(url: str, model: nn.Module, optimizer, ema: EMA, identity: dict | None = None) -> dict:
    """Inverse of `save_checkpoint` on every rank, whatever the number of ranks that wrote it.
    A checkpoint of the other optimizer is an error: its moments mean nothing to this one; so
    is one of another model (``identity``: `pipelines.train.models.ModelPlan.identity`)."""
    saved_state = trainer.read_state(url)
    if identity is not None:
        from pipelines.train.models import check_resumable

        check_resumable(saved_state, identity, url)
    saved = saved_state.get("optimizer", "adamw")
    ours = "muon" if any(isinstance(o, Muon) for o in optimizer) else "adamw"
    if saved != ours:
        raise ValueError(f"the checkpoint in {url} was trained with optimizer={saved!r}; resume it with "
                         f"the same optimizer (or start a new run name)")
    state = trainer.load_checkpoint(url, model, optimizer, extra=ema.shadow, trainable_only=_trainable_only(model))
    ema.updates = state["ema_updates"]
    return state


def text_encoder_reference(name: str | None) -> str | None:
    """The index's text encoder path from the latents' ``text_encoder`` column: the offline
    MiniLM default is ``None``; anything else is the directory the encode stage used."""
    if name in DEFAULT_TEXT_ENCODERS:
        return None
    return os.path.abspath(name) if os.path.isdir(name) else name


def load_ema(url: str) -> tuple[DiT, dict]:
    """The checkpoint's EMA weights as a DiT, consolidated in this process, and its state.json."""
    state = trainer.read_state(url)
    dit = DiT(DiTConfig.from_dict(state["dit_config"]))
    trainer.load_tensors(url, {"extra": {n: p.detach() for n, p in dit.named_parameters()}})  # in place
    return dit, state


def export_model(checkpoint: str, out: str, vae: str, info: dict, cfg: TrainConfig, data: str) -> dict[str, Any]:
    """A checkpoint (path or URL) -> the model directory generation loads (see sora.model_dir):
    dit/ from the EMA weights, vae/ copied, model_index.json with the text encoder reference."""
    from sora.model_dir import default_index, write_index

    dit, state = load_ema(checkpoint)
    os.makedirs(out, exist_ok=True)
    dit.save_pretrained(os.path.join(out, "dit"))
    if os.path.abspath(vae) != os.path.abspath(os.path.join(out, "vae")):
        shutil.copytree(vae, os.path.join(out, "vae"), dirs_exist_ok=True)
    losses = [l for _, l in state["history"] if math.isfinite(l)]
    tail = losses[-max(1, min(50, len(losses) // 10)):] if losses else []
    index = default_index()
    index["text_encoder"]["path"] = text_encoder_reference(info["text_encoder"])
    index["patch_size"] = list(info["patch_size"])
    # resolution_shift's clamp (sora.flow) is what training used
    index["flow"].update(base_shift=cfg.base_shift, base_tokens=cfg.base_tokens or 0, max_shift=8.0,
                         max_tokens=cfg.tokens_per_step)
    index["defaults"].update(fps=info["fps"], width=info["width"], height=info["height"], num_frames=info["num_frames"])
    index["training"] = {
        "data": data, "vae": info["vae"], "text_encoder": info["text_encoder"], "preset": cfg.preset,
        "steps": state["step"], "epochs": state["epoch"], "samples_seen": state["samples_seen"],
        "tokens_seen": state["tokens_seen"], "nonfinite_steps": state["nonfinite"],
        "final_loss": float(np.mean(tail)) if tail else None, "workers": cfg.workers, "seed": cfg.seed,
        "resumed_from": state["resumed_from"], "optimizer": cfg.optimizer, "lr": cfg.lr, "muon_lr": cfg.muon_lr,
        "schedule": cfg.schedule, "final_lr": state.get("lr"),
    }
    write_index(out, index)
    return {"out": out, "steps": state["step"], "final_loss": index["training"]["final_loss"],
            "nonfinite": state["nonfinite"], "resumed_from": state["resumed_from"], "final_lr": state.get("lr"),
            "history": state["history"]}
