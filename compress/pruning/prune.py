"""Score, plan and prune a SanaTransformer2DModel: the model-agnostic driver of `compress.pruning`.

    scores = score(dit, "taylor", loss_fn, batches)          # or "magnitude" (no data)
    costs = CostModel.measure(lambda w: skeleton(dit.config, w), count, model_widths(dit)[0])
    plan = greedy_plan(scores, model_widths(dit), costs, target=0.5 * costs.total(model_widths(dit)).params)
    pruned = apply_plan(dit, plan)                            # a PrunedSanaTransformer2DModel; dit is consumed
    pruned.save_pretrained(folder); load_pruned_transformer(folder)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from sana_sr.pruning.dit_structure import (
    BlockWidths,
    blocks_of,
    check_supported,
    merge_glu,
    model_widths,
    split_glu,
    sync_heads,
)
from sana_sr.pruning.model import PrunedSanaTransformer2DModel, as_pruned_model

from .graph import SanaDependencyGraph
from .importance import Scores, magnitude_scores, taylor_scores
from .plan import PruningPlan


def score(model: nn.Module, method: str, loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
          batches: Iterable | None = None, progress: Callable | None = None) -> Scores:
    """Importance of every head, channel and block of `model`: "magnitude", or "taylor*" with `loss_fn` on `batches`.

    The feed-forwards are split for the graph and merged back afterwards: the model computes the same function,
    but its GLU conv parameters are new tensors (re-create any optimizer over it).
    """
    check_supported(model)
    split_glu(model)
    try:
        graph = SanaDependencyGraph(model)
        if method == "magnitude":
            return magnitude_scores(graph)
        if loss_fn is None or batches is None:
            raise ValueError(f"importance {method!r} needs a loss function and calibration batches")
        return taylor_scores(graph, loss_fn, batches, method=method, progress=progress)
    finally:
        merge_glu(model)


def _check_plan(plan: PruningPlan, widths: Sequence[BlockWidths]) -> None:
    n = len(widths)
    if not plan.kept_blocks or sorted(set(plan.kept_blocks)) != plan.kept_blocks or plan.kept_blocks[-1] >= n:
        raise ValueError(f"kept blocks must be increasing indices below {n}, got {plan.kept_blocks}")
    for b in plan.kept_blocks:
        for kind, total in widths[b].as_dict().items():
            if total == 0:
                continue
            keep = plan.keep.get((b, kind))
            if not keep or keep[0] < 0 or keep[-1] >= total or sorted(set(keep)) != keep:
                raise ValueError(f"block {b} {kind}: kept units must be 1..{total} increasing indices below "
                                 f"{total}, got {keep if keep is None else keep[:8]}")


def apply_plan(model: nn.Module, plan: PruningPlan, inputs: dict[str, torch.Tensor] | None = None
               ) -> PrunedSanaTransformer2DModel:
    """Prune `model` to `plan` through torch-pruning's dependency graph and return the pruned model.

    Blocks are dropped from the block list first (each is a residual update, so the stream stays valid); heads and
    channels are then removed group by group. `model` is consumed (its layers are cut in place and re-homed in
    the returned model): deep-copy it first to keep the original, e.g. as a distillation teacher.
    """
    check_supported(model)
    widths = model_widths(model)
    _check_plan(plan, widths)
    # torch-pruning makes new (trainable) parameters; the pruned model is left frozen or not as the input was.
    trainable = any(p.requires_grad for p in model.parameters())
    blocks = blocks_of(model)
    model.transformer_blocks = nn.ModuleList([blocks[b] for b in plan.kept_blocks])
    split_glu(model)
    graph = SanaDependencyGraph(model, inputs)
    for new, old in enumerate(plan.kept_blocks):
        for kind in graph.kinds(blocks_of(model)[new]):
            layer = graph.layer(new, kind)
            graph.prune(layer, sorted(set(range(layer.units)) - set(plan.keep[(old, kind)])))
    merge_glu(model)
    sync_heads(model)
    pruned = as_pruned_model(model, plan.kept_blocks)
    pruned.requires_grad_(trainable)
    if pruned.widths != plan.widths():
        raise RuntimeError(f"pruned widths {pruned.widths} differ from the plan's {plan.widths()}")
    return pruned


def skeleton(config, widths: Sequence[BlockWidths], device: str | torch.device = "meta"
             ) -> PrunedSanaTransformer2DModel:
    """A model of `config`'s kind with the given per-block widths (on the meta device by default: for costing)."""
    base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    base.pop("kept_blocks", None)
    base.update(num_layers=len(widths), kept_blocks=list(range(len(widths))),
                block_heads=[w.heads for w in widths], block_cross_heads=[w.cross_heads for w in widths],
                block_channels=[w.channels for w in widths])
    with torch.device(device):
        return PrunedSanaTransformer2DModel.from_config(base)
