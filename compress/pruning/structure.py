"""What `compress.pruning` must know about a model family to prune it: the `PrunableStructure` it implements.

A structure names the model's residual blocks (each may be dropped whole) and, per block, its prunable layers: a
kind ("heads", "channels", ...), the channels one unit spans, the layer whose out channels root the torch-pruning
group, and every (layer, is_out) the group must contain. The graph, the importance, the plans and the drivers are
written against it; the SANA DiT's implementation is `sana_sr.pruning.structure.SanaDiTStructure`, and the tests
prune a small non-SANA network through the same code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEPTH = "depth"
"""The structure name of whole blocks, next to the layer kinds, in a plan's `structures`."""


class Widths(Mapping[str, int]):
    """The prunable widths of one block: units per kind, e.g. `Widths(heads=4, channels=160)`.

    Immutable and hashable (plans compare and collect them); equal to any mapping with the same entries; a kind
    reads as an attribute too (`w.heads`), and `get` gives 0 for a kind the block lacks.
    """

    def __init__(self, units: Mapping[str, int] | None = None, /, **kinds: int):
        merged = {**(units or {}), **kinds}
        bad = {k: v for k, v in merged.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"widths are unit counts >= 0, got {bad}")
        self._units = merged

    def __getitem__(self, kind: str) -> int:
        return self._units[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)

    def __hash__(self) -> int:
        return hash(frozenset(self._units.items()))

    def __getattr__(self, kind: str) -> int:
        if kind.startswith("_"):  # never look private names up in the units (copy and pickle probe for them)
            raise AttributeError(kind)
        try:
            return self._units[kind]
        except KeyError:
            raise AttributeError(f"no {kind!r} in widths {self._units}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self._units.items())})"

    def get(self, kind: str, default: int = 0) -> int:
        return self._units.get(kind, default)

    def as_dict(self) -> dict[str, int]:
        return dict(self._units)


@dataclass(frozen=True)
class GroupSpec:
    """One prunable layer of one block, as the dependency graph must see it."""

    kind: str
    """Which of the structure's kinds this layer is ("heads", "channels", ...)."""
    unit_size: int
    """Channels per unit of the root's out channels: the head size, or 1 for single channels."""
    root: nn.Module
    """The nn.Linear / conv whose out channels root the torch-pruning group."""
    members: tuple[tuple[nn.Module, bool], ...]
    """Every (layer, is_out) the group must prune, the root included; any other layer in the group is refused."""


class PrunableStructure(ABC):
    """A model family's blocks and prunable layers, and the hooks that make torch-pruning's graph valid on it.

    Stateless: every method takes the model. Call order in `compress.pruning.prune`: `check`; then, for scoring,
    `prepare` -> graph -> scores -> `finish`; for pruning, `select_blocks` -> `prepare` -> graph -> a cut per
    layer, each followed by `after_cut` -> `finish` -> `rebuild`.
    """

    kinds: tuple[str, ...] = ()
    """Every prunable kind, in order; `widths` lists each for every block (0 where a block lacks that layer)."""
    block_input: str = "hidden_states"
    """The keyword a block receives its residual input by when it is not passed first positionally."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The residual blocks, in order: out = x + f(x), so any of them can be dropped."""

    @abstractmethod
    def layers(self, model: nn.Module, block: nn.Module) -> list[GroupSpec]:
        """The prunable layers of `block` of the prepared model (after `prepare`)."""

    @abstractmethod
    def widths(self, model: nn.Module) -> list[Widths]:
        """The widths of every block, prepared or not, with every kind of `kinds`."""

    @abstractmethod
    def example_inputs(self, model: nn.Module) -> Any:
        """Small inputs (on the model's device) to trace the graph with; `forward_fn` consumes them."""

    @abstractmethod
    def select_blocks(self, model: nn.Module, kept: list[int]) -> None:
        """Keep only the blocks `kept` (increasing indices), in place."""

    def forward_fn(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """How the graph calls the model: one output tensor."""
        return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)

    def unwrapped_parameters(self, model: nn.Module) -> list[tuple[nn.Parameter, int]]:
        """Bare parameters (not in an nn.Linear / conv / norm) with the dim that holds their channels."""
        return []

    def check(self, model: nn.Module) -> None:
        """Fail early, with the reason, on a configuration the structure does not cover."""

    def prepare(self, model: nn.Module) -> None:
        """Re-lay the model, exactly, so that every group is one-to-one (SANA: split the GLU's value and gate)."""

    def after_cut(self, model: nn.Module) -> None:
        """Re-derive what the forward reads from layer widths after a group was cut (SANA: `attn.heads`)."""

    def finish(self, model: nn.Module) -> None:
        """Undo `prepare` (exactly) after scoring or pruning."""

    def rebuild(self, model: nn.Module, kept_blocks: list[int]) -> nn.Module:
        """The pruned model (cut in place) in a class whose config rebuilds its shapes; by default the model itself.

        `kept_blocks` are the indices of its blocks in the unpruned model."""
        return model
