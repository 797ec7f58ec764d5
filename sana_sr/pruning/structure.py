"""The SANA DiT as a `compress.pruning.PrunableStructure`: which layers each torch-pruning group must hold.

What makes MetaPruner fail on the stock `SanaTransformer2DModel`, and what is done about each:

- the GLU `chunk` couples hidden channel i with i + c (see `dit_structure`): `prepare` splits the feed-forward
  into value and gate convs first, after which the group of `value_inverted` is one-to-one over the c hidden
  channels; `finish` merges them back into diffusers' layout;
- `scale_shift_table` (per block and at the output) and the caption norm's weight are bare `nn.Parameter`s on the
  residual width, and the AdaLN modulation `chunk`s a (B, 6, D) tensor on dim 1, which the graph reads as a split
  of channels: the residual width is never pruned here (the issue keeps it), so these parameters are declared as
  unwrapped on their feature dim and no residual layer is in any group's expected members, which keeps the
  mis-mapped split out of every group we prune (the graph refuses a group that reaches them);
- heads: the processors reshape with `attn.heads`; groups are pruned a whole head at a time and `after_cut`
  (`sync_heads`) resets `heads` from the new widths.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.pruning import GroupSpec, PrunableStructure, Widths
from sana_sr.pruning.dit_structure import (
    KINDS,
    SplitGLUMBConv,
    blocks_of,
    check_supported,
    example_inputs,
    forward_fn,
    head_dims,
    merge_glu,
    model_widths,
    split_glu,
    sync_heads,
)
from sana_sr.pruning.model import as_pruned_model


def _heads(kind: str, attn: nn.Module, head_dim: int) -> GroupSpec:
    # A head's channels: rows of q, k and v, and the matching input columns of the output projection.
    members = ((attn.to_q, True), (attn.to_k, True), (attn.to_v, True), (attn.to_out[0], False))
    return GroupSpec(kind, head_dim, attn.to_q, members)


def _channels(ff: SplitGLUMBConv) -> GroupSpec:
    # A GLU channel: its value and gate rows in both convs (the depthwise ones too), and conv_point's input column.
    members = ((ff.value_inverted, True), (ff.gate_inverted, True), (ff.value_depth, True), (ff.gate_depth, True),
               (ff.conv_point, False))
    return GroupSpec("channels", 1, ff.value_inverted, members)


class SanaDiTStructure(PrunableStructure):
    """Heads of `attn1` and `attn2`, and GLUMBConv hidden channels, of every `SanaTransformerBlock`."""

    kinds = KINDS

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return blocks_of(model)

    def layers(self, model: nn.Module, block: nn.Module) -> list[GroupSpec]:
        if not isinstance(block.ff, SplitGLUMBConv):
            raise ValueError("split the feed-forwards first (SanaDiTStructure().prepare(model)): torch-pruning "
                             "cannot rank the channels of GLUMBConv's chunked 2c-channel convs consistently")
        head_dim, cross_head_dim = head_dims(model.config)
        specs = [_heads("heads", block.attn1, head_dim)]
        if getattr(block, "attn2", None) is not None:
            specs.append(_heads("cross_heads", block.attn2, cross_head_dim))
        return [*specs, _channels(block.ff)]

    def widths(self, model: nn.Module) -> list[Widths]:
        return model_widths(model)

    def example_inputs(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return example_inputs(model)

    def forward_fn(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward_fn(model, inputs)

    def unwrapped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, int]]:
        """The bare parameters of the DiT with the dim that holds the residual width."""
        params = [(model.scale_shift_table, 1)] + [(b.scale_shift_table, 1) for b in blocks_of(model)]
        caption_norm = getattr(model, "caption_norm", None)
        if caption_norm is not None and getattr(caption_norm, "weight", None) is not None:
            params.append((caption_norm.weight, 0))
        return params

    def check(self, model: nn.Module) -> None:
        check_supported(model)

    def prepare(self, model: nn.Module) -> None:
        split_glu(model)

    def after_cut(self, model: nn.Module) -> None:
        sync_heads(model)

    def finish(self, model: nn.Module) -> None:
        merge_glu(model)

    def select_blocks(self, model: nn.Module, kept: list[int]) -> None:
        blocks = blocks_of(model)
        model.transformer_blocks = nn.ModuleList([blocks[b] for b in kept])

    def rebuild(self, model: nn.Module, kept_blocks: list[int]) -> nn.Module:
        """A `PrunedSanaTransformer2DModel` (its config records the widths and `kept_blocks`) holding the weights."""
        return as_pruned_model(model, kept_blocks)
