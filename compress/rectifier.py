"""SPR²Q's rectifier group: N low-rank weight increments ΔWᵢ = BᵢAᵢ per layer, mixed by routing weights gᵢ.

Three stages (paper §3.2): (a) group training — a small gating network routes each batch to a softmax mix of the
rectifiers, W'_q = Q(W + Σ gᵢ(x) ΔWᵢ); (b) offline static routing calibration — backbone and rectifiers frozen, one
fixed weight vector g per layer is learned; (c) inference — W' = W + Σ gᵢ ΔWᵢ is folded into the weight and quantized,
so the deployed layer costs exactly what a plain quantized layer costs.

Routing is per batch (the gate sees the batch-mean input feature), not per sample: the fake-quantized weight must be one
tensor per forward pass. The gate starts at zero (uniform routing) and every Bᵢ at zero (ΔW = 0, as LoRA), so training
starts from the quantized backbone exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import QuantWeightLayer


class RectifierGroup(nn.Module):
    """N rank-r increments for an (out × in_flat) weight, and the gate that mixes them."""

    def __init__(self, out_features: int, in_flat: int, gate_features: int, *, num: int = 4, rank: int = 8,
                 gate_dim: int = -1, generator: torch.Generator | None = None):
        super().__init__()
        if num < 1 or rank < 1:
            raise ValueError(f"need at least one rectifier of rank >= 1, got num={num}, rank={rank}")
        self.num, self.rank, self.gate_dim = num, rank, gate_dim
        bound = 1.0 / math.sqrt(in_flat)  # LoRA's A init (kaiming-uniform, a=sqrt(5)) has this bound
        self.A = nn.Parameter((torch.rand(num, rank, in_flat, generator=generator) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(num, out_features, rank))
        self.gate = nn.Linear(gate_features, num)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.static = nn.Parameter(torch.full((num,), 1.0 / num), requires_grad=False)
        self.routing = "dynamic"
        self.record: list[torch.Tensor] | None = None

    def routing_weights(self, x: torch.Tensor | None) -> torch.Tensor:
        """g (num,): the gate's softmax for this batch (dynamic) or the calibrated table entry (static)."""
        if self.routing == "static":
            return self.static
        if x is None:
            raise ValueError("dynamic routing needs the layer input")
        dims = [d for d in range(x.ndim) if d != self.gate_dim % x.ndim]
        pooled = x.float().mean(dim=dims)
        g = torch.softmax(self.gate(pooled), dim=-1)
        if self.record is not None:
            self.record.append(g.detach())
        return g

    def delta(self, g: torch.Tensor) -> torch.Tensor:
        """Σ gᵢ BᵢAᵢ, shape (out, in_flat)."""
        return torch.einsum("n,nor,nri->oi", g, self.B, self.A)


def attach(layer: QuantWeightLayer, *, num: int = 4, rank: int = 8,
           generator: torch.Generator | None = None) -> RectifierGroup | None:
    """Give `layer` a rectifier group; None (with no change) for rotated or grouped/depthwise layers.

    A depthwise kernel matrix is (C × k²) with k² ≈ 9: rank 8 would be a full fine-tune of it, not a low-rank
    correction (and PEFT refuses such LoRA for the same reason).
    """
    if layer.rotate or layer.conv.get("groups", 1) != 1:
        return None
    out_features = layer.weight_shape[0]
    in_flat = int(torch.Size(layer.weight_shape[1:]).numel())
    gate_dim = -1 if layer.kind == "linear" else 1
    layer.rectifier = RectifierGroup(out_features, in_flat, layer.in_size, num=num, rank=rank, gate_dim=gate_dim,
                                     generator=generator)
    return layer.rectifier


def rectifier_layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightLayer) and module.rectifier is not None:
            yield name, module


def set_routing(model: nn.Module, routing: str) -> None:
    for _, layer in rectifier_layers(model):
        layer.rectifier.routing = routing


@torch.no_grad()
def fuse(model: nn.Module) -> int:
    """W ← W + Σ gᵢ BᵢAᵢ with the static routing weights, then drop the rectifiers. Returns how many were fused."""
    count = 0
    for _, layer in rectifier_layers(model):
        rect = layer.rectifier
        layer.weight.data += rect.delta(rect.static).view(layer.weight_shape)
        layer.rectifier = None
        count += 1
    return count
