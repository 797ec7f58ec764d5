"""Structured pruning through torch-pruning's dependency graph, for any model that implements `PrunableStructure`:
units of the prunable layers inside residual blocks (attention heads, hidden channels) and whole blocks; the
residual width stays. Imports nothing from `sana_sr` (its DiT's structure is `sana_sr.pruning.structure`).

    from compress.pruning import score, greedy_plan, apply_plan, CostModel
    scores = score(structure, model, "magnitude")          # or "taylor" with a loss function and batches
    widths = structure.widths(model)
    costs = CostModel.measure(build_at_widths, count_params_and_macs, widths[0])
    plan = greedy_plan(scores, widths, costs, target=...)
    pruned = apply_plan(structure, model, plan)            # the model structure.rebuild gives

See docs/pruning.md.
"""

from .distill import DistillWeights, distillation_loss, feature_pairs
from .graph import PrunableLayer, PruningGraph, meta_pruner
from .importance import Scores, block_gates, magnitude_scores, taylor_scores
from .plan import Cost, CostModel, PruningPlan, greedy_plan, uniform_plan
from .prune import apply_plan, score
from .structure import DEPTH, GroupSpec, PrunableStructure, Widths

__all__ = [
    "DEPTH", "Cost", "CostModel", "DistillWeights", "GroupSpec", "PrunableLayer", "PrunableStructure", "PruningGraph",
    "PruningPlan", "Scores", "Widths", "apply_plan", "block_gates", "distillation_loss", "feature_pairs",
    "greedy_plan", "magnitude_scores", "meta_pruner", "score", "taylor_scores", "uniform_plan",
]
