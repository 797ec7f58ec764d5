"""A pruned SANA DiT as a diffusers model: per-block widths and kept blocks in `config.json`, weights in safetensors.

`PrunedSanaTransformer2DModel` is a `SanaTransformer2DModel` whose constructor builds each block at the widths its
config records, so `from_pretrained` (and diffusers' pipeline loader, which finds the class through
`model_index.json`) rebuilds the exact module shapes and then loads the weights: no pickled modules anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

# diffusers' pipeline loader looks the base classes up in the module that defines a component's class.
from diffusers import ModelMixin, SanaTransformer2DModel  # noqa: F401
from diffusers.configuration_utils import register_to_config

from compress.pruning import Widths
from sana_sr.pruning.dit_structure import BlockWidths, blocks_of, head_dims, model_widths, resize_block


class PrunedSanaTransformer2DModel(SanaTransformer2DModel):
    """SANA's DiT after structured pruning: the same computation, fewer heads / channels / blocks.

    The extra config fields, one entry per block of this model: `block_heads` (linear self-attention heads),
    `block_cross_heads` (cross-attention heads), `block_channels` (GLUMBConv hidden channels), and `kept_blocks`
    (which block of the unpruned model each one was, for distillation and for reading the result).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 32,
        out_channels: int | None = 32,
        num_attention_heads: int = 70,
        attention_head_dim: int = 32,
        num_layers: int = 20,
        num_cross_attention_heads: int | None = 20,
        cross_attention_head_dim: int | None = 112,
        cross_attention_dim: int | None = 2240,
        caption_channels: int = 2304,
        mlp_ratio: float = 2.5,
        dropout: float = 0.0,
        attention_bias: bool = False,
        sample_size: int = 32,
        patch_size: int = 1,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        guidance_embeds: bool = False,
        guidance_embeds_scale: float = 0.1,
        qk_norm: str | None = None,
        timestep_scale: float = 1.0,
        block_heads: list[int] | None = None,
        block_cross_heads: list[int] | None = None,
        block_channels: list[int] | None = None,
        kept_blocks: list[int] | None = None,
    ) -> None:
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim, num_layers=num_layers,
            num_cross_attention_heads=num_cross_attention_heads, cross_attention_head_dim=cross_attention_head_dim,
            cross_attention_dim=cross_attention_dim, caption_channels=caption_channels, mlp_ratio=mlp_ratio,
            dropout=dropout, attention_bias=attention_bias, sample_size=sample_size, patch_size=patch_size,
            norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
            interpolation_scale=interpolation_scale, guidance_embeds=guidance_embeds,
            guidance_embeds_scale=guidance_embeds_scale, qk_norm=qk_norm, timestep_scale=timestep_scale,
        )
        lists = {"block_heads": block_heads, "block_cross_heads": block_cross_heads,
                 "block_channels": block_channels, "kept_blocks": kept_blocks}
        bad = {k: (len(v) if v is not None else None) for k, v in lists.items() if v is None or len(v) != num_layers}
        if bad:
            raise ValueError(f"a pruned SANA DiT config needs one entry per block in each list: num_layers={num_layers}, "
                             f"got lengths {bad}; rebuild the folder with `sana-sr prune`")
        head_dim, cross_head_dim = head_dims(self.config)
        for block, h, ch, c in zip(blocks_of(self), block_heads, block_cross_heads, block_channels):
            resize_block(block, BlockWidths(h, ch, c), head_dim, cross_head_dim)

    @property
    def widths(self) -> list[BlockWidths]:
        return model_widths(self)


def pruned_config(model: torch.nn.Module, kept_blocks: list[int]) -> dict:
    """The config of `PrunedSanaTransformer2DModel` describing `model` (a SanaTransformer2DModel, pruned in place).

    `kept_blocks` are indices into `model`'s unpruned parent; when `model` was itself a pruned model they are
    composed, so they always point into the original, unpruned DiT.
    """
    previous = getattr(model.config, "kept_blocks", None)
    original = [previous[i] for i in kept_blocks] if previous is not None else list(kept_blocks)
    widths = model_widths(model)
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config.update(
        num_layers=len(widths), kept_blocks=original, block_heads=[w.heads for w in widths],
        block_cross_heads=[w.cross_heads for w in widths], block_channels=[w.channels for w in widths],
    )
    return config


def as_pruned_model(model: torch.nn.Module, kept_blocks: list[int]) -> PrunedSanaTransformer2DModel:
    """Re-home the (in place) pruned weights of `model` in a `PrunedSanaTransformer2DModel` built from its config.

    Building the class from the config and loading with `strict=True` proves that the config alone reproduces
    every module shape: exactly what `from_pretrained` will do with the saved folder.
    """
    config = pruned_config(model, kept_blocks)
    with torch.device("meta"):
        pruned = PrunedSanaTransformer2DModel.from_config(config)
    pruned.load_state_dict(model.state_dict(), strict=True, assign=True)
    pruned.train(model.training)
    return pruned


def skeleton(config, widths: Sequence[Widths], device: str | torch.device = "meta"
             ) -> PrunedSanaTransformer2DModel:
    """A DiT of `config`'s kind with the given per-block widths (on the meta device by default: for costing)."""
    base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    base.pop("kept_blocks", None)
    base.update(num_layers=len(widths), kept_blocks=list(range(len(widths))),
                block_heads=[w.heads for w in widths], block_cross_heads=[w.cross_heads for w in widths],
                block_channels=[w.channels for w in widths])
    with torch.device(device):
        return PrunedSanaTransformer2DModel.from_config(base)


def load_pruned_transformer(folder: str | os.PathLike, **kwargs) -> SanaTransformer2DModel:
    """Load a DiT folder (config.json + safetensors) written by `save_pretrained`, pruned or not.

    The class comes from the config's `_class_name`, looked up in the pipeline folders' allow-list (any DiT class
    there: unpruned, pruned, compressed), so the same call loads an unpruned SANA DiT too.
    """
    from sana_sr.model.components import component_class

    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: pass a DiT folder (a pipeline's transformer/ subfolder)")
    name = json.loads(config_file.read_text()).get("_class_name")
    return component_class("transformer", str(name)).from_pretrained(folder, **kwargs)
