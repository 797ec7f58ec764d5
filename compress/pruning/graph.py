"""torch-pruning's dependency graph over a `PrunableStructure`, with one checked group per prunable layer.

torch-pruning traces the model and couples every layer whose channels must be cut together. On real models that
coupling can be wrong (a chunk read as a channel split, a shared width mapped past its end); the structure's
`prepare` and `unwrapped_parameters` make it right (see `sana_sr.pruning.structure` for the SANA DiT), and here
every group is checked against the layers the structure says it must contain, with a one-to-one index mapping,
before anything is pruned: a change in the model or in torch-pruning that altered the coupling fails loudly
instead of producing a broken model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .structure import GroupSpec, PrunableStructure

if TYPE_CHECKING:
    import torch_pruning as tp

# Layers that carry channels of a group even without parameters (a norm's shape): an unexpected one is refused.
_SHAPED = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable layer of one block: its units are heads (of `unit_size` channels) or single channels."""

    block: int
    """Index of the block in the model the graph was built on."""
    kind: str
    """One of the structure's kinds ("heads", "channels", ...)."""
    unit_size: int
    """Channels per unit: the head size, or 1."""
    units: int
    """Units the layer has now."""


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


def _out_channels(layer: nn.Module) -> int:
    """Out channels of an nn.Linear or a conv (the only roots a structure may name)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
        return layer.out_channels
    raise TypeError(f"a group root must be an nn.Linear or a (non-transposed) conv, got {type(layer).__name__}")


def _carries_channels(module: object) -> bool:
    if isinstance(module, nn.Parameter):
        return True
    return isinstance(module, nn.Module) and (isinstance(module, _SHAPED) or
                                              any(True for _ in module.parameters(recurse=False)))


class PruningGraph:
    """The dependency graph of a prepared model (`structure.prepare(model)` done).

    `layers` lists every prunable layer; `group(layer)` is its full torch-pruning group (for scoring);
    `prune(layer, units)` removes units through the graph, so every coupled layer is cut consistently.
    """

    def __init__(self, structure: PrunableStructure, model: nn.Module, inputs: object | None = None):
        # Imported here, not at the top: the structures and the pruned models' classes import this package, and
        # loading a pruned model must work without the optional torch-pruning.
        import torch_pruning as tp

        self.structure = structure
        self.model = model
        for block in structure.blocks(model):  # an unprepared model fails here, with the structure's reason
            structure.layers(model, block)
        inputs = inputs if inputs is not None else structure.example_inputs(model)
        with traceable(model):
            self.DG = tp.DependencyGraph().build_dependency(
                model, example_inputs=inputs, forward_fn=structure.forward_fn,
                unwrapped_parameters=structure.unwrapped_parameters(model), verbose=False,
            )
        self._groups: dict[tuple[int, str], tp.dependency.Group] = {}
        for layer in self.layers:
            self._check(layer, self.group(layer))

    # -- layers and their groups --------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.structure.blocks(self.model)

    def _spec(self, block: int, kind: str) -> GroupSpec:
        for spec in self.structure.layers(self.model, self.blocks[block]):
            if spec.kind == kind:
                return spec
        raise KeyError(f"no prunable {kind!r} layer in block {block}")

    def layers_of(self, block: int) -> list[PrunableLayer]:
        out = []
        for spec in self.structure.layers(self.model, self.blocks[block]):
            channels = _out_channels(spec.root)
            if channels % spec.unit_size:
                raise ValueError(f"block {block} {spec.kind}: {channels} channels are not whole units of "
                                 f"{spec.unit_size}; check the structure's unit size")
            out.append(PrunableLayer(block, spec.kind, spec.unit_size, channels // spec.unit_size))
        return out

    @property
    def layers(self) -> list[PrunableLayer]:
        return [layer for b in range(len(self.blocks)) for layer in self.layers_of(b)]

    def layer(self, block: int, kind: str) -> PrunableLayer:
        for layer in self.layers_of(block):
            if layer.kind == kind:
                return layer
        raise KeyError(f"no prunable {kind!r} layer in block {block}")

    def _root(self, layer: PrunableLayer) -> tuple[nn.Module, object]:
        root = self._spec(layer.block, layer.kind).root
        return root, self.DG.get_pruner_of_module(root).prune_out_channels

    def group(self, layer: PrunableLayer) -> tp.dependency.Group:
        """The full group of `layer` (every channel), cached until the next `prune`."""
        key = (layer.block, layer.kind)
        if key not in self._groups:
            root, fn = self._root(layer)
            self._groups[key] = self.DG.get_pruning_group(root, fn, list(range(layer.units * layer.unit_size)))
        return self._groups[key]

    def _check(self, layer: PrunableLayer, group: tp.dependency.Group) -> None:
        members = self._spec(layer.block, layer.kind).members
        expected = {(id(m), out) for m, out in members}
        found, names = set(), {}
        n = layer.units * layer.unit_size
        for item in group:
            module, fn = item.dep.target.module, item.dep.handler
            if _carries_channels(module):
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
        self.structure.after_cut(self.model)


def meta_pruner(structure: PrunableStructure, model: nn.Module, importance: tp.importance.Importance,
                inputs: object | None = None, **kwargs) -> tp.pruner.MetaPruner:
    """torch-pruning's own `MetaPruner`, restricted to the structure's prunable layers of a prepared model.

    Layers with units wider than one channel are pruned a whole head at a time (`head_pruning_ratio`), the others
    channel by channel (`pruning_ratio`); every other layer is ignored. Call `structure.after_cut(model)` after
    `step()`. `kwargs` go to MetaPruner.
    """
    import torch_pruning as tp  # optional dependency: see PruningGraph.__init__

    keep = set()
    num_heads = {}
    for block in structure.blocks(model):
        for spec in structure.layers(model, block):
            outs = [m for m, is_out in spec.members if is_out]
            keep.update(outs)
            if spec.unit_size > 1:
                num_heads.update({m: _out_channels(m) // spec.unit_size for m in outs
                                  if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))})
    # Every other layer with parameters (a residual width, an embedding MLP): not pruned.
    ignored = [m for m in model.modules() if m not in keep and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    options = dict(prune_num_heads=True, prune_head_dims=False, num_heads=num_heads, ignored_layers=ignored,
                   unwrapped_parameters=structure.unwrapped_parameters(model), forward_fn=structure.forward_fn)
    options.update(kwargs)
    with traceable(model):
        return tp.pruner.MetaPruner(model, inputs if inputs is not None else structure.example_inputs(model),
                                    importance, **options)
