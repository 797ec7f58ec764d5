"""A small distillation loop: the quantized student learns to match its full-precision teacher.

Loss (SPR²Q Eq. 4–6; 2DQuant's calibration uses the same shape): L = ‖f_q(x) − f_FP(x)‖₁ + λ · Σ_l MSE(φ_l^q, φ_l^FP)
over block outputs φ_l. Adam with cosine annealing (both papers), the learning rate stepped after each update. A step
whose loss or gradient norm is not finite makes no update (one NaN would spread to every bound) and is counted in a
warning. Teacher outputs are computed once per calibration batch and cached.

Any function with the signature of `distill` can replace it (QuantizeConfig.trainer): sana-sr runs these
fine-tunes on its training loop (sana_sr/train/quant.py), multi-process, with the same loss (`distill_loss`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .features import FeatureTap, first_tensor


def distill_loss(out: torch.Tensor, target: torch.Tensor, features: dict[str, torch.Tensor],
                 target_features: dict[str, torch.Tensor], feature_weight: float) -> torch.Tensor:
    """‖out − target‖₁ (mean) + feature_weight · Σ_l MSE(features[l], target_features[l]), in float32."""
    loss = F.l1_loss(out.float(), target.float())
    for name, value in target_features.items():
        loss = loss + feature_weight * F.mse_loss(features[name].float(), value.float())
    return loss


def distill(student: nn.Module, teacher: nn.Module, batches: Sequence, param_groups: list[dict], *, steps: int,
            forward: Callable, feature_modules: Sequence[str] = (), feature_weight: float = 1.0,
            grad_clip: float | None = 1.0, progress: Callable | None = None, desc: str = "fine-tune") -> list[float]:
    """Minimise L1(student, teacher) + λ·Σ feature MSE over `steps` passes through `batches` (cycled).

    param_groups: Adam parameter groups ({"params": [...], "lr": ...}); only these change.
    Returns the loss of every step that ran.
    """
    param_groups = [g for g in param_groups if g["params"]]
    if steps <= 0 or not param_groups or not batches:
        return []
    optimizer = torch.optim.Adam(param_groups, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    params = [p for g in param_groups for p in g["params"]]
    student_tap, teacher_tap = FeatureTap(student, feature_modules), FeatureTap(teacher, feature_modules)
    cache: dict[int, tuple[torch.Tensor, dict]] = {}
    losses: list[float] = []
    skipped = 0
    # The student stays in eval mode: dropout off and norm statistics frozen; gradients flow all the same.
    try:
        iterator = progress(range(steps), desc=desc) if progress else range(steps)
        for step in iterator:
            i = step % len(batches)
            if i not in cache:
                with torch.no_grad():
                    cache[i] = (first_tensor(forward(teacher, batches[i])).detach(), teacher_tap.pop())
            target, target_features = cache[i]
            out = first_tensor(forward(student, batches[i]))
            loss = distill_loss(out, target, student_tap.pop(), target_features, feature_weight)
            if not torch.isfinite(loss):  # no update from it; the schedule moves on as in a skipped step
                skipped += 1
                schedule.step()
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
            if torch.isfinite(norm):
                optimizer.step()
                losses.append(float(loss.detach()))
                if progress and hasattr(iterator, "set_postfix"):
                    iterator.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            else:  # one inf/NaN gradient would turn every bound into NaN: skip the step
                skipped += 1
            schedule.step()  # after the update: step s runs at the lr of s (0 at the end)
    finally:
        student_tap.close()
        teacher_tap.close()
        optimizer.zero_grad(set_to_none=True)
    if skipped:
        warnings.warn(f"{desc}: {skipped} of {steps} steps had a non-finite loss or gradient and were skipped")
    return losses
