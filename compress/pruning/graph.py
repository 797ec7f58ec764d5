"""torch-pruning's dependency graph over the SANA DiT, with one checked group per prunable layer.

What makes MetaPruner fail on the stock model, and what is done about each:

- the GLU `chunk` couples hidden channel i with i + c (see `sana_dit`): the feed-forward is split into value and
  gate convs first, after which the group of `value_inverted` is one-to-one over the c hidden channels;
- `scale_shift_table` (per block and at the output) and the caption norm's weight are bare `nn.Parameter`s on the
  residual width, and the AdaLN modulation `chunk`s a (B, 6, D) tensor on dim 1, which the graph reads as a split of
  channels: the residual width is never pruned here (the issue keeps it), so these parameters are declared as
  unwrapped on their feature dim and the residual layers are ignored, which keeps the mis-mapped split out of every
  group we prune;
- heads: the processors reshape with `attn.heads`; groups are pruned a whole head at a time and `sync_heads` resets
  `heads` from the new widths.

Every group is checked against the layers it must contain before anything is pruned, so a change in diffusers or
torch-pruning that altered the coupling fails loudly instead of producing a broken model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from sana_sr.pruning.dit_structure import (
    KINDS,
    SplitGLUMBConv,
    blocks_of,
    example_inputs,
    forward_fn,
    head_dims,
    sync_heads,
)


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable layer of one block: its units are heads (of `unit_size` channels) or single channels."""

    block: int
    """Index of the block in the model the graph was built on."""
    kind: str
    """"heads", "cross_heads" or "channels"."""
    unit_size: int
    """Channels per unit: the head size, or 1."""
    units: int
    """Units the layer has now."""


def _root_and_members(block: nn.Module, kind: str) -> tuple[nn.Module, list[tuple[nn.Module, bool]]]:
    """The layer whose out channels root the group, and every (layer, is_out) the group must prune."""
    if kind == "channels":
        ff = block.ff
        members = [(ff.value_inverted, True), (ff.gate_inverted, True), (ff.value_depth, True),
                   (ff.gate_depth, True), (ff.conv_point, False)]
        return ff.value_inverted, members
    attn = block.attn1 if kind == "heads" else block.attn2
    return attn.to_q, [(attn.to_q, True), (attn.to_k, True), (attn.to_v, True), (attn.to_out[0], False)]


def unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """The bare parameters of the DiT with the dim that holds the residual width."""
    params = [(model.scale_shift_table, 1)] + [(b.scale_shift_table, 1) for b in blocks_of(model)]
    caption_norm = getattr(model, "caption_norm", None)
    if caption_norm is not None and getattr(caption_norm, "weight", None) is not None:
        params.append((caption_norm.weight, 0))
    return params


@contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """torch-pruning traces through autograd: frozen parameters (a merged LoRA leaves the base frozen) would give
    outputs without a graph, so every parameter requires grad while tracing; the flags are restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            # torch-pruning warns about every op it treats as element-wise (attention internals): expected here.
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class SanaDependencyGraph:
    """The dependency graph of a SanaTransformer2DModel whose feed-forwards are `SplitGLUMBConv`s.

    `layers` lists every prunable layer; `group(layer)` is its full torch-pruning group (for scoring);
    `prune(layer, units)` removes units through the graph, so every coupled layer is cut consistently.
    """

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor] | None = None):
        if any(not isinstance(b.ff, SplitGLUMBConv) for b in blocks_of(model)):
            raise ValueError("split the feed-forwards first (compress.pruning.split_glu(model)): torch-pruning "
                             "cannot rank the channels of GLUMBConv's chunked 2c-channel convs consistently")
        self.model = model
        self.head_dim, self.cross_head_dim = head_dims(model.config)
        inputs = inputs if inputs is not None else example_inputs(model)
        with traceable(model):
            self.DG = tp.DependencyGraph().build_dependency(
                model, example_inputs=inputs, forward_fn=forward_fn,
                unwrapped_parameters=unwrapped_parameters(model), verbose=False,
            )
        self._groups: dict[tuple[int, str], tp.dependency.Group] = {}
        for layer in self.layers:
            self._check(layer, self.group(layer))

    # -- layers and their groups --------------------------------------------------------------------------------
    def kinds(self, block: nn.Module) -> list[str]:
        return [k for k in KINDS if k != "cross_heads" or getattr(block, "attn2", None) is not None]

    @property
    def layers(self) -> list[PrunableLayer]:
        out = []
        for i, block in enumerate(blocks_of(self.model)):
            for kind in self.kinds(block):
                size = {"heads": self.head_dim, "cross_heads": self.cross_head_dim, "channels": 1}[kind]
                root, _ = _root_and_members(block, kind)
                out.append(PrunableLayer(i, kind, size, root.out_features // size if kind != "channels"
                                         else root.out_channels))
        return out

    def layer(self, block: int, kind: str) -> PrunableLayer:
        for layer in self.layers:
            if layer.block == block and layer.kind == kind:
                return layer
        raise KeyError(f"no prunable {kind!r} layer in block {block}")

    def _root(self, layer: PrunableLayer) -> tuple[nn.Module, object]:
        root, _ = _root_and_members(blocks_of(self.model)[layer.block], layer.kind)
        fn = tp.prune_conv_out_channels if layer.kind == "channels" else tp.prune_linear_out_channels
        return root, fn

    def group(self, layer: PrunableLayer) -> tp.dependency.Group:
        """The full group of `layer` (every channel), cached until the next `prune`."""
        key = (layer.block, layer.kind)
        if key not in self._groups:
            root, fn = self._root(layer)
            self._groups[key] = self.DG.get_pruning_group(root, fn, list(range(layer.units * layer.unit_size)))
        return self._groups[key]

    def _check(self, layer: PrunableLayer, group: tp.dependency.Group) -> None:
        _, members = _root_and_members(blocks_of(self.model)[layer.block], layer.kind)
        expected = {(id(m), out) for m, out in members}
        found, names = set(), {}
        n = layer.units * layer.unit_size
        for item in group:
            module, fn = item.dep.target.module, item.dep.handler
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Parameter)) or isinstance(module, nn.LayerNorm):
                key = (id(module), self.DG.is_out_channel_pruning_fn(fn))
                found.add(key)
                names[key] = self.DG._module2name.get(module, type(module).__name__)
                if len(item.idxs) != n or sorted(item.root_idxs) != list(range(n)):
                    raise RuntimeError(f"block {layer.block} {layer.kind}: {names[key]} maps {len(item.idxs)} of "
                                       f"{n} channels; the graph's index mapping is not one-to-one")
        if found != expected:
            extra = sorted(names[k] for k in found - expected)
            raise RuntimeError(f"block {layer.block} {layer.kind}: the dependency group has unexpected layers "
                               f"{extra} or misses {len(expected - found)} of {len(expected)}; refusing to prune")

    # -- pruning ------------------------------------------------------------------------------------------------
    def prune(self, layer: PrunableLayer, units: Sequence[int]) -> None:
        """Remove `units` (indices into the layer's current units) from every coupled layer."""
        units = sorted(set(int(u) for u in units))
        if not units:
            return
        if units[0] < 0 or units[-1] >= layer.units or len(units) >= layer.units:
            raise ValueError(f"block {layer.block} {layer.kind}: cannot remove units {units[:8]}... of "
                             f"{layer.units} (at least one must stay)")
        root, fn = self._root(layer)
        idxs = [u * layer.unit_size + j for u in units for j in range(layer.unit_size)]
        group = self.DG.get_pruning_group(root, fn, idxs)
        if not self.DG.check_pruning_group(group):
            raise RuntimeError(f"torch-pruning refused to prune {len(idxs)} channels of block {layer.block} {layer.kind}")
        group.prune()
        self._groups.clear()
        sync_heads(self.model)


def meta_pruner(model: nn.Module, importance: tp.importance.Importance, inputs: dict | None = None,
                **kwargs) -> tp.pruner.MetaPruner:
    """torch-pruning's own `MetaPruner`, configured so that it works on the (split) SANA DiT.

    It prunes heads of both attentions (whole heads, `head_pruning_ratio`) and GLU channels (`pruning_ratio`),
    never the residual width. Call `sync_heads(model)` after `step()`. `kwargs` go to MetaPruner.
    """
    if any(not isinstance(b.ff, SplitGLUMBConv) for b in blocks_of(model)):
        raise ValueError("split the feed-forwards first (compress.pruning.split_glu(model))")
    keep = set()
    num_heads = {}
    for block in blocks_of(model):
        for attn in (block.attn1, getattr(block, "attn2", None)):
            if attn is not None:
                keep.update({attn.to_q, attn.to_k, attn.to_v})
                num_heads.update({attn.to_q: attn.heads, attn.to_k: attn.heads, attn.to_v: attn.heads})
        keep.update({block.ff.value_inverted, block.ff.gate_inverted, block.ff.value_depth, block.ff.gate_depth})
    # Every other layer with parameters carries the residual width (or the timestep / caption MLPs): not pruned.
    ignored = [m for m in model.modules() if m not in keep and isinstance(m, (nn.Linear, nn.Conv2d))]
    options = dict(prune_num_heads=True, prune_head_dims=False, num_heads=num_heads, ignored_layers=ignored,
                   unwrapped_parameters=unwrapped_parameters(model), forward_fn=forward_fn)
    options.update(kwargs)
    with traceable(model):
        return tp.pruner.MetaPruner(model, inputs if inputs is not None else example_inputs(model), importance,
                                    **options)
