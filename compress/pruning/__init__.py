"""Structured pruning of the SANA DiT with torch-pruning's dependency graph: attention heads (self and cross),
GLUMBConv hidden channels and whole blocks; the residual width stays. Imports nothing from `sana_sr`.

    from compress.pruning import score, greedy_plan, apply_plan, CostModel, skeleton, model_widths
    scores = score(dit, "magnitude")                       # or "taylor" with a loss function and batches
    costs = CostModel.measure(lambda w: skeleton(dit.config, w), count_params_and_macs, model_widths(dit)[0])
    plan = greedy_plan(scores, model_widths(dit), costs, target=...)
    pruned = apply_plan(dit, plan)                         # PrunedSanaTransformer2DModel, save_pretrained-able

See docs/pruning.md.
"""

from sana_sr.pruning.dit_structure import BlockWidths, SplitGLUMBConv, merge_glu, model_widths, split_glu, sync_heads
from sana_sr.pruning.model import PrunedSanaTransformer2DModel, as_pruned_model, load_pruned_transformer, pruned_config

from .distill import DistillWeights, distillation_loss, feature_pairs
from .graph import PrunableLayer, SanaDependencyGraph, meta_pruner
from .importance import Scores, block_gates, magnitude_scores, taylor_scores
from .plan import STRUCTURES, Cost, CostModel, PruningPlan, greedy_plan, uniform_plan
from .prune import apply_plan, score, skeleton

__all__ = [
    "STRUCTURES", "BlockWidths", "Cost", "CostModel", "DistillWeights", "PrunableLayer",
    "PrunedSanaTransformer2DModel", "PruningPlan", "SanaDependencyGraph", "Scores", "SplitGLUMBConv",
    "apply_plan", "as_pruned_model", "block_gates", "distillation_loss", "feature_pairs", "greedy_plan",
    "load_pruned_transformer", "magnitude_scores", "merge_glu", "meta_pruner", "model_widths", "pruned_config",
    "score", "skeleton", "split_glu", "sync_heads", "taylor_scores", "uniform_plan",
]
