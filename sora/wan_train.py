"""Fine-tuning a diffusers Wan directory: the pieces the trainer needs below Ray.

    den = load_denoiser("Wan2.1-T2V-1.3B-Diffusers", null_text=empty_prompt_states(DIR))   # transformer only
    params = add_lora(den, rank=8)                 # (sora.wan_lora) or train every weight
    ... flow_matching_loss(den, batch, ...) ...    # the denoiser protocol, as our DiT
    save_adapter(DIR, adapter_weights, lora_config, "out/lora")      # diffusers' load_lora_weights layout
    save_transformer(DIR, weights, "out")          # a diffusers directory with the new transformer/

Training reads encoded latents, so it needs neither the VAE nor UMT5 - only the transformer and
the empty prompt's text states (Wan's unconditional prompt, for the dropped prompts of
classifier-free guidance training). Exports build the transformer on the meta device from its
config.json and fill in only what training changed, so writing a LoRA adapter of a 14B model
costs the adapter's memory, not the model's.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from sora.wan import TEXT_LEN, WanDenoiser, inspect_wan_dir, load_text_encoder

# The components of a fine-tuned directory that stay the base model's (referenced, not copied).
BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def denoiser_name(path: str, expand_timesteps: bool) -> str:
    """The name a Wan denoiser of ``path`` carries in error messages (as ``sora.wan.load_wan``)."""
    kind = "TI2V, per-token timesteps" if expand_timesteps else "T2V, one timestep per video"
    return f"the Wan model at {path} ({kind})"


def load_denoiser(path: str, null_text: torch.Tensor | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> WanDenoiser:
    """The transformer of a Wan directory behind the denoiser protocol, without its VAE and text
    encoder (checked first by ``inspect_wan_dir``). ``null_text`` (L0, text_dim): the empty
    prompt's states (:func:`empty_prompt_states`) for dropped prompts."""
    from diffusers import WanTransformer3DModel

    path = os.path.abspath(str(path))
    configs = inspect_wan_dir(path)
    expand = bool(configs["index"].get("expand_timesteps", False))
    transformer = WanTransformer3DModel.from_pretrained(os.path.join(path, "transformer"), local_files_only=True,
                                                        torch_dtype=dtype).to(device)
    return WanDenoiser(transformer, expand_timesteps=expand, null_text=null_text,
                       num_train_timesteps=int(configs["scheduler"].get("num_train_timesteps", 1000)),
                       name=denoiser_name(path, expand)).to(device)


def meta_denoiser(path: str) -> WanDenoiser:
    """A Wan directory's denoiser built from its config.json on the meta device: the right module
    tree and shapes, no memory and no weights (fill it with ``load_state_dict(assign=True)``)."""
    from diffusers import WanTransformer3DModel

    path = os.path.abspath(str(path))
    configs = inspect_wan_dir(path)
    with torch.device("meta"):
        transformer = WanTransformer3DModel.from_config(configs["transformer"])
    expand = bool(configs["index"].get("expand_timesteps", False))
    return WanDenoiser(transformer, expand_timesteps=expand, name=denoiser_name(path, expand))


@torch.no_grad()
def empty_prompt_states(path: str) -> torch.Tensor:
    """(L0, text_dim) float32: the UMT5 states of the empty prompt "" of a Wan directory, which
    WanPipeline's classifier-free guidance feeds as the unconditional prompt."""
    encoder = load_text_encoder(str(path))
    states, mask = encoder.encode([""])
    return states[0][mask[0]].float().cpu()


def pack_flops(samples, config, text_len: int = TEXT_LEN, lora: bool = False) -> float:
    """Matmul FLOPs of one training step on ``samples`` (``sora.packing.Sample``) with a Wan
    transformer of ``config``: per token, each block's self-attention q, k, v, o and
    cross-attention q, o (6 D^2), its FFN (2 D ffn_dim), the patch embedding in and out, and
    attention over the own video and the text_len text tokens; not the text's k/v projections.
    Training costs 3x the forward (2x with ``lora``: no weight gradients for frozen weights)."""
    D = int(config.num_attention_heads) * int(config.attention_head_dim)
    L, ffn = int(config.num_layers), int(config.ffn_dim)
    in_dim = int(config.in_channels) * int(torch.tensor(config.patch_size).prod())
    per_token = 2 * (L * (6 * D * D + 2 * D * ffn) + 2 * D * in_dim)
    total = sum(s.num_tokens * (per_token + 2 * L * 2 * D * (s.num_tokens + text_len)) for s in samples)
    return float((2 if lora else 3) * total)


def save_adapter(base: str, weights: dict[str, torch.Tensor], lora: dict[str, Any], directory: str) -> str:
    """Write a LoRA adapter trained on the Wan directory ``base`` in diffusers' layout
    (``sora.wan_lora.save_lora``). ``weights``: its A and B matrices keyed as the denoiser's
    parameters (``transformer.<module>.lora_A.default.weight``); ``lora``: rank, alpha, targets.
    Returns the weight file."""
    from sora.wan_lora import add_lora, save_lora

    den = meta_denoiser(base)
    add_lora(den, rank=int(lora["rank"]), alpha=lora.get("alpha"), targets=tuple(lora["targets"]))
    expected = {n for n, p in den.named_parameters() if p.requires_grad}
    assert set(weights) == expected, (
        f"adapter weights do not match a rank-{lora['rank']} adapter of {sorted(lora['targets'])}: "
        f"missing {sorted(expected - set(weights))[:3]}, unexpected {sorted(set(weights) - expected)[:3]}")
    den.load_state_dict({n: w.float().contiguous() for n, w in weights.items()}, strict=False, assign=True)
    return save_lora(den, directory)


def save_transformer(base: str, weights: dict[str, torch.Tensor], out: str) -> str:
    """Write a diffusers Wan directory at ``out`` whose transformer/ holds ``weights`` (every
    parameter, keyed as the denoiser's: ``transformer.<name>``) and whose other components are
    the base directory's (:func:`link_base_components`). Returns ``out``."""
    den = meta_denoiser(base)
    names = {n for n, _ in den.named_parameters()}
    assert set(weights) == names, (f"the weights do not match {den.name}: missing {sorted(names - set(weights))[:3]}, "
                                   f"unexpected {sorted(set(weights) - names)[:3]}")
    den.load_state_dict({n: w.contiguous() for n, w in weights.items()}, strict=False, assign=True)
    os.makedirs(out, exist_ok=True)
    # its RoPE tables stay on the meta device: they are not saved (from_pretrained rebuilds them)
    den.transformer.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    link_base_components(base, out)
    return out


def link_base_components(base: str, out: str, components=BASE_COMPONENTS) -> None:
    """Make ``out`` a complete diffusers directory sharing the base's other components: each one
    a symbolic link to the base's (a copy where the filesystem has no links), and the base's
    model_index.json."""
    base = os.path.abspath(base)
    for name in components:
        src, dst = os.path.join(base, name), os.path.join(out, name)
        if os.path.lexists(dst):
            if os.path.islink(dst) and os.path.realpath(dst) == os.path.realpath(src):
                continue
            shutil.rmtree(dst) if os.path.isdir(dst) and not os.path.islink(dst) else os.remove(dst)
        try:
            os.symlink(src, dst, target_is_directory=True)
        except OSError:
            shutil.copytree(src, dst)
    with open(os.path.join(base, "model_index.json")) as f:
        index = json.load(f)
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
