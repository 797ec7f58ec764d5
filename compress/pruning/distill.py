"""Distillation from the unpruned DiT: output and block-feature matching, as a loss function for any training loop.

The pruned model keeps the residual width, so block i of the student and block `kept_blocks[i]` of the teacher
produce features of the same shape: they are compared directly, no projection layers to train.

    with FeatureTap(student, blocks) as s_feats, FeatureTap(teacher, teacher_blocks) as t_feats:
        student_out = student(...); teacher_out = teacher(...)       # teacher under torch.no_grad()
    loss, parts = distillation_loss(student_out, teacher_out, s_feats.ordered(), t_feats.ordered(),
                                    feature_pairs(student.config.kept_blocks), DistillWeights())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DistillWeights:
    """Weights of the distillation terms (each 0 switches its term off)."""

    output: float = 1.0
    """MSE between student and teacher outputs (the velocity, or whatever output is passed)."""
    features: float = 0.1
    """Mean over matched blocks of the feature MSE, each normalised by the teacher feature's mean square."""
    eps: float = 1e-6
    """Added to the normaliser so that an all-zero teacher feature cannot divide by zero."""

    def __post_init__(self) -> None:
        if self.output < 0 or self.features < 0:
            raise ValueError(f"distillation weights must be >= 0, got output={self.output}, features={self.features}")


def feature_pairs(kept_blocks: Sequence[int] | None, student_blocks: int | None = None) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs: student block i was teacher block kept_blocks[i]."""
    if kept_blocks is None:
        if student_blocks is None:
            raise ValueError("give kept_blocks (from the pruned model's config) or the number of student blocks")
        return [(i, i) for i in range(student_blocks)]
    return [(i, int(t)) for i, t in enumerate(kept_blocks)]


def distillation_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]],
    weights: DistillWeights | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """weights.output * MSE(out) + weights.features * mean_pairs(MSE(f_s, f_t) / mean(f_t^2)); and each part.

    Teacher tensors are detached here, so a teacher run with gradients cannot leak any into the loss.
    """
    weights = weights or DistillWeights()
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"student output {tuple(student_out.shape)} and teacher output "
                         f"{tuple(teacher_out.shape)} differ in shape")
    out_term = F.mse_loss(student_out.float(), teacher_out.detach().float())
    feat_term = student_out.new_zeros((), dtype=torch.float32)
    if weights.features > 0 and pairs:
        terms = []
        for s, t in pairs:
            if s >= len(student_features) or t >= len(teacher_features):
                raise ValueError(f"feature pair ({s}, {t}) is out of range: {len(student_features)} student and "
                                 f"{len(teacher_features)} teacher features were captured")
            fs, ft = student_features[s].float(), teacher_features[t].detach().float()
            if fs.shape != ft.shape:
                raise ValueError(f"student block {s} feature {tuple(fs.shape)} and teacher block {t} feature "
                                 f"{tuple(ft.shape)} differ in shape")
            terms.append(F.mse_loss(fs, ft) / (ft.pow(2).mean() + weights.eps))
        feat_term = torch.stack(terms).mean()
    loss = weights.output * out_term + weights.features * feat_term
    parts = {"distill_output": out_term.item(), "distill_features": feat_term.item(), "distill": loss.item()}
    return loss, parts
