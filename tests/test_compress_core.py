"""compress/: Hadamard transform, quantizer, packing, pruning mask, selection rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress import (
    LayerSpec,
    QuantizeConfig,
    SelectionRule,
    fake_quant,
    fwht,
    hadamard_matrix,
    pack_bits,
    plan,
    quantize,
    rotate,
    unpack_bits,
    unrotate,
)
from compress.hadamard import next_pow2
from compress.layers import QuantWeightLayer, magnitude_mask
from compress.quantizer import UniformQuantizer
from compress.select import execution_order
from tests.compress_nets import one_thread, toy_batches, toy_model  # noqa: F401 (autouse fixture)


# -- Hadamard ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048])
def test_fwht_equals_dense_reference(n):
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(n).T, atol=1e-12)


@pytest.mark.parametrize("n", [2, 16, 128])
def test_hadamard_orthogonal_and_involutive(n):
    h = fwht(torch.eye(n, dtype=torch.float64))
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(fwht(h), torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("d", [1, 3, 5, 60, 100, 160])
def test_rotation_with_padding_is_isometric_and_invertible(d):
    x = torch.randn(7, d, dtype=torch.float64)
    y = rotate(x)
    assert y.shape[-1] == next_pow2(d)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-10)
    assert torch.allclose(unrotate(y, d), x, atol=1e-12)
    w = torch.randn(4, d, dtype=torch.float64)
    assert torch.allclose(rotate(x) @ rotate(w).T, x @ w.T, atol=1e-10)


def test_rotation_along_other_dims():
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    y = rotate(x, dim=1)
    assert y.shape == (2, 8, 3, 3)
    assert torch.allclose(unrotate(y, 6, dim=1), x, atol=1e-12)


# -- quantizer -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_within_half_a_step(bits):
    lo, hi = torch.tensor(-0.7), torch.tensor(1.3)
    step = (hi - lo) / (2**bits - 1)
    x = torch.rand(10_000) * (hi - lo) + lo
    err = (fake_quant(x, lo, hi, bits) - x).abs()
    assert float(err.max()) <= float(step) / 2 + 1e-6
    # The integer-zero (weight) grid: values on its representable range are also within half a step.
    q = UniformQuantizer(bits, "channel", 3, integer_zero=True)
    q.set_bounds(torch.tensor([-1.0, -0.2, -3.0]), torch.tensor([1.0, 2.0, 0.5]))
    w = torch.rand(3, 1000) * 0.5 - 0.2
    scales = q.encode(w)[2]
    assert float(((q(w).detach() - w).abs() / scales[:, None]).max()) <= 0.5 + 1e-5
    assert torch.equal(q(torch.zeros(3, 1)), torch.zeros(3, 1))  # zero is exactly representable


def test_straight_through_gradients():
    x = torch.linspace(-2, 2, 401, requires_grad=True)
    q = UniformQuantizer(3)
    q.set_bounds(torch.tensor(-1.0), torch.tensor(1.0))
    q(x).sum().backward()
    inside, outside = x.detach().abs() < 1, x.detach().abs() > 1
    assert torch.allclose(x.grad[inside], torch.ones(())) and torch.all(x.grad[outside] == 0)
    assert q.lower.grad is not None and q.upper.grad is not None
    assert float(q.upper.grad) > 0 and float(q.lower.grad) > 0  # sum rises with either bound


def test_minmax_is_identity_at_8_bits_within_a_step():
    model, batches = toy_model(), toy_batches()
    reference = toy_model()
    result = quantize(model, batches, QuantizeConfig(method="minmax", wbits=8, abits=8))
    ref_modules = dict(reference.named_modules())
    layers = [(n, m) for n, m in result.model.named_modules() if isinstance(m, QuantWeightLayer)]
    assert layers
    for name, layer in layers:
        w = ref_modules[name].weight.detach()
        err = (layer.quantized_weight() - w).abs().flatten(1)
        assert torch.all(err <= layer.scales[:, None] * (1 + 1e-4)), name
    with torch.no_grad():
        out, ref = result.model(batches[0]), reference(batches[0])
    assert float((out - ref).abs().max()) < 0.02 * float(ref.abs().max())


# -- pruning and packing ---------------------------------------------------------------------------------------------------
def test_pruning_mask_is_deterministic_and_magnitude_based():
    w = torch.randn(16, 37)
    m1, m2 = magnitude_mask(w, 0.4), magnitude_mask(w.clone(), 0.4)
    assert torch.equal(m1, m2)
    assert int((~m1).sum()) == round(0.4 * w.numel())
    assert float(w[~m1].abs().max()) <= float(w[m1].abs().min())
    ties = torch.ones(4, 5)
    assert torch.equal(magnitude_mask(ties, 0.5), magnitude_mask(ties.clone(), 0.5))
    masks = []
    for _ in range(2):
        result = quantize(toy_model(), toy_batches(), QuantizeConfig(method="compsrt", wbits=3, abits=3, steps=2))
        masks.append({n: m.mask.clone() for n, m in result.model.named_modules()
                      if isinstance(m, QuantWeightLayer) and m.mask is not None})
    assert masks[0] and masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 9, 333, 4097])
def test_pack_unpack_exact(bits, count):
    values = torch.randint(0, 1 << bits, (count,), dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.numel() == (count * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, count), values)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="do not fit in 3 bits"):
        pack_bits(torch.tensor([8]), 3)


# -- selection ---------------------------------------------------------------------------------------------------------------
def test_selection_keeps_first_last_and_patterns_with_reasons():
    model = toy_model()
    order = execution_order(model, lambda: model(toy_batches(1)[0]))
    assert order[0] == "stem" and order[-1] == "head"
    rule = SelectionRule(keep=(("proj", "test: keep the projection"),))
    decisions = {d.name: d for d in plan(model, rule, order)}
    assert decisions["stem"].action == decisions["head"].action == "keep"
    assert "first layer" in decisions["stem"].reason and "last layer" in decisions["head"].reason
    assert decisions["proj"].action == "keep" and decisions["proj"].reason == "test: keep the projection"
    assert decisions["depthwise"].kind == "conv2d-depthwise" and decisions["depthwise"].action == "quantize"
    assert decisions["scores"].action == "quantize" and decisions["norm"].action == "keep"
    eight = {d.name: d for d in plan(model, SelectionRule(boundary_wbits=8), order)}
    assert eight["stem"].action == "weight-only" and eight["stem"].extra == {"wbits": 8}


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="method must be one of"):
        QuantizeConfig(method="gptq")
    with pytest.raises(ValueError, match="wbits must be in 2..8, got 1"):
        QuantizeConfig(wbits=1)
    with pytest.raises(TypeError, match="only nn.Linear and nn.Conv2d"):
        QuantWeightLayer.from_module(nn.LayerNorm(3), LayerSpec(4, 4))
