"""Calibration: observe activations on calibration batches, then set initial clipping bounds.

Bound initialisers: "minmax" (the observed range), "percentile", and "dobi" — 2DQuant's Distribution-Oriented
Bound Initialization: a grid of candidate ranges shrunk from the observed [min, max] (both ends inward by equal
steps, or only the upper end for non-negative data such as post-ReLU/softmax), keeping the one with the least
quantization MSE. Weights are searched per output channel, on the very values that will be quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .layers import QuantMatmul, QuantWeightLayer, quant_modules, set_mode
from .quantizer import UniformQuantizer, fake_quant

BOUND_METHODS = ("minmax", "percentile", "dobi")


class Observer:
    """Running min/max of a tensor stream plus a bounded uniform sample of its values (for searches)."""

    def __init__(self, max_samples: int = 1 << 16, seed: int = 0):
        self.max_samples = max_samples
        self.min = float("inf")
        self.max = float("-inf")
        self.chunks: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().flatten()
        if flat.numel() == 0:
            return
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        take = min(flat.numel(), max(self.max_samples // 8, 1))
        idx = torch.randint(flat.numel(), (take,), generator=self.generator)
        self.chunks.append(flat.cpu()[idx] if flat.device.type != "cpu" else flat[idx])
        total = sum(c.numel() for c in self.chunks)
        if total > 2 * self.max_samples:
            merged = torch.cat(self.chunks)
            keep = torch.randperm(merged.numel(), generator=self.generator)[: self.max_samples]
            self.chunks = [merged[keep]]

    def sample(self) -> torch.Tensor:
        """The kept sample, with the true extremes included (so searches start from the real range)."""
        if not self.chunks:
            raise RuntimeError("observer saw no data: the calibration batches never reached this layer")
        return torch.cat(self.chunks + [torch.tensor([self.min, self.max])])


def dobi(x: torch.Tensor, bits: int, *, candidates: int = 100, integer_zero: bool = False,
         mask: torch.Tensor | None = None, max_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row DOBI search on x (C, n) (optionally only over `mask`ed entries): returns (lo, hi), each (C,)."""
    x = x.float()
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    big = torch.finfo(torch.float32).max
    mn = torch.where(mask, x, big).amin(1)
    mx = torch.where(mask, x, -big).amax(1)
    empty = ~mask.any(1)
    mn, mx = torch.where(empty, 0.0, mn), torch.where(empty, 1e-8, mx)
    one_direction = mn >= 0
    span = (mx - mn).clamp_min(1e-12)
    steps = torch.arange(candidates, dtype=torch.float32)[:, None]
    lo_all = torch.where(one_direction, mn, mn + steps * span / (2 * candidates))
    hi_all = torch.where(one_direction, mx - steps * span / candidates, mx - steps * span / (2 * candidates))
    best_err = torch.full_like(mn, float("inf"))
    best_lo, best_hi = mn.clone(), mx.clone()
    chunk = max(1, max_elements // max(x.numel(), 1))
    w = mask.float()
    for start in range(0, candidates, chunk):
        lo = lo_all[start:start + chunk, :, None]
        hi = hi_all[start:start + chunk, :, None]
        err = ((fake_quant(x[None], lo, hi, bits, integer_zero=integer_zero) - x[None]) ** 2 * w).sum(-1)
        k = err.argmin(0)
        cand = err.gather(0, k[None])[0]
        better = cand < best_err
        rows = torch.arange(x.shape[0])
        best_err = torch.where(better, cand, best_err)
        best_lo = torch.where(better, lo[k, rows, 0], best_lo)
        best_hi = torch.where(better, hi[k, rows, 0], best_hi)
    return best_lo, best_hi


def search_bounds(x: torch.Tensor, bits: int, method: str, *, integer_zero: bool = False,
                  mask: torch.Tensor | None = None, percentile: float = 0.999,
                  candidates: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (lo, hi) per row of x (C, n) by `method`."""
    if method not in BOUND_METHODS:
        raise ValueError(f"bound method must be one of {BOUND_METHODS}, got {method!r}")
    if method == "dobi":
        return dobi(x, bits, candidates=candidates, integer_zero=integer_zero, mask=mask)
    rows = list(x) if mask is None else [r[m] for r, m in zip(x, mask)]
    rows = [r if r.numel() else torch.zeros(1) for r in rows]
    if method == "minmax":
        return torch.stack([r.min() for r in rows]), torch.stack([r.max() for r in rows])
    q = torch.tensor([1 - percentile, percentile])
    ranges = torch.stack([torch.quantile(r.float(), q) for r in rows])
    return ranges[:, 0], ranges[:, 1]


def init_weight_bounds(model: nn.Module, method: str, candidates: int = 100) -> None:
    """Per-channel weight bounds of every (unfinalized) quantized layer, from its base weight W (rectifiers start
    at ΔW = 0, so this is also right for SPR²Q)."""
    for _, module in quant_modules(model):
        if isinstance(module, QuantWeightLayer) and not module.finalized:
            w = module.weight.detach().flatten(1)
            mask = module.mask.flatten(1) if module.mask is not None else None
            lo, hi = search_bounds(w, module.wq.bits, method, integer_zero=True, mask=mask, candidates=candidates)
            module.wq.set_bounds(lo, hi)


def _activation_quantizers(model: nn.Module):
    for name, module in quant_modules(model):
        if isinstance(module, QuantWeightLayer) and module.aq is not None:
            yield name, [module.aq], module
        elif isinstance(module, QuantMatmul):
            yield name, [module.qa, module.qb], module


@torch.no_grad()
def observe(model: nn.Module, batches: Iterable, forward: Callable, max_samples: int = 1 << 16) -> int:
    """Run `batches` through `model` in observe mode, attaching an Observer to every activation quantizer."""
    sites = list(_activation_quantizers(model))
    for i, (_, quantizers, module) in enumerate(sites):
        observers = [Observer(max_samples, seed=2 * i + j) for j in range(len(quantizers))]
        module.observer = observers[0] if len(observers) == 1 else tuple(observers)
    set_mode(model, "observe")
    n = 0
    try:
        for batch in batches:
            forward(model, batch)
            n += 1
    finally:
        set_mode(model, "quant")
    return n


def init_activation_bounds(model: nn.Module, method: str, candidates: int = 100) -> None:
    """Set per-tensor activation bounds from the observers of `observe` (per-token quantizers keep ratio 1)."""
    for name, quantizers, module in _activation_quantizers(model):
        observers = module.observer if isinstance(module.observer, tuple) else (module.observer,)
        for quantizer, obs in zip(quantizers, observers):
            if quantizer.granularity == "token":
                quantizer.set_ratios(1.0, 1.0)
                continue
            if obs is None or not obs.chunks:
                raise RuntimeError(f"no calibration data reached {name!r}: check the forward function and batches")
            lo, hi = search_bounds(obs.sample()[None], quantizer.bits, method, candidates=candidates)
            quantizer.set_bounds(lo, hi)
        module.observer = None


def activation_quantizer_list(model: nn.Module) -> list[UniformQuantizer]:
    return [q for _, qs, _ in _activation_quantizers(model) for q in qs]
