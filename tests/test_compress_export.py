"""compress/: SPR²Q fusion, every method end to end, packed export and reload."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress import (
    METHODS,
    LayerSpec,
    QuantizeConfig,
    SelectionRule,
    export_quantized,
    export_size,
    fp16_reference_bytes,
    load_quantized,
    nominal_bits,
    quantize,
    read_layout,
)
from compress.layers import QuantWeightLayer, set_mode
from compress.rectifier import attach, fuse
from tests.compress_nets import one_thread, toy_batches, toy_model  # noqa: F401 (autouse fixture)


@pytest.mark.parametrize("module", [nn.Linear(12, 10), nn.Conv2d(6, 5, 3, padding=1, stride=2)])
def test_spr2q_fused_equals_unfused_before_quantization(module):
    torch.manual_seed(0)
    layer = QuantWeightLayer.from_module(module, LayerSpec(4, 4))
    group = attach(layer, num=4, rank=3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        group.B.normal_(0, 0.1)  # B = 0 at init would make the test vacuous
        group.static.copy_(torch.tensor([0.5, -0.2, 1.1, 0.3]))
    group.routing = "static"
    layer.mode = "fp"
    x = torch.randn(2, 12) if isinstance(module, nn.Linear) else torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        unfused = layer.unfused_forward(x)
        assert not torch.allclose(unfused, module(x), atol=1e-3)  # the rectifiers do change the output
        assert fuse(layer) == 1 and layer.rectifier is None
        fused = layer(x)
    assert torch.allclose(fused, unfused, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_exports_and_reloads_exactly(method, tmp_path):
    batches, reference = toy_batches(), toy_model()
    config = QuantizeConfig(method=method, wbits=3, abits=4, steps=3, routing_steps=2, rank=2)
    result = quantize(toy_model(), batches, config, feature_modules=["proj"])
    model = result.model
    assert all(m.finalized for m in model.modules() if isinstance(m, QuantWeightLayer))
    if method != "minmax":
        assert all(len(v) > 0 for v in result.losses.values())
    layout = export_quantized(model, tmp_path / "q", metadata={"method": method})
    reloaded = load_quantized(toy_model(seed=123), tmp_path / "q")  # different random init: all state comes from disk
    x = toy_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
        assert not torch.equal(model(x), reference(x))
    layers = layout["layers"]
    assert layers and read_layout(tmp_path / "q")["metadata"] == {"method": method}
    pruned = [spec for spec in layers.values() if spec[4] > 0]  # [wbits, abits, granularity, rotate, prune]
    assert bool(pruned) == (method == "compsrt")  # CompSRT prunes at 3 bits
    bits = nominal_bits(layout)["bits_per_weight"]
    # b·(1−p)+1 = 2.8 for the pruned dense layers, 3 for the depthwise conv (never rotated, never pruned).
    assert 2.8 - 0.01 < bits < 3 if pruned else bits == 3


def test_per_token_activations_and_weight_only_boundaries_round_trip(tmp_path):
    config = QuantizeConfig(method="2dquant", wbits=2, abits=3, act_granularity="token", steps=2)
    result = quantize(toy_model(), toy_batches(), config, rule=SelectionRule(boundary_wbits=8))
    export_quantized(result.model, tmp_path)
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert layout["layers"]["stem"][:2] == [8, None]  # weight-only, 8 bits
    assert layout["layers"]["expand"][2] == "token"
    reloaded = load_quantized(toy_model(seed=5), tmp_path)
    x = toy_batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


@pytest.mark.parametrize("spec", [LayerSpec(4, 4), LayerSpec(3, 3, rotate=True, prune=0.4), LayerSpec(2, None)])
def test_finalized_codes_reproduce_fake_quant_bit_for_bit(spec):
    torch.manual_seed(0)
    layer = QuantWeightLayer.from_module(nn.Conv2d(6, 10, 3, padding=1), spec)
    rows = layer.weight.detach().flatten(1)
    layer.wq.set_bounds(rows.amin(1) * 0.8, rows.amax(1) * 0.7)  # clipping on both sides
    with torch.no_grad():
        layer.wq.delta_scale.fill_(0.05)  # CompSRT's corrections take part too
        layer.wq.delta_zero.fill_(-0.3)
    layer.aq.set_bounds(torch.tensor(-1.0), torch.tensor(1.0)) if layer.aq is not None else None
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        fake_weight, fake_out = layer.quantized_weight(), layer(x)
        layer.finalize()
        assert torch.equal(layer.quantized_weight(), fake_weight)
        assert torch.equal(layer(x), fake_out)


def test_export_refuses_unfinalized_and_mismatched_skeletons(tmp_path):
    model = toy_model()
    result = quantize(model, toy_batches(), QuantizeConfig(method="minmax", wbits=4, abits=4))
    export_quantized(result.model, tmp_path)
    wrong = toy_model()
    wrong.proj = nn.Linear(24, 21)
    with pytest.raises(Exception, match="does not match the exported architecture"):
        load_quantized(wrong, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a compress export"):
        load_quantized(toy_model(), tmp_path / "nowhere")
    layer = QuantWeightLayer.from_module(nn.Linear(4, 4), LayerSpec(4, 4))
    holder = nn.Sequential(layer)
    with pytest.raises(ValueError, match="not finalized"):
        export_quantized(holder, tmp_path / "x")
    set_mode(holder, "fp")


def test_sizes_are_reported_from_the_file(tmp_path):
    model = toy_model()
    reference_bytes = fp16_reference_bytes(model, tmp_path)
    result = quantize(model, toy_batches(), QuantizeConfig(method="minmax", wbits=2, abits=4))
    export_quantized(result.model, tmp_path / "q")
    on_disk = export_size(tmp_path / "q")
    assert on_disk == sum(p.stat().st_size for p in (tmp_path / "q").iterdir())
    assert reference_bytes > 0 and on_disk > 0
