"""Integer execution (compress.integer): each integer layer against its fake-quant layer, whole models against their
fake-quant reference within the stated tolerance, the loaders' execution switch, and the memory of an integer load.

Tolerance (docs/compression.md, "Integer execution"): one layer, on inputs a tenth of a step or more from every
rounding tie, within 1e-5 of its output's largest magnitude (the integer kernel gets the codes the fake-quant path
rounds to; only the float accumulation order differs). A whole pipeline: a value within float error of a tie may
round to the other side in one path, and at 4-bit activations one step is 1/15 of a layer's range, so the tiny
SANA-SR pipeline is held to PSNR >= 40 dB between the integer and the fake-quant output (measured here at a 24x32
input: 45-48 dB at 4-bit activations, 59 dB at 8-bit; benchmarks/integer_quality.py on the held-back photos).
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from compress import QuantizeConfig, quantize
from compress.integer import FusedFakeQuantMatmul, Grid, IntegerLayer, integer_blocker, kernels_available, to_integer
from compress.layers import QuantMatmul, QuantWeightLayer
from tests.compress_nets import ToyRestorer, one_thread, toy_batches  # noqa: F401 (autouse fixture)
from tests.conftest import ASSETS

pytestmark = pytest.mark.skipif(not kernels_available(), reason="this PyTorch build has no oneDNN int8 kernels")

LAYER_TOLERANCE = 1e-5
PIPELINE_PSNR_DB = 40.0


class ToyPlus(ToyRestorer):
    """The toy restorer plus a strided 3x3 conv, a grouped 1x1 conv and a 5x5 conv (every geometry the kernels
    take, and the edge strips of each padding)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(12, 12, 1, groups=3)
        self.wide = nn.Conv2d(12, 3, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        side = self.wide(self.grouped(torch.relu(self.down(y))))
        return y + nn.functional.interpolate(side, size=y.shape[-2:])


def quantized_toy(method: str, wbits: int, abits: int, granularity: str = "tensor") -> nn.Module:
    torch.manual_seed(0)
    model = ToyPlus().eval()
    config = QuantizeConfig(method=method, wbits=wbits, abits=abits, steps=2, routing_steps=1,
                            act_granularity=granularity)
    return quantize(model, toy_batches(), config).model


CASES = [("minmax", 8, 8), ("minmax", 4, 8), ("2dquant", 3, 4), ("compsrt", 4, 4), ("spr2q", 2, 2)]


@pytest.mark.parametrize("method, wbits, abits", CASES)
def test_each_integer_layer_matches_its_fake_quant_layer(method, wbits, abits):
    model = quantized_toy(method, wbits, abits)
    generator = torch.Generator().manual_seed(1)
    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantWeightLayer) or layer.aq is None:
            continue
        fast = IntegerLayer(layer)
        grid = fast.grid
        if layer.kind == "linear":
            shape = (2, 7, layer.in_size)
        else:
            shape = (2, layer.in_size if layer.rotate else layer.weight_shape[1] * layer.conv["groups"], 9, 7)
        if layer.rotate:  # what the layer quantizes is the rotated input: spread it over and past the bounds
            x = torch.randn(shape, generator=generator) * float(grid.hi - grid.lo)
        else:  # on and past the grid, a tenth of a step or more from every rounding tie (where either side is right)
            steps = torch.randint(-8, grid.levels + 8, shape, generator=generator).float()
            offset = torch.rand(shape, generator=generator) * 0.3 + 0.1
            offset = torch.where(torch.rand(shape, generator=generator) < 0.5, offset, 1 - offset)
            x = grid.z + (steps + offset) * grid.s
        with torch.no_grad():
            reference, out = layer(x), fast(x)
        assert out.shape == reference.shape
        scale = reference.abs().max().item()
        assert (out - reference).abs().max().item() <= LAYER_TOLERANCE * scale, name
        checked += 1
    assert checked >= 5


def test_scratch_buffer_is_reused_up_to_its_bound_and_changes_no_output(monkeypatch):
    """Each layer's shifted input goes to one per-thread buffer (kept up to SCRATCH_KEPT_BYTES); an input above the
    bound gets a tensor of its own. Same outputs either way, convs (channels-last) and linears alike."""
    import compress.integer as integer

    model = quantized_toy("minmax", 8, 8)
    quantized = [m for m in model.modules() if isinstance(m, QuantWeightLayer) and m.aq is not None]
    assert {m.kind for m in quantized} == {"linear", "conv2d"}
    inputs = [torch.randn(2, 7, m.in_size) if m.kind == "linear"
              else torch.randn(2, m.weight_shape[1] * m.conv["groups"], 9, 7) for m in quantized]
    layers = [IntegerLayer(m) for m in quantized]
    with torch.no_grad():
        kept = [layer(x) for layer, x in zip(layers, inputs)]
        buffer = integer._SCRATCH.buffer
        assert buffer.numel() >= max(x.numel() for x in inputs)
        again = [layer(x) for layer, x in zip(layers, inputs)]
        assert integer._SCRATCH.buffer.data_ptr() == buffer.data_ptr()  # reused, not reallocated
        monkeypatch.setattr(integer, "SCRATCH_KEPT_BYTES", 0)
        own = [layer(x) for layer, x in zip(layers, inputs)]
    for a, b, c in zip(kept, again, own):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_8bit_remainder_leaves_dense_and_depthwise_convs_their_own_shape():
    """At 8 bits the code sums of dense and depthwise convs come from a second all-ones kernel, not from an extra
    output in the layer's own kernel (that turned a depthwise conv into a channel-multiplier-2 one, 46x slower, and a
    512-channel 3x3 conv 1.7x slower: docs/compression.md); linears and grouped convs keep the extra output."""
    model = quantized_toy("minmax", 8, 8)
    seen = set()
    for layer in model.modules():
        if not isinstance(layer, QuantWeightLayer) or integer_blocker(layer) is not None:
            continue
        fast = IntegerLayer(layer)
        out_channels = layer.weight_shape[0]
        assert fast.box is not None
        if fast.kind == "conv2d" and (fast.groups == 1 or fast.depthwise):
            seen.add("depthwise" if fast.depthwise else "dense")
            assert fast.sum_packed is not None and fast.bias.numel() == out_channels
        else:
            seen.add(fast.kind if fast.groups == 1 else "grouped")
            assert fast.sum_packed is None and fast.bias.numel() == out_channels + fast.groups
    assert seen == {"dense", "depthwise", "grouped", "linear"}


@pytest.mark.parametrize("method, wbits, abits", CASES)
def test_fused_rounding_matches_the_reference_quantizer(method, wbits, abits):
    """The fused rounding (integer layers' codes, the matmul sites' fake quantization) against the reference's
    elementwise passes, on values a tenth of a step or more from every tie, on and past both ends of the grid."""
    model = quantized_toy(method, wbits, abits)
    generator = torch.Generator().manual_seed(2)
    sites = [m for m in model.modules() if isinstance(m, QuantMatmul)]
    quantizers = [m.aq for m in model.modules() if isinstance(m, QuantWeightLayer) and m.aq is not None]
    for quantizer in quantizers + [q for m in sites for q in (m.qa, m.qb)]:
        grid = Grid(quantizer)
        steps = torch.randint(-8, grid.levels + 8, (4000,), generator=generator).float()
        offset = torch.rand(4000, generator=generator) * 0.8 + 0.1
        offset = torch.where((offset - 0.5).abs() < 0.1, offset + 0.2, offset)
        x = grid.z + (steps + offset) * grid.s
        with torch.no_grad():
            reference = quantizer(x.clone())
        assert torch.allclose(grid.fake_quant(x), reference, rtol=0, atol=1e-5 * grid.s * grid.levels)
        assert torch.allclose(grid.codes(x).float() * grid.s + grid.z, reference, rtol=0,
                              atol=1e-5 * grid.s * grid.levels)
    a, b = torch.rand(2, 5, 6, generator=generator), torch.rand(2, 6, 3, generator=generator)
    with torch.no_grad():
        assert torch.allclose(FusedFakeQuantMatmul(sites[0])(a, b), sites[0](a, b), atol=1e-4)


@pytest.mark.parametrize("method, wbits, abits", CASES[:3])
def test_whole_model_integer_matches_fake_quant(method, wbits, abits):
    model = quantized_toy(method, wbits, abits)
    fast = copy.deepcopy(model)
    summary = to_integer(fast)
    # The first and the last layer stay full precision (the default selection rule); the six between run in integers.
    assert not summary.dequantized and summary.integer == {"conv": 4, "depthwise conv": 1, "linear": 1}
    assert summary.matmuls == 2
    assert "6 layers on oneDNN int8 kernels" in summary.line()
    x = toy_batches(1, seed=5)[0]
    with torch.no_grad():
        reference, out = model(x), fast(x)
    assert (out - reference).abs().max() <= 1e-3 * reference.abs().max()


def test_per_token_activations_stay_dequantized():
    model = quantized_toy("minmax", 8, 8, granularity="token")
    summary = to_integer(model)
    assert sum(summary.integer.values()) == 0
    assert summary.dequantized["token activation grid (the kernels take one scale per tensor)"] == 6


# -- the SANA-SR pipeline ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base():
    from sana_sr import build_pipeline
    from sana_sr.data.calibration_pairs import calibration_batches
    from sana_sr.quantization.compress import latent_batches

    pipe = build_pipeline("tiny", weights="pretrained", text_encoder=False)
    pipe.set_progress_bar_config(disable=True)
    calib = latent_batches(pipe, calibration_batches([ASSETS / "photos"], pairs=4, batch_size=2, crop=32, seed=0))
    return pipe, calib


def compressed_folder(tiny_base, tmp_path, method: str, wbits: int, abits: int):
    from sana_sr.quantization.compress import compress_pipeline
    from sana_sr.quantization.folder import save_quantized_pipeline

    base, calib = tiny_base
    pipe = copy.deepcopy(base)
    compress_pipeline(pipe, QuantizeConfig(method=method, wbits=wbits, abits=abits, steps=2, routing_steps=1), calib)
    save_quantized_pipeline(pipe, tmp_path / "q", report={})
    return tmp_path / "q"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@pytest.mark.parametrize("method, wbits, abits", [
    ("minmax", 8, 8),
    pytest.param("minmax", 4, 8, marks=pytest.mark.slow),
    pytest.param("2dquant", 4, 4, marks=pytest.mark.slow),
    pytest.param("compsrt", 4, 4, marks=pytest.mark.slow),
    pytest.param("spr2q", 2, 4, marks=pytest.mark.slow),
])
@pytest.mark.slow
def test_tiny_pipeline_integer_matches_fake_quant(tiny_base, tmp_path, method, wbits, abits, caplog):
    from sana_sr import SanaSRPipeline

    folder = compressed_folder(tiny_base, tmp_path, method, wbits, abits)
    reference = SanaSRPipeline.from_pretrained(folder)
    with caplog.at_level("WARNING", logger="sana_sr.quantization"):
        fast = SanaSRPipeline.from_pretrained(folder, execution="int")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("integer execution")]
    assert len(lines) == 1 and "2 layers dequantized" in lines[0]  # patch embedding + conv_out (boundary layers)
    for p in (reference, fast):
        p.set_progress_bar_config(disable=True)
    lq = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reference(lq), fast(lq)
    assert psnr(a, b) >= PIPELINE_PSNR_DB, psnr(a, b)
    with pytest.raises(ValueError, match="execution='fake-quant' to save"):
        fast.transformer.save_pretrained(tmp_path / "again")


def test_execution_switch_is_checked(tiny_base, tmp_path):
    from sana_sr import SanaSRPipeline, load_pipeline

    with pytest.raises(ValueError, match="execution must be"):
        SanaSRPipeline.from_pretrained(tmp_path, execution="int4")
    with pytest.raises(ValueError, match="needs a compressed pipeline folder"):
        load_pipeline("tiny-random", execution="int")
    tiny_base[0].save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match="needs a compressed pipeline folder"):
        SanaSRPipeline.from_pretrained(tmp_path / "fp", execution="int")


@pytest.mark.slow
def test_upscale_runs_on_integer_kernels(tiny_base, tmp_path, capsys):
    from PIL import Image

    from sana_sr.model import upscale

    folder = compressed_folder(tiny_base, tmp_path, "minmax", 4, 8)
    Image.new("RGB", (24, 16), (120, 60, 30)).save(tmp_path / "lq.png")
    args = [str(tmp_path / "lq.png"), "--model", str(folder), "--execution", "int"]
    assert upscale.main(args + ["-o", str(tmp_path / "int")]) == 0
    assert upscale.main(args[:-2] + ["-o", str(tmp_path / "fq")]) == 0
    assert Image.open(tmp_path / "int" / "lq.png").size == (96, 64)
    assert upscale.main([str(tmp_path / "lq.png"), "-o", str(tmp_path / "x"), "--execution", "int"]) == 2
    assert "needs a compressed pipeline folder" in capsys.readouterr().err


# -- memory -----------------------------------------------------------------------------------------------------------
PROBE = """
import json, resource, sys, torch
from sana_sr import SanaSRPipeline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pipe = SanaSRPipeline.from_pretrained(sys.argv[1], execution=sys.argv[2])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"load_peak_growth": (after - before) * 1024}))
"""


@pytest.mark.slow
def test_integer_load_never_materialises_float_weights(tmp_path):
    """A DiT at the real width (1152, 4 of the 0.6B's 28 blocks: 85M weights, 340 MB in fp32) compressed at W8A8
    loads for integer execution in a fresh process: peak resident memory grows by less than 0.6x the fp32 bytes
    of its quantized weights (an fp32 skeleton alone would be 1x; the int8 kernels' weights are 0.25x, the codes
    they are made from another 0.25x while the layers are converted)."""
    import dataclasses

    from sana_sr import build_pipeline, get_preset
    from sana_sr.quantization.compress import compress_pipeline
    from sana_sr.quantization.folder import save_quantized_pipeline

    tiny = get_preset("tiny")
    dit = dict(get_preset("sana-0.6b").transformer, num_layers=4)
    preset = dataclasses.replace(tiny, name="tiny-wide", transformer=dict(dit, caption_channels=64),
                                 vae_id=None, base_id=None)
    pipe = build_pipeline(preset, text_encoder=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    calib = [dict(latents=torch.randn(1, 32, 8, 8, generator=g), prompt_embeds=torch.randn(1, 32, 64, generator=g),
                  prompt_mask=torch.ones(1, 32))]
    compress_pipeline(pipe, QuantizeConfig(method="minmax", wbits=8, abits=8), calib)
    save_quantized_pipeline(pipe, tmp_path / "q", report={})
    layout = json.loads((tmp_path / "q" / "transformer" / "layout.json").read_text())
    fp32_bytes = 4 * layout["summary"]["quantized_weights"]
    assert fp32_bytes > 300e6
    del pipe
    probe = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "q"), "int"], capture_output=True,
                           text=True, check=True)
    growth = json.loads(probe.stdout.strip().splitlines()[-1])["load_peak_growth"]
    assert growth < 0.6 * fp32_bytes, (growth / fp32_bytes)
