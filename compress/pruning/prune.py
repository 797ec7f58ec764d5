"""Score, plan and prune any model that implements a `PrunableStructure`: the drivers of `compress.pruning`.

    scores = score(structure, model, "taylor", loss_fn, batches)     # or "magnitude" (no data)
    widths = structure.widths(model)
    costs = CostModel.measure(build_at_widths, count_params_and_macs, widths[0])
    plan = greedy_plan(scores, widths, costs, target=0.5 * costs.total(widths).params)
    pruned = apply_plan(structure, model, plan)                       # structure.rebuild's class; model is consumed
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .graph import PruningGraph
from .importance import Scores, magnitude_scores, taylor_scores
from .plan import PruningPlan
from .structure import PrunableStructure, Widths


def score(structure: PrunableStructure, model: nn.Module, method: str,
          loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None, batches: Iterable | None = None,
          progress: Callable | None = None) -> Scores:
    """Importance of every unit and block of `model`: "magnitude", or "taylor*" with `loss_fn` on `batches`.

    The model is prepared for the graph and finished afterwards: it computes the same function, but the layers
    `prepare` re-laid are new tensors (re-create any optimizer over it).
    """
    structure.check(model)
    structure.prepare(model)
    try:
        graph = PruningGraph(structure, model)
        if method == "magnitude":
            return magnitude_scores(graph)
        if loss_fn is None or batches is None:
            raise ValueError(f"importance {method!r} needs a loss function and calibration batches")
        return taylor_scores(graph, loss_fn, batches, method=method, progress=progress)
    finally:
        structure.finish(model)


def _check_plan(plan: PruningPlan, widths: Sequence[Widths]) -> None:
    n = len(widths)
    if not plan.kept_blocks or sorted(set(plan.kept_blocks)) != plan.kept_blocks or plan.kept_blocks[-1] >= n:
        raise ValueError(f"kept blocks must be increasing indices below {n}, got {plan.kept_blocks}")
    for b in plan.kept_blocks:
        for kind, total in widths[b].items():
            if total == 0:
                continue
            keep = plan.keep.get((b, kind))
            if not keep or keep[0] < 0 or keep[-1] >= total or sorted(set(keep)) != keep:
                raise ValueError(f"block {b} {kind}: kept units must be 1..{total} increasing indices below "
                                 f"{total}, got {keep if keep is None else keep[:8]}")


def apply_plan(structure: PrunableStructure, model: nn.Module, plan: PruningPlan, inputs: object | None = None
               ) -> nn.Module:
    """Prune `model` to `plan` through torch-pruning's dependency graph and return the pruned model.

    Blocks are dropped from the block list first (each is a residual update, so the stream stays valid); heads and
    channels are then removed group by group. `model` is consumed (its layers are cut in place and re-homed by
    `structure.rebuild`): deep-copy it first to keep the original, e.g. as a distillation teacher.
    """
    structure.check(model)
    _check_plan(plan, structure.widths(model))
    # torch-pruning makes new (trainable) parameters; the pruned model is left frozen or not as the input was.
    trainable = any(p.requires_grad for p in model.parameters())
    structure.select_blocks(model, plan.kept_blocks)
    structure.prepare(model)
    graph = PruningGraph(structure, model, inputs)
    for new, old in enumerate(plan.kept_blocks):
        for kind in [layer.kind for layer in graph.layers_of(new)]:
            layer = graph.layer(new, kind)  # fresh: the previous cut may have changed the graph's layers
            graph.prune(layer, sorted(set(range(layer.units)) - set(plan.keep[(old, kind)])))
    structure.finish(model)
    pruned = structure.rebuild(model, plan.kept_blocks)
    pruned.requires_grad_(trainable)
    if structure.widths(pruned) != plan.widths():
        raise RuntimeError(f"pruned widths {structure.widths(pruned)} differ from the plan's {plan.widths()}")
    return pruned
