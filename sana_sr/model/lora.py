"""LoRA on the SANA DiT through PEFT (diffusers' `PeftAdapterMixin`), saved as its own safetensors file."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """Which DiT layers get a low-rank adapter, and how big."""

    rank: int = 64
    """LoRA rank r (the authors' release: 64)."""
    alpha: float | None = None
    """LoRA alpha; None means alpha = rank (scale 1), as in the release."""
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Module-name suffixes: these four cover both the linear self-attention and the cross-attention.
    `conv_inverted` and `conv_point` (GLUMBConv 1x1 convs) are further options; PEFT puts LoRA on the grouped
    depthwise `conv_depth` only when the rank divides by its groups, which no sensible rank does."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        self.target_modules = tuple(self.target_modules)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights=True,
        )


def add_lora(transformer: nn.Module, settings: LoraSettings) -> None:
    """Inject a fresh adapter (B = 0, so the model's output is unchanged until it trains)."""
    transformer.add_adapter(settings.peft_config(), adapter_name=ADAPTER_NAME)


def has_lora(transformer: nn.Module) -> bool:
    return bool(getattr(transformer, "peft_config", None))


def base_state_dict(transformer: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights of the model under its adapter, keyed as the model without PEFT layers.

    PEFT wraps each target as `name.base_layer` beside `name.lora_A/B`; saving that state dict would give a
    folder that `from_pretrained` cannot read, so the base weights are renamed back and the adapter dropped.
    `state`: the module's state dict as the caller has it (e.g. gathered from ZeRO-3 partitions); default: its own.
    """
    base = {}
    for key, value in (transformer.state_dict() if state is None else state).items():
        if ".lora_" in key:
            continue
        base[key.replace(".base_layer.", ".")] = value.detach().contiguous()
    return base


def save_transformer_without_lora(transformer: nn.Module, directory: str | os.PathLike,
                                  state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the base model (config + safetensors) in diffusers layout, leaving any adapter out; `state` as in
    `base_state_dict`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    transformer.save_config(directory)
    safetensors.torch.save_file(
        base_state_dict(transformer, state), str(directory / "diffusion_pytorch_model.safetensors"),
        metadata={"format": "pt"},
    )


def save_lora(transformer: nn.Module, directory: str | os.PathLike,
              state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter as diffusers' `pytorch_lora_weights.safetensors`, its PEFT config in the metadata (what
    diffusers' `save_lora_adapter` writes). `state`: the adapter's tensors by module name, when the module's own
    are not the ones to save (fp32 masters or EMA of a bf16 or ZeRO-3-partitioned module); default: the module's."""
    import json

    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft.utils import get_peft_model_state_dict

    config = transformer.peft_config[ADAPTER_NAME].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    tensors = get_peft_model_state_dict(transformer, state_dict=state, adapter_name=ADAPTER_NAME)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / LORA_WEIGHT_NAME
    safetensors.torch.save_file(tensors, str(path), metadata={
        "format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)})
    return path


def load_lora(transformer: nn.Module, directory_or_file: str | os.PathLike) -> None:
    """Load an adapter written by `save_lora` (a folder, or the safetensors file itself)."""
    path = Path(directory_or_file)
    folder, name = (path.parent, path.name) if path.is_file() else (path, LORA_WEIGHT_NAME)
    if not (folder / name).is_file():
        raise FileNotFoundError(f"no LoRA adapter at {folder / name}")
    transformer.load_lora_adapter(str(folder), weight_name=name, prefix=None, adapter_name=ADAPTER_NAME)


def merge_lora(transformer: nn.Module) -> None:
    """Fold the adapter into the base weights and remove the PEFT layers (inference then costs nothing extra)."""
    transformer.fuse_lora()
    transformer.unload_lora()


def enable_adapter_aware_checkpointing(transformer: nn.Module) -> None:
    """Gradient checkpointing that recomputes each block with its adapter switched as it was in the forward pass.

    The training objective runs the DiT a second time with the adapter disabled (the frozen prior) and needs
    gradients through that pass; plain checkpointing would recompute it in the backward pass with the adapter
    enabled again, and torch stops ("Recomputed values ... have different metadata than during the forward pass").
    """
    import torch.utils.checkpoint
    from peft.tuners.tuners_utils import BaseTunerLayer

    def checkpoint(block: nn.Module, *args):
        layers = [m for m in block.modules() if isinstance(m, BaseTunerLayer)]
        disabled_in_forward = [m.disable_adapters for m in layers]

        @contextmanager
        def as_in_forward():
            now = [m.disable_adapters for m in layers]
            for layer, disabled in zip(layers, disabled_in_forward):
                layer.enable_adapters(not disabled)
            try:
                yield
            finally:
                for layer, disabled in zip(layers, now):
                    layer.enable_adapters(not disabled)

        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (nullcontext(), as_in_forward()))

    transformer.enable_gradient_checkpointing(checkpoint)
