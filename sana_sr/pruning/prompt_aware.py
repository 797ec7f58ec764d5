"""Prompt-aware structured pruning of a SanaSRPipeline's DiT: the SANA-SR wiring of `compress.pruning`.

Importance is the first-order Taylor score of the one-step SR loss, measured through the pipeline's own functions
on calibration pairs with their prompts:

    z_L = encode(2 bicubic(LQ) - 1),   x_hat = decode(z_L - sigma* v(z_L, t*, c)),   L = mean (x_hat - (2 HQ - 1))^2

with c the pair's prompt embedding ("taylor"), or the null prompt for every pair ("taylor-null"), or plain weight
magnitude ("magnitude"). Costs come from `sana_sr.model.cost` (the same counter as `sana-sr cost`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.pruning import CostModel, Scores, apply_plan, greedy_plan, score, uniform_plan
from sana_sr.atomic import atomic_directory
from sana_sr.data.calibration_pairs import CalibrationBatch, PreparedBatch, prepare_batches
from sana_sr.model.pipeline import SanaSRPipeline, one_step_restore
from sana_sr.pruning.dit_structure import STRUCTURES, model_widths
from sana_sr.pruning.model import load_pruned_transformer, skeleton
from sana_sr.pruning.structure import SanaDiTStructure

IMPORTANCE = ("taylor", "taylor-null", "magnitude", "none")
PLANS = ("greedy", "uniform")
DIT = SanaDiTStructure()

__all__ = ["IMPORTANCE", "PLANS", "PruneSettings", "load_pruned_transformer", "prune_pipeline", "sr_loss"]


@dataclass
class PruneSettings:
    """What to prune, to which size, ranked by what."""

    target_params: float | None = None
    """Parameters of the DiT to keep: a fraction (<= 1) of the unpruned DiT's, or an absolute count (> 1)."""
    target_macs: float | None = None
    """MACs of one DiT call at `output_size` to keep: a fraction (<= 1) or an absolute count (> 1)."""
    importance: str = "taylor"
    """"taylor" (SR loss with the pairs' prompts), "taylor-null" (null prompts), "magnitude", or "none"
    (structural: only with the uniform plan, e.g. on the meta device)."""
    plan: str = "greedy"
    """"greedy" (least importance per cost first, across layers) or "uniform" (same fraction in every layer)."""
    structures: tuple[str, ...] = ("heads", "cross_heads", "channels")
    """What may be pruned: any of "heads", "cross_heads", "channels", "depth"."""
    output_size: int = 512
    """Output side in pixels at which MACs are counted (the DiT sees output_size / AE ratio latents)."""
    min_heads: int = 1
    """Heads each attention keeps at least."""
    channel_multiple: int = 1
    """GLU channels are kept in multiples of this (8 or 32 suit GPU kernels)."""
    min_keep_fraction: float = 0.1
    """Greedy plan: every layer keeps at least this fraction of its heads / channels."""
    tolerance: float = 0.02
    """The report flags a result further than this fraction from the target."""

    def __post_init__(self) -> None:
        self.structures = tuple(self.structures)
        if (self.target_params is None) == (self.target_macs is None):
            raise ValueError("give exactly one of target_params and target_macs")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, got {self.plan!r}")
        if self.importance == "none" and self.plan != "uniform":
            raise ValueError("importance 'none' (no values) only works with the uniform plan: pass plan='uniform'")
        bad = [s for s in self.structures if s not in STRUCTURES]
        if bad or not self.structures:
            raise ValueError(f"structures must be a non-empty subset of {STRUCTURES}, got {list(self.structures)}")
        target = self.target_params if self.target_params is not None else self.target_macs
        if not target > 0:
            raise ValueError(f"the target must be positive, got {target}")

    @property
    def metric(self) -> str:
        return "params" if self.target_params is not None else "macs"


def sr_loss(pipe: SanaSRPipeline, transformer: torch.nn.Module, batch: PreparedBatch) -> torch.Tensor:
    """Pixel MSE in [-1, 1] of decode(z_L - sigma* v(z_L, t*, c)) against HQ: the one-step SR loss."""
    restored = one_step_restore(transformer, batch.latents, batch.embeds, batch.mask, pipe.timestep, pipe.sigma)
    return F.mse_loss(pipe.decode(restored).float(), batch.target.float())


def cost_model(pipe: SanaSRPipeline, output_size: int) -> CostModel:
    """The DiT's params and MACs per head / channel / block at `output_size`, counted by `sana_sr.model.cost`."""
    from sana_sr.model.cost import dit_cost

    side = -(-output_size // pipe.size_multiple) * pipe.size_multiple // pipe.vae.spatial_compression_ratio
    tokens = pipe.config.max_sequence_length
    config = pipe.transformer.config

    def count(model):
        c = dit_cost(model, (side, side), tokens)
        return c.params, c.macs

    return CostModel.measure(lambda widths: skeleton(config, widths), count, model_widths(pipe.transformer)[0])


def importance_scores(pipe: SanaSRPipeline, method: str, batches: Sequence[CalibrationBatch] | None = None,
                      progress: Callable | None = None) -> Scores | None:
    """Scores of every head, channel and block of the pipeline's DiT by `method` (None for "none")."""
    if method == "none":
        return None
    if pipe.transformer.device.type == "meta":
        raise ValueError(f"importance {method!r} needs weight values; the model is on the meta device: "
                         "use importance='none' with plan='uniform'")
    if method == "magnitude":
        return score(DIT, pipe.transformer, "magnitude")
    if not batches:
        raise ValueError(f"importance {method!r} needs calibration batches")
    prepared = prepare_batches(pipe, batches, null_prompt=method == "taylor-null")
    return score(DIT, pipe.transformer, method, lambda model, b: sr_loss(pipe, model, b), prepared, progress)


def prune_pipeline(pipe: SanaSRPipeline, settings: PruneSettings, batches: Sequence[CalibrationBatch] | None = None,
                   progress: Callable | None = None, scores: Scores | None = None) -> dict:
    """Prune the pipeline's DiT in place (LoRA merged first) and return the report (sizes, plan, scores).

    `scores` skips the measurement (e.g. to prune one model to several sizes with the same scores).
    """
    start = time.perf_counter()
    pipe.merge_lora()
    dit = pipe.transformer
    widths = model_widths(dit)
    costs = cost_model(pipe, settings.output_size)
    before = costs.total(widths)
    counted = sum(p.numel() for p in dit.parameters())
    if round(before.params) != counted:
        raise RuntimeError(f"the cost model predicts {before.params:.0f} DiT parameters, the model has {counted}")
    metric = settings.metric
    target = settings.target_params if metric == "params" else settings.target_macs
    absolute = target * before.get(metric) if target <= 1 else float(target)
    if scores is None:
        scores = importance_scores(pipe, settings.importance, batches, progress)
    options = dict(metric=metric, structures=settings.structures, min_units=settings.min_heads,
                   channel_multiples={"channels": settings.channel_multiple})
    if settings.plan == "greedy":
        plan = greedy_plan(scores, widths, costs, absolute, min_keep_fraction=settings.min_keep_fraction, **options)
    else:
        plan = uniform_plan(widths, costs, absolute, scores=scores, **options)
    pruned = apply_plan(DIT, dit, plan)
    pipe.register_modules(transformer=pruned)
    after = costs.total(pruned.widths)
    if next(pruned.parameters()).device.type != "meta":
        counted = sum(p.numel() for p in pruned.parameters())
        if round(after.params) != counted:
            raise RuntimeError(f"pruned DiT has {counted} parameters, the cost model says {after.params:.0f}")
    error = (after.get(metric) - absolute) / absolute
    return {
        "settings": asdict(settings),
        "metric": metric,
        "target": absolute,
        "before": asdict(before),
        "after": asdict(after),
        "kept_fraction": {"params": after.params / before.params, "macs": after.macs / before.macs},
        "relative_error": error,
        "within_tolerance": abs(error) <= settings.tolerance,
        "macs_at_output": settings.output_size,
        "widths_before": [w.as_dict() for w in widths],
        "widths_after": [w.as_dict() for w in pruned.widths],
        "kept_blocks": list(pruned.config.kept_blocks),
        "plan": plan.to_json(),
        "scores": scores.to_json() if scores is not None else None,
        "seconds": round(time.perf_counter() - start, 2),
    }


def save_shapes_only(pipe: SanaSRPipeline, folder: str | Path, report_text: str | None = None, *,
                     owner: str = "save_shapes_only", overwrite: bool = False) -> None:
    """Write the configs of a meta-device pipeline (no weights): enough for `sana-sr cost --model FOLDER`.
    `owner` and `overwrite` as in `sana_sr.atomic.atomic_directory`."""
    with atomic_directory(folder, owner, overwrite=overwrite) as tmp:
        pipe.save_config(tmp)
        pipe.vae.save_config(tmp / "vae")
        pipe.transformer.save_config(tmp / "transformer")
        pipe.scheduler.save_pretrained(tmp / "scheduler")
        if pipe.text_encoder is not None:
            pipe.text_encoder.config.save_pretrained(tmp / "text_encoder")
        (tmp / "NO_WEIGHTS.md").write_text(
            "Shapes only: this folder was pruned on the meta device (no weight values), so it holds configs and no "
            "weights. It is for cost accounting (`sana-sr cost --model THIS_FOLDER`), not for inference.\n")
        if report_text is not None:
            (tmp / "pruning.json").write_text(report_text)
