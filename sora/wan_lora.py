"""LoRA adapters on a Wan denoiser (peft), saved where diffusers' ``load_lora_weights`` reads them.

LoRA (Hu et al. 2021): each targeted linear W gets W + (alpha / r) B A with A (r, in), B (out, r);
B starts at zero, so the adapted model starts as the base. Only A and B train.

On disk (what ``WanPipeline.save_lora_weights`` writes and ``WanPipeline.load_lora_weights`` reads
in diffusers 0.42.1)::

    ADAPTER/pytorch_lora_weights.safetensors
        transformer.blocks.0.attn1.to_q.lora_A.weight   (r, in)
        transformer.blocks.0.attn1.to_q.lora_B.weight   (out, r)
        ...
        metadata "lora_adapter_metadata": the peft LoraConfig (rank, alpha, targets) as JSON

FOOTGUN: without that metadata diffusers assumes alpha = rank, so an adapter trained with another
alpha would load at the wrong strength; ``save_lora`` always writes it.

    params = add_lora(model.denoiser, rank=8, alpha=8)     # base frozen; train `params`
    save_lora(model.denoiser, "adapter")
    load_lora(other.denoiser, "adapter", scale=0.8)         # or pipe.load_lora_weights("adapter")
"""

from __future__ import annotations

import os

import torch

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Self- and cross-attention projections of every block: the usual Wan LoRA targets
# (add "ffn.net.0.proj", "ffn.net.2" for the feed-forward layers).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(denoiser, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
             adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Freeze the denoiser's transformer and add a trainable LoRA adapter of ``rank`` to the
    linears whose names end with one of ``targets``. ``alpha`` defaults to ``rank`` (scale 1).
    Returns the adapter's parameters (the only ones that require grad)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError(f"give LoRA target module names, e.g. {list(DEFAULT_TARGETS)}")
    transformer = denoiser.transformer
    transformer.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(rank if alpha is None else alpha), target_modules=targets,
                        init_lora_weights=True)
    try:
        transformer.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:  # peft: no module matched
        names = sorted({n.rsplit(".", 1)[-1] for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"LoRA targets {targets} match no linear layer of {denoiser.name} ({e}); "
                         f"linear layer names end in: {names}") from e
    return [p for p in transformer.parameters() if p.requires_grad]


def lora_state_dict(denoiser, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's A and B weights, keyed by module path (no ``transformer.`` prefix)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser.transformer, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_lora(denoiser, directory: str, adapter_name: str = "default") -> str:
    """Write the adapter in diffusers' Wan LoRA layout (module docstring). Returns the file."""
    from diffusers import WanPipeline

    config = denoiser.transformer.peft_config[adapter_name].to_dict()
    WanPipeline.save_lora_weights(str(directory), transformer_lora_layers=lora_state_dict(denoiser, adapter_name),
                                  transformer_lora_adapter_metadata=config, weight_name=WEIGHT_NAME)
    return os.path.join(str(directory), WEIGHT_NAME)


def check_lora_fits(denoiser, state: dict[str, torch.Tensor], source: str = "the adapter") -> None:
    """ValueError when an adapter's weights do not fit this transformer (an adapter of another
    base model): a targeted module it lacks, or A/B shapes that disagree with its linears."""
    transformer = denoiser.transformer
    for key, w in state.items():
        if not key.startswith("transformer.") or ".lora_" not in key:
            raise ValueError(f"{source}: {key!r} is not a Wan transformer LoRA weight (transformer.<module>.lora_A/B)")
        path, part = key[len("transformer."):].split(".lora_", 1)
        try:
            module = transformer.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{source} was made for another base model: {denoiser.name} has no module "
                             f"{path!r}") from None
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear):
            raise ValueError(f"{source} targets {path!r}, which is a {type(base).__name__} here, not a linear layer")
        if (part.startswith("A.") and w.shape[1] != base.in_features) or (
                part.startswith("B.") and w.shape[0] != base.out_features):
            raise ValueError(f"{source} was made for another base model: {key} has shape {tuple(w.shape)}, but "
                             f"{path} of {denoiser.name} maps {base.in_features} -> {base.out_features}")


def _read_adapter(directory: str):
    """(state, metadata) of an adapter directory, as diffusers reads it."""
    from diffusers import WanPipeline

    if not os.path.isfile(os.path.join(directory, WEIGHT_NAME)):
        raise FileNotFoundError(f"{directory} holds no {WEIGHT_NAME} (a LoRA adapter directory, e.g. from "
                                "`sora train --lora-rank`)")
    return WanPipeline.lora_state_dict(directory, weight_name=WEIGHT_NAME, local_files_only=True,
                                       return_lora_metadata=True)


def check_adapter(model_dir: str, directory: str) -> None:
    """Before any weights load: FileNotFoundError / ValueError unless the adapter directory fits
    the model directory ``model_dir`` - a Wan directory whose transformer (built from its config
    on the meta device, so no memory and no weights) has every module and shape it targets."""
    from types import SimpleNamespace

    from diffusers import WanTransformer3DModel

    from sora.model_dir import read_index

    directory = str(directory)
    index = read_index(model_dir)
    if not index.get("wan"):
        raise ValueError(f"{directory} is a Wan LoRA adapter; {model_dir} is not a Wan model directory: load the "
                         "adapter with the Wan directory it was made for")
    state, _ = _read_adapter(directory)
    config = WanTransformer3DModel.load_config(index["dit"], local_files_only=True)
    with torch.device("meta"):
        transformer = WanTransformer3DModel.from_config(config)
    check_lora_fits(SimpleNamespace(transformer=transformer, name=f"the Wan model at {model_dir}"), state, directory)


def load_lora(denoiser, directory: str, scale: float = 1.0, adapter_name: str = "lora") -> None:
    """Load an adapter directory (ours, or any Wan LoRA diffusers' ``lora_state_dict`` reads,
    e.g. original-Wan ``diffusion_model.`` keys) into the denoiser at strength ``scale``.
    A directory of another base model fails before the model changes."""
    from diffusers import WanPipeline

    directory = str(directory)
    if not hasattr(denoiser, "transformer"):
        from sora.denoiser import spec_of

        raise ValueError(f"{directory} is a Wan LoRA adapter (diffusers' layout); {spec_of(denoiser).name} is not a "
                         "Wan model: load the adapter with the Wan directory it was made for")
    state, metadata = _read_adapter(directory)
    check_lora_fits(denoiser, state, directory)
    transformer = denoiser.transformer
    WanPipeline.load_lora_into_transformer(state, transformer=transformer, adapter_name=adapter_name,
                                           metadata=metadata)
    transformer.set_adapters([adapter_name], [float(scale)])
