"""Quantized stand-ins for nn.Linear, nn.Conv2d (dense, 1x1, grouped, depthwise) and matmul sites.

Every quantized module has a `mode`:
  "fp"      — full precision (rotation, if any, still applied: it is exact), used as reference;
  "observe" — full precision, and each activation input is shown to its attached observer (calibration);
  "quant"   — fake quantization of weights and activations (training, evaluation, the exported model).

A weight layer starts from a float weight (`from_module`) and ends `finalize`d: the weight is replaced by integer
codes, per-channel zero codes and fp16 scales — exactly what the packed export stores and the loader restores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hadamard import next_pow2, rotate
from .quantizer import UniformQuantizer, dequantize


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized (decided by the selection rule and the method)."""

    wbits: int
    """Weight bits (2..8)."""
    abits: int | None
    """Activation bits of the layer input; None leaves the input in full precision."""
    act_granularity: str = "tensor"
    """"tensor" (one static grid) or "token" (a dynamic grid per token/pixel)."""
    rotate: bool = False
    """Hadamard-rotate the contracted dimension of input and weight (CompSRT); dense layers only."""
    prune: float = 0.0
    """Fraction of (rotated) weights zeroed by magnitude before quantization, stored with a 1-bit mask."""


class MatMul(nn.Module):
    """A full-precision matmul site: models mark the matmuls they want quantizable with it (no parameters)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


def magnitude_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """Keep-mask pruning the `ratio` smallest |w|; ties go by flat index (stable sort), so it is deterministic."""
    if ratio <= 0:
        return None
    k = int(round(ratio * weight.numel()))
    order = torch.argsort(weight.detach().abs().flatten(), stable=True)
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    mask[order[:k]] = False
    return mask.view(weight.shape)


class QuantWeightLayer(nn.Module):
    """A Linear or Conv2d with quantized weight (per output channel) and quantized input (per tensor or token)."""

    def __init__(self, kind: str, weight_shape: tuple[int, ...], in_size: int, spec: LayerSpec, *, bias: bool,
                 conv: dict | None = None, scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        if kind not in ("linear", "conv2d"):
            raise ValueError(f"kind must be 'linear' or 'conv2d', got {kind!r}")
        self.kind = kind
        self.spec = spec
        self.in_size = in_size
        self.conv = dict(conv or {})
        self.rotate = spec.rotate
        self.weight_shape = tuple(weight_shape)
        self.mode = "quant"
        self.observer = None
        self.weight = nn.Parameter(torch.zeros(weight_shape), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(weight_shape[0]), requires_grad=False) if bias else None
        self.register_buffer("mask", torch.ones(weight_shape, dtype=torch.bool) if spec.prune > 0 else None)
        self.wq = UniformQuantizer(spec.wbits, "channel", weight_shape[0], integer_zero=True, scale_dtype=scale_dtype)
        token_dim = -1 if kind == "linear" else 1
        self.aq = UniformQuantizer(spec.abits, spec.act_granularity, token_dim=token_dim) if spec.abits else None
        self.rectifier = None
        self.finalized = False

    # -- construction --------------------------------------------------------------------------------------------
    @staticmethod
    def geometry(module: nn.Module, spec: LayerSpec) -> tuple[str, tuple[int, ...], int, dict | None]:
        """(kind, stored weight shape, input size, conv arguments) of the quantized stand-in for `module`."""
        if isinstance(module, nn.Linear):
            kind, conv = "linear", None
        elif isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(f"Conv2d with padding {module.padding!r}/{module.padding_mode!r} is not supported")
            kind = "conv2d"
            conv = dict(stride=tuple(module.stride), padding=tuple(module.padding),
                        dilation=tuple(module.dilation), groups=module.groups)
            if spec.rotate and module.groups != 1:
                raise ValueError(f"cannot rotate a grouped conv (groups={module.groups}): rotation mixes channels")
        else:
            raise TypeError(f"cannot quantize {type(module).__name__}: only nn.Linear and nn.Conv2d")
        shape = list(module.weight.shape)
        in_size = shape[1]
        if spec.rotate:
            shape[1] = next_pow2(in_size)
        return kind, tuple(shape), in_size, conv

    @classmethod
    def from_module(cls, module: nn.Module, spec: LayerSpec, scale_dtype: torch.dtype = torch.float16):
        """Wrap a float nn.Linear / nn.Conv2d: copy (and rotate, prune) its weight, keep its bias."""
        kind, shape, in_size, conv = cls.geometry(module, spec)
        weight = module.weight.detach().float().clone()
        if spec.rotate:
            weight = rotate(weight, dim=1)
        layer = cls(kind, shape, in_size, spec, bias=module.bias is not None, conv=conv, scale_dtype=scale_dtype)
        mask = magnitude_mask(weight, spec.prune)
        if mask is not None:
            weight = weight * mask
            layer.mask.copy_(mask)
        layer.weight.data.copy_(weight)
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach().float())
        return layer

    @classmethod
    def empty_like(cls, module: nn.Module, spec: LayerSpec, scale_dtype: torch.dtype = torch.float16):
        """A finalized layer with placeholder codes, shaped for the float `module` (the loader fills it in)."""
        kind, shape, in_size, conv = cls.geometry(module, spec)
        layer = cls(kind, shape, in_size, spec, bias=module.bias is not None, conv=conv, scale_dtype=scale_dtype)
        rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
        layer.set_codes(torch.zeros(rows, cols, dtype=torch.uint8), torch.zeros(rows, dtype=torch.uint8),
                        torch.ones(rows))
        return layer

    # -- weights ---------------------------------------------------------------------------------------------------
    def float_weight(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """The weight before quantization: W, or W + Σ gᵢBᵢAᵢ while SPR²Q rectifiers are attached."""
        if self.rectifier is None:
            return self.weight
        delta = self.rectifier.delta(self.rectifier.routing_weights(x))
        return self.weight + delta.view(self.weight_shape)

    def quantized_weight(self, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.finalized:
            w = dequantize(self.codes, self.zero_codes, self.scales).view(self.weight_shape)
        else:
            w = self.float_weight(x)
            w = self.wq(w.flatten(1)).view(self.weight_shape)
        if self.mask is not None:
            w = torch.where(self.mask, w, torch.zeros((), dtype=w.dtype))
        return w

    @torch.no_grad()
    def finalize(self) -> None:
        """Replace the float weight by integer codes + zero codes + scales (what the export packs)."""
        if self.finalized:
            return
        if self.rectifier is not None:
            raise RuntimeError("fuse the SPR²Q rectifiers (compress.spr2q.fuse) before finalizing")
        codes, zero_codes, scales = self.wq.encode(self.weight.flatten(1))
        if self.mask is not None:
            # Pruned slots are not stored; the loader refills them with the row's zero code, so do the same here.
            flat_mask = self.mask.flatten(1)
            codes = torch.where(flat_mask, codes, zero_codes[:, None].expand_as(codes))
        self.set_codes(codes, zero_codes, scales)

    def set_codes(self, codes: torch.Tensor, zero_codes: torch.Tensor, scales: torch.Tensor) -> None:
        del self.weight
        self.weight = None
        self.wq = None
        self.register_buffer("codes", codes.reshape(self.weight_shape[0], -1).to(torch.uint8).contiguous())
        self.register_buffer("zero_codes", zero_codes.to(torch.uint8).contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.finalized = True

    # -- forward ---------------------------------------------------------------------------------------------------
    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, **self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_input = x
        if self.rotate:
            x = rotate(x, dim=-1 if self.kind == "linear" else 1)
        if self.mode == "quant":
            xq = self.aq(x) if self.aq is not None else x
            return self._op(xq, self.quantized_weight(gate_input))
        if self.mode == "observe" and self.observer is not None:
            self.observer.update(x)
        if self.finalized:
            return self._op(x, self.quantized_weight())
        return self._op(x, self.float_weight(gate_input))

    def unfused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full precision, rectifiers as separate low-rank branches: y = W x + Σ gᵢ Bᵢ(Aᵢ x) (SPR²Q's reference)."""
        if self.rectifier is None or self.rotate:
            raise RuntimeError("unfused_forward needs attached rectifiers on an unrotated layer")
        g = self.rectifier.routing_weights(x)
        y = self._op(x, self.weight)
        rect = self.rectifier
        for i in range(rect.num):
            if self.kind == "linear":
                y = y + g[i] * F.linear(F.linear(x, rect.A[i]), rect.B[i])
            else:
                a = rect.A[i].view(rect.rank, *self.weight_shape[1:])
                h = F.conv2d(x, a, None, **self.conv)
                y = y + g[i] * F.conv2d(h, rect.B[i][:, :, None, None])
        return y

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{self.kind}, weight={self.weight_shape}, w{s.wbits}a{s.abits or 'fp'}, rotate={self.rotate}, "
                f"prune={s.prune}, finalized={self.finalized}")

    def layout(self) -> list:
        """[wbits, abits, act granularity, rotate, prune]: with the float skeleton, all the loader needs."""
        s = self.spec
        return [s.wbits, s.abits, s.act_granularity, s.rotate, s.prune]


class QuantMatmul(nn.Module):
    """torch.matmul(a, b) with both inputs fake-quantized; optionally rotated along the contracted dimension."""

    def __init__(self, abits: int, granularity: str = "tensor", rotate: bool = False):
        super().__init__()
        self.abits = abits
        self.rotate = rotate
        self.mode = "quant"
        self.observer = None  # a pair (for a, for b) while calibrating
        self.qa = UniformQuantizer(abits, granularity, token_dim=-1)
        self.qb = UniformQuantizer(abits, granularity, token_dim=-2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.rotate:
            a, b = rotate(a, dim=-1), rotate(b, dim=-2)
        if self.mode == "quant":
            return torch.matmul(self.qa(a), self.qb(b))
        if self.mode == "observe" and self.observer is not None:
            self.observer[0].update(a)
            self.observer[1].update(b)
        return torch.matmul(a, b)

    def extra_repr(self) -> str:
        return f"a{self.abits}, granularity={self.qa.granularity}, rotate={self.rotate}"

    def layout(self) -> list:
        """[abits, act granularity, rotate]."""
        return [self.abits, self.qa.granularity, self.rotate]

    @classmethod
    def from_layout(cls, layout: list) -> "QuantMatmul":
        return cls(*layout)


def quant_modules(model: nn.Module):
    """(name, module) for every quantized layer and matmul site of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, (QuantWeightLayer, QuantMatmul)):
            yield name, module


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every quantized module of `model` in `mode` ("fp", "observe" or "quant")."""
    if mode not in ("fp", "observe", "quant"):
        raise ValueError(f"mode must be 'fp', 'observe' or 'quant', got {mode!r}")
    for _, module in quant_modules(model):
        module.mode = mode


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` inside `model`."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
