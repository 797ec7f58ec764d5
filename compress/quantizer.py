"""Uniform asymmetric fake quantization with learnable clipping bounds and straight-through rounding.

The quantize–dequantize map of SPR²Q's Eq. 1 / 2DQuant, with CompSRT's two additive corrections:

    x̂ = clip(x, a, b),   s = (b − a)/(2ⁿ − 1) + δs,   z = a + δz,   x_q = round((x̂ − z)/s)·s + z

Weights use an *integer* zero point instead (zp = round(−z/s), x_q = (round(x̂/s) + zp − zp)·s), so that zero is
exactly representable (as CompSRT's text asks) and the zero point costs n bits on disk instead of a float, and their
scale is rounded to the storage dtype (fp16) in every forward pass, straight-through: the fake-quant weights are then
bit for bit what the packed export decodes to. Bounds and corrections are stored in units of the initial range and
step, so one learning rate moves every quantizer by a similar *relative* amount.
"""

from __future__ import annotations

import torch
from torch import nn

GRANULARITIES = ("tensor", "channel", "token")
MIN_SCALE = 2.0**-24  # the smallest fp16 subnormal: a snapped scale never rounds to zero


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward. Without autograd it is exactly torch.round (export relies on that)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


class _GridClamp(torch.autograd.Function):
    """clamp(x, 0, levels) whose gradient passes on the whole closed interval [0, levels] and stops outside.

    The gradient of `torch.clamp` at exactly its bound is not a stable contract (torch 2.13 passes it, 2.14 does
    not), and a code rounded into the lowest or highest bin sits exactly on the bound: with `clamp` the
    straight-through estimator would silently lose those bins' gradient on some releases."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int) -> torch.Tensor:
        ctx.save_for_backward((x >= 0) & (x <= levels))
        return x.clamp(0, levels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def grid_clamp(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes clipped to 0..levels (see `_GridClamp` for the gradient)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.clamp(0, levels)
    return _GridClamp.apply(x, levels)


def ste_cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Round values to `dtype` precision (kept in x's dtype), identity backward."""
    if dtype is None or dtype == x.dtype:
        return x
    snapped = x.detach().to(dtype).to(x.dtype)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return snapped
    return x + (snapped - x).detach()


def quant_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, delta_scale=0.0, delta_zero=0.0,
                 scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero offset) of the grid for bounds [lo, hi]."""
    levels = 2**bits - 1
    scale = ste_cast(((hi - lo) / levels + delta_scale).clamp_min(MIN_SCALE), scale_dtype).clamp_min(MIN_SCALE)
    return scale, lo + delta_zero


def fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, *, delta_scale=0.0,
               delta_zero=0.0, integer_zero: bool = False, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize–dequantize `x` on the grid of [lo, hi] (broadcast against x)."""
    levels = 2**bits - 1
    scale, zero = quant_params(lo, hi, bits, delta_scale, delta_zero, scale_dtype)
    clipped = torch.clamp(x, lo, hi)
    if integer_zero:
        zp = grid_clamp(ste_round(-zero / scale), levels)
        q = grid_clamp(ste_round(clipped / scale) + zp, levels)
        return (q - zp) * scale
    if not (torch.is_grad_enabled() and clipped.requires_grad):
        # Inference: the same operations in place (activations are the big tensors here).
        return clipped.sub_(zero).div_(scale).round_().clamp_(0, levels).mul_(scale).add_(zero)
    q = grid_clamp(ste_round((clipped - zero) / scale), levels)
    return q * scale + zero


class UniformQuantizer(nn.Module):
    """An n-bit asymmetric quantizer with learnable bounds (a, b) and CompSRT's corrections (δs, δz).

    granularity: "tensor" (one grid), "channel" (one grid per index of dim 0 of the input: weights reshaped to
    (out, -1)) or "token" (dynamic: each token's min/max along `token_dim`, times learnable clip ratios a, b).
    """

    def __init__(self, bits: int, granularity: str = "tensor", channels: int = 1, *, integer_zero: bool = False,
                 scale_dtype: torch.dtype | None = None, token_dim: int = -1):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        n = channels if granularity == "channel" else 1
        self.bits = bits
        self.granularity = granularity
        self.integer_zero = integer_zero
        self.scale_dtype = scale_dtype
        self.token_dim = token_dim
        self.lower = nn.Parameter(torch.full((n,), -1.0 if granularity == "token" else -0.5))
        self.upper = nn.Parameter(torch.full((n,), 1.0 if granularity == "token" else 0.5))
        self.delta_scale = nn.Parameter(torch.zeros(n), requires_grad=False)
        self.delta_zero = nn.Parameter(torch.zeros(n), requires_grad=False)
        self.register_buffer("unit", torch.ones(n))

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}, integer_zero={self.integer_zero}"

    @torch.no_grad()
    def set_bounds(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the clipping bounds (real units); resets the corrections and the units the parameters live in."""
        if self.granularity == "token":
            raise ValueError("a per-token quantizer has clip ratios, not bounds: use set_ratios")
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1).expand_as(self.lower)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1).expand_as(self.upper)
        hi = torch.maximum(hi, lo + 1e-8)
        unit = (hi - lo).abs().clamp_min(1e-8)
        self.unit.copy_(unit)
        self.lower.copy_(lo / unit)
        self.upper.copy_(hi / unit)
        self.delta_scale.zero_()
        self.delta_zero.zero_()

    @torch.no_grad()
    def set_ratios(self, lo_ratio: float, hi_ratio: float) -> None:
        self.lower.fill_(lo_ratio)
        self.upper.fill_(hi_ratio)

    def bounds(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) broadcastable against `x`."""
        if self.granularity == "token":
            detached = x.detach()
            lo = detached.amin(dim=self.token_dim, keepdim=True).clamp_max(0) * self.lower.abs()
            hi = detached.amax(dim=self.token_dim, keepdim=True).clamp_min(0) * self.upper.abs()
            return lo, torch.maximum(hi, lo + 1e-8)
        lo, hi = self.lower * self.unit, self.upper * self.unit
        if self.granularity == "channel" and x is not None:
            shape = (-1,) + (1,) * (x.ndim - 1)
            return lo.view(shape), hi.view(shape)
        return lo, hi

    def _deltas(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.unit / self.levels
        ds, dz = self.delta_scale * step, self.delta_zero * step
        if self.granularity == "channel":
            shape = (-1,) + (1,) * (like.ndim - 1)
            return ds.view(shape), dz.view(shape)
        return ds, dz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bounds(x)
        ds, dz = self._deltas(x)
        return fake_quant(x, lo, hi, self.bits, delta_scale=ds, delta_zero=dz,
                          integer_zero=self.integer_zero, scale_dtype=self.scale_dtype)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes of a per-channel, integer-zero quantizer: (codes uint8 like x, zero codes (C,), scales (C,)).

        The same operations as `forward`, so (codes - zp) * scale reproduces forward(x) bit for bit.
        """
        if not (self.integer_zero and self.granularity == "channel"):
            raise ValueError("only per-channel integer-zero quantizers (weights) are stored as codes")
        lo, hi = self.bounds(x)
        ds, dz = self._deltas(x)
        scale, zero = quant_params(lo, hi, self.bits, ds, dz, self.scale_dtype)
        zp = torch.round(-zero / scale).clamp(0, self.levels)
        clipped = torch.clamp(x, lo, hi)
        q = (torch.round(clipped / scale) + zp).clamp(0, self.levels)
        return q.to(torch.uint8), zp.reshape(-1).to(torch.uint8), scale.reshape(-1)

    def trainable(self, bounds: bool = True, corrections: bool = False) -> list[nn.Parameter]:
        """Switch which parameters learn; returns those that do."""
        self.lower.requires_grad_(bounds)
        self.upper.requires_grad_(bounds)
        self.delta_scale.requires_grad_(corrections)
        self.delta_zero.requires_grad_(corrections)
        return [p for p in (self.lower, self.upper, self.delta_scale, self.delta_zero) if p.requires_grad]


def dequantize(codes: torch.Tensor, zero_codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(codes - zp) * scale per row of a (C, ...) code tensor: the inverse of `UniformQuantizer.encode`."""
    shape = (-1,) + (1,) * (codes.ndim - 1)
    return (codes.float() - zero_codes.float().view(shape)) * scales.view(shape)
