"""Importance of every prunable unit (head, channel) and block, aggregated over torch-pruning's groups.

Two estimators, both summed over every parameter slice a unit owns in its dependency group (for an attention head:
its q, k, v rows and `to_out` columns; for a GLU channel: value and gate rows of both convs and the output conv's
column):

- first-order Taylor: s_u = |sum_{w in u} w * dL/dw| per calibration batch, averaged over batches: the first-order
  change of the loss when the unit is zeroed. The loss is whatever `loss_fn` computes (for SANA-SR: the one-step
  SR loss with the batch's prompts, or with null prompts). A block's score is |dL/dg| for a gate g = 1 that scales
  the block's residual update (x + g (f(x) - x)): the first-order change when the block is skipped;
- magnitude: s_u = sum_{w in u} w^2, no data; a block's score is the sum of its units'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .graph import PrunableLayer, PruningGraph


@dataclass
class Scores:
    """Importance of each unit of each prunable layer, and of each block (higher = keep)."""

    units: dict[tuple[int, str], torch.Tensor]
    """(block, kind) -> one score per unit."""
    blocks: torch.Tensor
    """One score per block."""
    method: str
    """How they were measured ("taylor", "taylor-null", "magnitude", ...)."""
    batches: int = 0
    """Calibration batches behind the scores (0 for magnitude)."""
    losses: list[float] = field(default_factory=list)
    """The calibration loss of each batch (Taylor only)."""

    def to_json(self) -> dict:
        return {"method": self.method, "batches": self.batches, "losses": self.losses,
                "blocks": self.blocks.tolist(),
                "units": {f"{b}/{k}": v.tolist() for (b, k), v in sorted(self.units.items())}}


def unit_sums(graph: PruningGraph, layer: PrunableLayer,
              stat: Callable[[nn.Parameter], torch.Tensor]) -> torch.Tensor:
    """sum of stat(p) over each unit's slices of every parameter in the layer's dependency group (float64)."""
    scores = torch.zeros(layer.units, dtype=torch.float64)
    seen = set()
    for item in graph.group(layer):
        module, fn = item.dep.target.module, item.dep.handler
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        out = graph.DG.is_out_channel_pruning_fn(fn)
        if (id(module), out) in seen:
            continue
        seen.add((id(module), out))
        idx = torch.as_tensor(item.idxs, device=module.weight.device)
        weight = stat(module.weight).float()  # bf16 sums over thousands of terms lose the ranking
        if out:
            per = weight.index_select(0, idx).flatten(1).sum(1)
            if module.bias is not None:
                per = per + stat(module.bias).float().index_select(0, idx)
        else:
            per = weight.index_select(1, idx).transpose(0, 1).flatten(1).sum(1)
        units = torch.as_tensor(item.root_idxs) // layer.unit_size
        scores.index_add_(0, units, per.detach().to("cpu", torch.float64))
    return scores


def _taylor(p: nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        return torch.zeros_like(p)
    return p.detach() * p.grad


def _square(p: nn.Parameter) -> torch.Tensor:
    return p.detach() ** 2


def magnitude_scores(graph: PruningGraph) -> Scores:
    """Weight magnitude (sum of squares over each unit's group slices); a block scores the sum of its units."""
    units = {(layer.block, layer.kind): unit_sums(graph, layer, _square) for layer in graph.layers}
    blocks = torch.zeros(len(graph.blocks), dtype=torch.float64)
    for (b, _), s in units.items():
        blocks[b] += s.sum()
    return Scores(units, blocks, "magnitude")


@contextmanager
def block_gates(blocks: nn.ModuleList, input_name: str = "hidden_states") -> Iterator[torch.Tensor]:
    """Gates g_i = 1 on each block's residual update (out = x + g_i (block(x) - x)); read g.grad after backward.

    x is the block's first positional argument, or its keyword argument `input_name`."""
    p = next(blocks.parameters())
    gates = torch.ones(len(blocks), device=p.device, dtype=p.dtype, requires_grad=True)

    def hook_for(i: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs[input_name]
            return x + gates[i] * (output - x)
        return hook

    handles = [b.register_forward_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        yield gates
    finally:
        for h in handles:
            h.remove()


def taylor_scores(
    graph: PruningGraph,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    batches: Iterable,
    method: str = "taylor",
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Scores:
    """First-order Taylor importance of every unit and block of `graph.model` on `batches`.

    `loss_fn(model, batch)` returns the scalar loss (the model is the prepared, unpruned model: it computes exactly
    what the original does). Parameters get `requires_grad` for the duration; their grads are cleared afterwards.
    """
    model = graph.model
    layers = graph.layers
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    units = {(layer.block, layer.kind): torch.zeros(layer.units, dtype=torch.float64) for layer in layers}
    blocks = torch.zeros(len(graph.blocks), dtype=torch.float64)
    losses = []
    try:
        for batch in (progress(batches) if progress else batches):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad(), block_gates(graph.blocks, graph.structure.block_input) as gates:
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"calibration loss is {loss.item()} on batch {len(losses)}; "
                                             "check the calibration data and the model's dtype")
                loss.backward()
            losses.append(float(loss.detach()))
            for layer in layers:
                units[(layer.block, layer.kind)] += unit_sums(graph, layer, _taylor).abs()
            blocks += gates.grad.detach().to("cpu", torch.float64).abs()
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if not losses:
        raise ValueError("no calibration batches: Taylor importance needs at least one")
    n = len(losses)
    return Scores({k: v / n for k, v in units.items()}, blocks / n, method, n, losses)
