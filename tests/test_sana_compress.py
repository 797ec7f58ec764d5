"""SANA-SR compression: quantizing attention processors, file sizes of the tiny model, the CLI, and reload of the
compressed folder through diffusers' own pipeline loader (`SanaSRPipeline.from_pretrained`, `load_pipeline`)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from compress import QuantizeConfig, export_quantized, export_size
from sana_sr import SanaSRPipeline, load_pipeline
from sana_sr.data.calibration_pairs import calibration_batches
from sana_sr.quantization import folder as quantized_folder
from sana_sr.quantization.compress import compress_pipeline, latent_batches, main
from sana_sr.quantization.folder import save_quantized_pipeline
from sana_sr.quantization.sana import LatentRestorer, fold_timestep, install_matmul_sites
from tests.compress_nets import one_thread  # noqa: F401 (autouse fixture)
from tests.conftest import ASSETS


@pytest.fixture(scope="module")
def calib(tiny_pipe):
    pairs = calibration_batches([ASSETS / "photos"], pairs=4, batch_size=2, crop=32, seed=0)
    return latent_batches(tiny_pipe, pairs)


@pytest.mark.slow
def test_matmul_sites_and_folding_leave_the_model_unchanged(tiny_pipe, calib):
    restorer = LatentRestorer.from_pipeline(copy.deepcopy(tiny_pipe))
    batch = calib[0]
    with torch.no_grad():
        reference = restorer(**batch)
        assert install_matmul_sites(restorer.transformer, restorer.decoder) == 2 * 4 + 2  # attn1+attn2 x4, 2 in AE
        fold_timestep(restorer.transformer, restorer.timestep)
        out = restorer(**batch)
    assert torch.allclose(out, reference, atol=1e-5)
    assert sum(p.numel() for p in restorer.transformer.time_embed.parameters()) == 0
    with pytest.raises(ValueError, match="folded at t"):
        restorer.transformer.time_embed(torch.tensor([10.0]), batch_size=1)


@pytest.mark.parametrize("wbits, abits, ratio", [(4, 4, 3.5), (2, 2, 6.0)])
def test_tiny_model_file_is_smaller_than_fp16(tiny_pipe, calib, wbits, abits, ratio, tmp_path):
    pipe = copy.deepcopy(tiny_pipe)
    config = QuantizeConfig(method="minmax", wbits=wbits, abits=abits)
    restorer, _, reference = compress_pipeline(pipe, config, calib)
    export = save_quantized_pipeline(pipe, tmp_path / "q", report=dict(folded_timestep=True))
    on_disk = sum(export_size(tmp_path / "q" / name) for name in ("transformer", "vae"))
    assert export["bytes"] == on_disk == sum(export["components"].values())
    assert reference["fp16_bytes"] / on_disk >= ratio, (reference, on_disk)
    # One export per component costs no more than the single export of DiT + decoder did (its layer names are
    # shorter by the "transformer."/"decoder." prefixes; the blobs are the same bytes).
    export_quantized(restorer, tmp_path / "together", float_dtype="float16")
    assert on_disk <= export_size(tmp_path / "together")


@pytest.mark.slow
def test_cli_compresses_reloads_exactly_and_upscales(tiny_pipe, tmp_path, capsys, monkeypatch):
    model_dir, out_dir = tmp_path / "model", tmp_path / "q"
    tiny_pipe.save_pretrained(model_dir)  # with its (non-trivial) LoRA adapter, merged by the command
    compressed = {}  # the command's own in-memory (fake-quant) pipeline: the reference of the reloaded folder

    def keep_pipeline(pipe, out, *, report, **options):
        compressed["pipe"] = pipe
        return save_quantized_pipeline(pipe, out, report=report, **options)

    monkeypatch.setattr(quantized_folder, "save_quantized_pipeline", keep_pipeline)
    code = main([str(model_dir), "-o", str(out_dir), "--method", "spr2q", "--wbits", "3", "--abits", "4",
                 "--calib-count", "4", "--calib-size", "32", "--batch-size", "2", "--steps", "2",
                 "--routing-steps", "1"])
    assert code == 0
    assert "spr2q W3A4" in capsys.readouterr().out
    report = json.loads((out_dir / "compression.json").read_text())
    assert report["config"]["method"] == "spr2q" and report["export"]["summary"]["bits_per_weight"] > 3
    assert any(d["action"] == "weight-only" and "first layer" in d["reason"] for d in report["plan"])
    assert len(report["losses"]["rectifiers"]) == 2 and len(report["losses"]["routing"]) == 2

    index = json.loads((out_dir / "model_index.json").read_text())
    assert index["transformer"] == ["sana_sr.quantization.components", "QuantizedSanaTransformer2DModel"]
    assert index["vae"] == ["sana_sr.quantization.components", "QuantizedAutoencoderDC"]
    assert index["text_encoder"] == [None, None]  # dropped: the stored default prompt conditions it
    pipe = SanaSRPipeline.from_pretrained(out_dir)
    pipe.set_progress_bar_config(disable=True)
    again = load_pipeline(out_dir)
    again.set_progress_bar_config(disable=True)
    lq = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second, reference = pipe(lq), again(lq), compressed["pipe"](lq)
    assert first.shape == (1, 3, 64, 96) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert torch.equal(first, reference)

    from PIL import Image

    from sana_sr.model import upscale

    Image.fromarray((lq[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / "lq.png")
    assert upscale.main([str(tmp_path / "lq.png"), "-o", str(tmp_path / "sr"), "--model", str(out_dir)]) == 0
    assert Image.open(tmp_path / "sr" / "lq.png").size == (96, 64)


@pytest.mark.slow
def test_compress_in_memory_equals_reloaded(tiny_pipe, calib, tmp_path):
    pipe = copy.deepcopy(tiny_pipe)
    config = QuantizeConfig(method="compsrt", wbits=4, abits=4, steps=2)
    restorer, result, _ = compress_pipeline(pipe, config, calib)
    save_quantized_pipeline(pipe, tmp_path / "q", report=dict(folded_timestep=True))
    reloaded = SanaSRPipeline.from_pretrained(tmp_path / "q")
    for p in (pipe, reloaded):
        p.set_progress_bar_config(disable=True)
    lq = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(pipe(lq), reloaded(lq))


@pytest.mark.slow
def test_compressed_pruned_dit_is_its_own_class_and_reloads_exactly(calib, tmp_path):
    """A compressed folder of a pruned DiT (fewer blocks, heads and channels) names the pruned quantized class,
    whose config alone rebuilds the pruned shapes under the packed export."""
    from sana_sr import build_pipeline, get_preset
    from sana_sr.pruning.model import PrunedSanaTransformer2DModel

    pipe = build_pipeline("tiny", text_encoder=False)
    torch.manual_seed(0)
    pipe.register_modules(transformer=PrunedSanaTransformer2DModel(
        **dict(get_preset("tiny").transformer, num_layers=3), block_heads=[4, 2, 3], block_cross_heads=[2, 1, 2],
        block_channels=[160, 96, 120], kept_blocks=[0, 1, 3]).eval())
    pipe.set_progress_bar_config(disable=True)
    compress_pipeline(pipe, QuantizeConfig(method="minmax", wbits=4, abits=4), calib)
    save_quantized_pipeline(pipe, tmp_path / "q", report=dict(folded_timestep=True))
    index = json.loads((tmp_path / "q" / "model_index.json").read_text())
    assert index["transformer"] == ["sana_sr.quantization.components", "QuantizedPrunedSanaTransformer2DModel"]
    reloaded = load_pipeline(tmp_path / "q")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.transformer.config.block_channels == [160, 96, 120]
    from sana_sr.model import cost  # `sana-sr cost` rebuilds the pruned architecture from the same config

    assert cost.meta_model(str(tmp_path / "q")).transformer.config.block_heads == [4, 2, 3]
    lq = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(pipe(lq), reloaded(lq))


def test_compressed_folder_of_the_old_layout_says_to_recompress(tiny_pipe, tmp_path, capsys):
    """Before per-component exports, one quantized/ export held DiT + decoder; such a folder is not loaded."""
    old = tmp_path / "old"
    tiny_pipe.save_pretrained(old)
    (old / "quantized").mkdir()
    (old / "quantized" / "layout.json").write_text('{"format": "compress-packed", "version": 2}')
    with pytest.raises(ValueError, match="re-run `sana-sr compress`") as error:
        load_pipeline(old)
    assert "\n" not in str(error.value)
    from sana_sr.model import upscale

    (tmp_path / "in").mkdir()
    capsys.readouterr()
    assert upscale.main([str(tmp_path / "in"), "-o", str(tmp_path / "sr"), "--model", str(old)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "re-run `sana-sr compress`" in err, err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["tiny-random", "-o", str(tmp_path / "q"), "--calib", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    assert main(["tiny-random", "-o", str(tmp_path / "q"), "--calib", str(tmp_path / "photos")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "skipping calibration image" in err[0] and "broken.png" in err[0]
    assert err[-1].startswith("error: no calibration image of at least 128x128 pixels among 1")
    assert main(["tiny-random", "-o", str(tmp_path / "q"), "--wbits", "1"]) == 2
    assert "wbits must be in 2..8, got 1" in capsys.readouterr().err
