"""What a run trains: our DiT of a preset from scratch, or a diffusers Wan directory (``init``)
fine-tuned in full or with a LoRA adapter.

    driver:  plan = plan_model(data, info, cfg, vae)    # every check, before any Ray work
             ... TorchTrainer(loop_config={"train": asdict(plan.cfg), **plan.loop_config()}) ...
    worker:  core, flops = build_wan(config["wan"], cfg)     # (the DiT: sora.dit.DiT(config["dit"]))
    driver:  export_wan(checkpoint, out, plan, info, data)

The latents must be the model's: for a Wan run, what ``sora encode --model DIR`` writes - the
``vae`` column ``pipelines.encode.vae_id`` of DIR/vae, the ``text_encoder`` column
``sora.model_dir.text_encoder_name`` of DIR - with the transformer's latent channels, patch and
text width; the empty prompt's states (dropped captions) come from DATA/null_text
(``pipelines.encode.read_null_text``). A DiT run refuses latents made for a Wan model and latents
of a VAE other than ``--vae``. Each mismatch is one ValueError naming the fix, raised before Ray
starts.

Output of a Wan run (the base model is referenced, never copied):

- LoRA: ``OUT/lora/pytorch_lora_weights.safetensors`` (diffusers' ``load_lora_weights`` layout,
  ``sora.wan_lora``) and ``OUT/model_index.json``, an index of ours that references the base
  (``sora.model_dir``: ``read_index`` gives the base's index with these keys on top,
  ``SoraPipeline.from_pretrained(OUT)`` loads the base and applies the adapter)::

      {"format": "sora-ray/1", "wan": {"base": "/abs/Wan2.1-T2V-1.3B-Diffusers"},
       "lora": {"path": "lora", "scale": 1.0},
       "defaults": {...the base's, at the training data's size and fps...},
       "training": {...provenance...}}

- full fine-tuning: OUT is a diffusers Wan directory: ``transformer/`` holds the fine-tuned
  weights (config.json + safetensors), ``vae/``, ``text_encoder/``, ``tokenizer/`` and
  ``scheduler/`` link to the base's, model_index.json is the base's plus ``_sora_training``
  (provenance; diffusers ignores keys that start with an underscore).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from pipelines.train.config import TrainConfig
from sora.denoiser import DenoiserSpec, spec_of

# pipelines.encode.vae_id's form: "<directory name>@<12 hex digits of the config and weight sizes>"
ID_FORM = re.compile(r"^(?P<name>.*)@(?P<digest>[0-9a-f]{12})$")


@dataclass
class ModelPlan:
    """The model of a run, decided and checked on the driver."""

    cfg: TrainConfig  # the run's config with its model defaults decided (TrainConfig.for_model)
    spec: DenoiserSpec
    dit_config: dict[str, Any] | None = None  # our DiT: its config
    init: str | None = None  # a Wan run: the base directory (absolute)
    lora: dict[str, Any] | None = None  # LoRA: {"rank", "alpha", "targets"}
    null_text: torch.Tensor | None = None  # Wan: the empty prompt's states (L0, text_dim)
    index: dict[str, Any] = field(default_factory=dict)  # Wan: the base's model_index.json

    @property
    def kind(self) -> str:
        return "dit" if self.init is None else ("wan-lora" if self.lora else "wan")

    def loop_config(self) -> dict[str, Any]:
        """What each worker needs to build the model (beside the TrainConfig)."""
        if self.init is None:
            return {"dit": self.dit_config}
        return {"wan": {"init": self.init, "lora": self.lora, "null_text": self.null_text}}

    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this run must have been trained on to be resumed by it."""
        return {"kind": self.kind, "init": self.init, "lora": self.lora}


# ----------------------------------------------------------------------------------------
# The driver: checks before any work
# ----------------------------------------------------------------------------------------


def _digest(vae: str | None) -> str | None:
    m = ID_FORM.match(str(vae or ""))
    return m.group("digest") if m else None


def is_wan_text(name: str | None) -> bool:
    """Whether a latents ``text_encoder`` value names a Wan model's UMT5: what
    ``sora.model_dir.text_encoder_name`` records for one ("wan:..."), or a path inside a Wan
    directory."""
    from sora.wan import is_wan_dir

    if str(name or "").startswith("wan:"):
        return True
    if not name or not os.path.isdir(str(name)):
        return False
    path = os.path.abspath(str(name))
    return is_wan_dir(path) or is_wan_dir(os.path.dirname(path))


def _vae_channels(vae: str) -> int | None:
    """Latent channels from a VAE directory's config.json (ours or a diffusers video VAE)."""
    path = os.path.join(vae, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{vae} is not a VAE directory: no config.json (train one with `sora train-vae`)")
    with open(path) as f:
        config = json.load(f)
    value = config.get("latent_channels", config.get("z_dim"))
    return None if value is None else int(value)


def check_dit_latents(data: str, info: dict[str, Any], vae: str) -> None:
    """A DiT run: the latents are not a Wan model's and come from the VAE ``vae``."""
    from pipelines.encode import vae_id

    if is_wan_text(info["text_encoder"]):
        raise ValueError(f"{data}/latents were encoded for a Wan model (text encoder {info['text_encoder']}): "
                         "fine-tune that model with `sora train --init WAN_DIR`, or encode the clips again with our "
                         "VAE for the DiT")
    channels = _vae_channels(vae)
    if channels is not None and channels != info["latent_channels"]:
        raise ValueError(f"{data}/latents have {info['latent_channels']} latent channels but the VAE {vae} makes "
                         f"{channels}: give --vae the VAE they were encoded with")
    recorded, ours = _digest(info["vae"]), _digest(vae_id(vae))
    if recorded is not None and recorded != ours:
        raise ValueError(f"{data}/latents were encoded with the VAE {info['vae']!r}, not with {vae} "
                         f"({vae_id(vae)}): give --vae the VAE they were encoded with, or encode them again")


def check_wan_latents(data: str, info: dict[str, Any], init: str, spec: DenoiserSpec) -> None:
    """A Wan run: the latents are this Wan directory's (VAE, text encoder, channels, patch, text)."""
    from pipelines.encode import vae_id
    from sora.model_dir import text_encoder_name

    fix = f"encode the clips for this model with `sora encode --data {data} --model {init}`"
    expected = vae_id(os.path.join(init, "vae"))
    if _digest(info["vae"]) != _digest(expected):
        raise ValueError(f"{data}/latents were encoded with the VAE {info['vae']!r}, not with the VAE of {init} "
                         f"({expected}): {fix}")
    if info["text_encoder"] != text_encoder_name(init):
        raise ValueError(f"{data}/latents hold text states of {info['text_encoder']!r}, not of the text encoder of "
                         f"{init} ({text_encoder_name(init)}): {fix}")
    checks = [("latent channels", info["latent_channels"], spec.latent_channels),
              ("patch size", tuple(info["patch_size"]), tuple(spec.patch_size)),
              ("text width", info["text_dim"], spec.text_dim)]
    for what, theirs, ours in checks:
        if theirs != ours:
            raise ValueError(f"{data}/latents have {what} {theirs}, {spec.name} takes {ours}: {fix}")
    if spec.text_len is not None and info["max_text_tokens"] > spec.text_len:
        raise ValueError(f"{data}/latents hold captions of {info['max_text_tokens']} text tokens, more than the "
                         f"{spec.text_len} {spec.name} reads: {fix}")


def check_init(init: str) -> dict[str, Any]:
    """The configs of a diffusers Wan directory given as ``init`` (``sora.wan.inspect_wan_dir``),
    its errors prefixed with what was given."""
    from sora.wan import inspect_wan_dir

    try:
        return inspect_wan_dir(init)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"init {init} is not a Wan directory this trainer can fine-tune: {e}") from None


def plan_model(data: str, info: dict[str, Any], cfg: TrainConfig, vae: str | None) -> ModelPlan:
    """Decide and check the model of a run from the latents' summary (``inspect_latents``):
    every mismatch between model, latents and config is a ValueError (FileNotFoundError for a
    missing directory) here, before any Ray work. For a Wan run this reads the directory's
    JSON, builds its transformer on the meta device (no weights) and reads the empty prompt's
    states that `sora encode` stored beside the latents (the unconditional text of dropped
    prompts; encoded here with the model's UMT5 when the latents come without them)."""
    if cfg.init is None:
        from sora.dit import DiTConfig
        from sora.flow import CONDITIONING_MODES

        if vae is None:
            raise ValueError("training our DiT needs --vae (the VAE the latents were encoded with); "
                             "or fine-tune a Wan directory with --init")
        check_dit_latents(data, info, vae)
        dit_config = DiTConfig.preset(cfg.preset, in_channels=info["latent_channels"], patch_size=info["patch_size"],
                                      text_dim=info["text_dim"])
        resolved = cfg.for_model(CONDITIONING_MODES)
        spec = DenoiserSpec(name=f"our DiT ({cfg.preset})", patch_size=tuple(dit_config.patch_size),
                            latent_channels=dit_config.in_channels, text_dim=dit_config.text_dim, text_len=None,
                            packed=True, conditioning_modes=CONDITIONING_MODES)
        return ModelPlan(cfg=resolved, spec=spec, dit_config=asdict(dit_config))

    from pipelines.encode import read_null_text
    from sora.wan import flow_shift
    from sora.wan_lora import add_lora
    from sora.wan_train import empty_prompt_states, meta_denoiser

    init = os.path.abspath(cfg.init)
    configs = check_init(init)
    if vae is not None and os.path.realpath(vae) != os.path.realpath(os.path.join(init, "vae")):
        raise ValueError(f"--vae {vae}: a Wan run uses its own VAE ({init}/vae); leave --vae out")
    den = meta_denoiser(init)
    spec = spec_of(den)
    check_wan_latents(data, info, init, spec)
    lora = None
    if cfg.lora_rank is not None:
        lora = {"rank": int(cfg.lora_rank), "alpha": float(cfg.lora_alpha or cfg.lora_rank),
                "targets": list(cfg.lora_targets)}
        add_lora(den, rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"])  # targets that match nothing fail here
    resolved = cfg.for_model(spec.conditioning_modes, shift=flow_shift(configs["scheduler"]))
    spec.check_conditioning(resolved.cond_mode_probs)
    try:
        null_text = torch.from_numpy(read_null_text(data, info["text_encoder"])).float()
    except FileNotFoundError:
        print(f"[train] {data} holds no empty-prompt states for {info['text_encoder']}: encoding the empty prompt "
              f"with the text encoder of {init}", flush=True)
        null_text = empty_prompt_states(init)
    if tuple(null_text.shape[1:]) != (spec.text_dim,):
        raise ValueError(f"{data}/null_text holds empty-prompt states {tuple(null_text.shape)} that {spec.name} cannot "
                         f"read (text width {spec.text_dim}): encode the clips again with `sora encode --model {init}`")
    return ModelPlan(cfg=replace(resolved, init=init), spec=spec, init=init, lora=lora, null_text=null_text,
                     index=configs["index"])


# ----------------------------------------------------------------------------------------
# The worker: the model to train
# ----------------------------------------------------------------------------------------


def build_wan(wan: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, Callable[[list], float]]:
    """A worker's Wan denoiser (float32; bf16 is autocast's or FSDP's) with its LoRA adapter if
    any (only the adapter then requires grad), and the FLOPs of a pack for the metrics."""
    from sora.wan_lora import add_lora
    from sora.wan_train import load_denoiser, pack_flops

    null_text = wan["null_text"]
    den = load_denoiser(wan["init"], null_text=None if null_text is None else torch.as_tensor(null_text))
    lora = wan.get("lora")
    if lora:
        add_lora(den, rank=int(lora["rank"]), alpha=float(lora["alpha"]), targets=tuple(lora["targets"]))
    den.train()
    config = den.transformer.config
    return den.to(device), (lambda samples: pack_flops(samples, config, den.text_len, lora=bool(lora)))


def adamw_trainable(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW over the parameters that require grad (all of them, or a LoRA adapter), weight decay
    on matrices only, as one ``sora.optim.Optimizers`` (driven by ``lr_at`` like the DiT's)."""
    from sora.optim import Optimizers

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert named, "nothing to train: no parameter requires grad"
    decay = [p for _, p in named if p.dim() >= 2] if cfg.weight_decay else []
    rest = [p for _, p in named if not (cfg.weight_decay and p.dim() >= 2)]
    groups = [{"params": ps, "weight_decay": wd, "lr_scale": 1.0}
              for ps, wd in ((decay, cfg.weight_decay), (rest, 0.0)) if ps]
    return Optimizers([torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)])


# ----------------------------------------------------------------------------------------
# The driver again: the model directory
# ----------------------------------------------------------------------------------------


def _trainable_template(plan: ModelPlan) -> dict[str, torch.Tensor]:
    """Empty full-size float32 tensors named as the trainable parameters (the EMA's keys)."""
    from sora.wan_lora import add_lora
    from sora.wan_train import meta_denoiser

    den = meta_denoiser(plan.init)
    if plan.lora:
        add_lora(den, rank=plan.lora["rank"], alpha=plan.lora["alpha"], targets=plan.lora["targets"])
    return {n: torch.empty(p.shape, dtype=torch.float32) for n, p in den.named_parameters() if p.requires_grad}


def load_wan_ema(checkpoint: str, plan: ModelPlan) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's EMA of the trained weights, consolidated in this process, and its state.json."""
    from pipelines import trainer

    state = trainer.read_state(checkpoint)
    weights = trainer.load_tensors(checkpoint, {"extra": _trainable_template(plan)})["extra"]
    return weights, state


def training_record(state: dict[str, Any], cfg: TrainConfig, info: dict[str, Any], data: str) -> dict[str, Any]:
    """Provenance for the exported model: data, run settings, steps and the final loss."""
    losses = [l for _, l in state["history"] if math.isfinite(l)]
    tail = losses[-max(1, min(50, len(losses) // 10)):] if losses else []
    return {"data": data, "vae": info["vae"], "text_encoder": info["text_encoder"], "init": cfg.init,
            "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_targets": list(cfg.lora_targets),
            "steps": state["step"], "epochs": state["epoch"], "samples_seen": state["samples_seen"],
            "tokens_seen": state["tokens_seen"], "nonfinite_steps": state["nonfinite"],
            "final_loss": float(np.mean(tail)) if tail else None, "workers": cfg.workers, "seed": cfg.seed,
            "resumed_from": state["resumed_from"], "optimizer": cfg.optimizer, "lr": cfg.lr,
            "schedule": cfg.schedule, "final_lr": state.get("lr"), "base_shift": cfg.base_shift,
            "base_tokens": cfg.base_tokens, "cond_mode_probs": cfg.cond_mode_probs}


def lora_index(plan: ModelPlan, adapter: str, info: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The ``sora.model_dir`` index of a LoRA run's output (module docstring): the base by
    absolute path, the adapter relative to the output directory, generation defaults at the
    training data's most common size, length and fps."""
    from sora.model_dir import FORMAT, read_index

    defaults = {**read_index(plan.init)["defaults"], "fps": info["fps"], "width": info["width"],
                "height": info["height"], "num_frames": info["num_frames"]}
    return {"format": FORMAT, "wan": {"base": plan.init}, "lora": {"path": adapter, "scale": 1.0},
            "defaults": defaults, "training": record}


def export_wan(checkpoint: str, out: str, plan: ModelPlan, info: dict[str, Any], data: str) -> dict[str, Any]:
    """A Wan run's checkpoint (its EMA weights) -> the output directory (module docstring)."""
    from sora.model_dir import write_index
    from sora.wan_train import save_adapter, save_transformer

    if "://" in out:
        raise ValueError(f"a Wan run writes its model to a local directory, got {out}")
    weights, state = load_wan_ema(checkpoint, plan)
    record = training_record(state, plan.cfg, info, data)
    os.makedirs(out, exist_ok=True)
    if plan.lora:
        save_adapter(plan.init, weights, plan.lora, os.path.join(out, "lora"))
        write_index(out, lora_index(plan, "lora", info, record))
    else:
        save_transformer(plan.init, weights, out)
        path = os.path.join(out, "model_index.json")
        with open(path) as f:
            index = json.load(f)
        index["_sora_training"] = record
        with open(path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return {"out": out, "steps": state["step"], "final_loss": record["final_loss"], "nonfinite": state["nonfinite"],
            "resumed_from": state["resumed_from"], "final_lr": state.get("lr"), "history": state["history"],
            "model": plan.kind}


def check_resumable(saved: dict[str, Any], identity: dict[str, Any], url: str) -> None:
    """ValueError unless the checkpoint at ``url`` (its state.json ``saved``) was trained on the
    same model as this run (``ModelPlan.identity``)."""
    theirs = saved.get("model", {"kind": "dit", "init": None, "lora": None})
    if theirs != identity:
        raise ValueError(f"the checkpoint in {url} trained {theirs}, this run trains {identity}: resume it with the "
                         "same --init and LoRA settings, or start a new run name (--name)")

