"""Prompt-aware pruning of a SANA-SR pipeline: the tiny DiT to 50% of its parameters (target within 2%, bit-identical
reload), each structure alone, prompt-aware vs null-prompt importance, MAC targets, `sana-sr prune` (including the
sana-0.6b DiT to 344M parameters on the meta device) and the committed table in docs/pruning.md."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from sana_sr import SanaSRPipeline, build_pipeline
from sana_sr.data.calibration_pairs import calibration_batches
from sana_sr.model import cost
from sana_sr.pruning.model import PrunedSanaTransformer2DModel, load_pruned_transformer
from sana_sr.pruning.prompt_aware import PruneSettings, importance_scores, prune_pipeline
from sana_sr.pruning.prune import main as prune_main
from sana_sr.pruning.prune import parse_target

DOCS = Path(__file__).resolve().parents[1] / "docs" / "pruning.md"


@pytest.fixture(scope="module")
def pipe():
    p = build_pipeline("tiny", seed=3)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def batches():
    # Real photo crops with their captions: every pair is prompt-conditioned.
    return calibration_batches(pairs=4, batch_size=2, crop=32, seed=0)


@pytest.fixture(scope="module")
def taylor(pipe, batches):
    return importance_scores(copy.deepcopy(pipe), "taylor", batches)


def _restore(p, batches):
    with torch.no_grad():
        return p(batches[0].lq, prompt=batches[0].prompts)


@pytest.mark.slow
def test_tiny_dit_to_half_its_parameters_reloads_bit_identical(pipe, batches, taylor, tmp_path):
    p = copy.deepcopy(pipe)
    report = prune_pipeline(p, PruneSettings(target_params=0.5, importance="taylor"), batches, scores=taylor)
    params = sum(t.numel() for t in p.transformer.parameters())
    full = sum(t.numel() for t in pipe.transformer.parameters())
    assert abs(params / (0.5 * full) - 1) <= 0.02 and report["within_tolerance"]
    assert isinstance(p.transformer, PrunedSanaTransformer2DModel)
    out = _restore(p, batches)
    assert out.shape == batches[0].hq.shape and bool(torch.isfinite(out).all())

    p.save_pretrained(tmp_path / "pruned")
    index = json.loads((tmp_path / "pruned" / "model_index.json").read_text())
    assert index["transformer"] == ["sana_sr.pruning.model", "PrunedSanaTransformer2DModel"]
    reloaded = SanaSRPipeline.from_pretrained(tmp_path / "pruned")
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(_restore(reloaded, batches), out)
    dit = load_pruned_transformer(tmp_path / "pruned" / "transformer")
    assert dit.widths == p.transformer.widths
    assert all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), p.transformer.state_dict().values()))
    # `sana-sr cost` reads the folder and agrees with the plan's cost model.
    costs = {c.name: c for c in cost.component_costs(cost.meta_model(str(tmp_path / "pruned")), 512, 512)}
    assert (costs["dit"].params, costs["dit"].macs) == (report["after"]["params"], report["after"]["macs"])


@pytest.mark.parametrize("structure", ["heads", "cross_heads", "channels", "depth"])
@pytest.mark.slow
def test_each_structure_alone(pipe, batches, taylor, structure):
    p = copy.deepcopy(pipe)
    report = prune_pipeline(p, PruneSettings(target_params=0.92, structures=(structure,)), batches, scores=taylor)
    before, after = report["widths_before"], report["widths_after"]
    assert report["after"]["params"] <= report["target"]
    if structure == "depth":
        assert len(after) < len(before) and all(w == before[0] for w in after)
    else:
        assert len(after) == len(before)
        changed = {k for a, b in zip(after, before) for k in a if a[k] != b[k]}
        assert changed == {structure}
    assert bool(torch.isfinite(_restore(p, batches)).all())


@pytest.mark.slow
def test_prompt_aware_and_null_prompt_importance_differ(pipe, batches, taylor):
    assert len({t for b in batches for t in b.prompts}) > 1 and all(t for b in batches for t in b.prompts)
    null = importance_scores(copy.deepcopy(pipe), "taylor-null", batches)
    prompt = torch.cat([taylor.units[k] for k in sorted(taylor.units)])
    nul = torch.cat([null.units[k] for k in sorted(null.units)])
    assert taylor.losses != null.losses
    assert float((prompt - nul).abs().max() / prompt.abs().max()) > 1e-3
    cross = [(taylor.units[k], null.units[k]) for k in taylor.units if k[1] == "cross_heads"]
    assert any(not torch.allclose(a, b, rtol=1e-2) for a, b in cross)  # what reads the prompt is scored differently


@pytest.mark.slow
def test_mac_target_and_lora_merged_first(tiny_pipe, batches):
    p = copy.deepcopy(tiny_pipe)  # carries a (randomised) LoRA adapter: merged before pruning
    report = prune_pipeline(p, PruneSettings(target_macs=0.5, importance="magnitude", channel_multiple=4), batches)
    assert abs(report["relative_error"]) <= 0.02 and report["after"]["macs"] <= report["target"]
    assert all(w["channels"] % 4 == 0 for w in report["widths_after"])
    assert not getattr(p.transformer, "peft_config", None)
    assert bool(torch.isfinite(_restore(p, batches)).all())


def test_settings_and_targets_are_checked():
    assert parse_target("0.5") == 0.5 and parse_target("50%") == 0.5 and parse_target("344M") == 344e6
    with pytest.raises(ValueError, match="exactly one"):
        PruneSettings(target_params=0.5, target_macs=0.5)
    with pytest.raises(ValueError, match="uniform"):
        PruneSettings(target_params=0.5, importance="none")
    with pytest.raises(ValueError, match="structures"):
        PruneSettings(target_params=0.5, structures=("width",))


@pytest.mark.slow
def test_cli_prunes_a_saved_pipeline(pipe, tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "base")
    assert prune_main([str(tmp_path / "base"), "--out", str(tmp_path / "pruned"), "--target-params", "60%",
                       "--importance", "magnitude", "--structures", "heads,channels,depth"]) == 0
    report = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    assert abs(report["relative_error"]) <= 0.02
    reloaded = SanaSRPipeline.from_pretrained(tmp_path / "pruned")
    assert [w.as_dict() for w in reloaded.transformer.widths] == report["widths_after"]
    assert prune_main(["tiny-random", "--out", str(tmp_path / "x"), "--target-params", "half"]) == 2
    assert prune_main(["sana-0.6b", "--out", str(tmp_path / "x"), "--target-params", "0.5",
                       "--importance", "taylor"]) == 2
    assert "meta device" in capsys.readouterr().err


@pytest.mark.slow
def test_sana_06b_dit_to_344m_params_on_the_meta_device(tmp_path):
    """The paper's size, structurally (uniform plan: no weight values on the meta device); docs/pruning.md agrees."""
    out = tmp_path / "sana-0.6b-344m"
    assert prune_main(["sana-0.6b", "--out", str(out), "--target-params", "344M"]) == 0
    assert (out / "NO_WEIGHTS.md").is_file()
    costs = {c.name: c for c in cost.component_costs(cost.meta_model(str(out)), 512, 512, text=False)}
    assert costs["dit"].params == pytest.approx(344e6, rel=0.001)
    text = DOCS.read_text()
    row = re.search(r"\| sana-0\.6b, pruned to 344M \(uniform\) \| ([\d.,]+)M \| ([\d.,]+) \|", text)
    assert row, "docs/pruning.md lacks the 344M row"
    assert float(row.group(1).replace(",", "")) == pytest.approx(costs["dit"].params / 1e6, abs=0.01)
    assert float(row.group(2).replace(",", "")) == pytest.approx(costs["dit"].macs / 1e9, abs=0.01)


@pytest.mark.slow
def test_a_lora_on_the_pruned_dit_saves_and_reloads(pipe, batches, tmp_path):
    """The recovery fine-tune may train a LoRA on the pruned DiT: the adapter rides along like on the unpruned one."""
    from sana_sr import LoraSettings
    from sana_sr.model.lora import add_lora

    from .conftest import randomize_lora

    p = copy.deepcopy(pipe)
    prune_pipeline(p, PruneSettings(target_params=0.5, importance="magnitude"))
    add_lora(p.transformer, LoraSettings(rank=2))
    randomize_lora(p.transformer)
    out = _restore(p, batches)
    p.save_pretrained(tmp_path / "pruned-lora")
    reloaded = SanaSRPipeline.from_pretrained(tmp_path / "pruned-lora")
    reloaded.set_progress_bar_config(disable=True)
    assert getattr(reloaded.transformer, "peft_config", None)
    assert torch.equal(_restore(reloaded, batches), out)


def test_calibration_pairs_are_seeded_real_crops_with_prompts():
    a = calibration_batches(pairs=3, batch_size=2, crop=32, seed=5)
    b = calibration_batches(pairs=3, batch_size=2, crop=32, seed=5)
    assert [x.hq.shape[0] for x in a] == [2, 1] and a[0].lq.shape[2:] == (8, 8)
    assert all(torch.equal(x.lq, y.lq) and x.prompts == y.prompts for x, y in zip(a, b))
    assert float(a[0].lq.min()) >= 0 and float(a[0].lq.max()) <= 1
    with pytest.raises(ValueError, match="multiple of the scale"):
        calibration_batches(crop=30)


@pytest.mark.slow
def test_a_pruned_pipeline_compresses_and_reloads(pipe, tmp_path):
    """prune -> compress -> load_pipeline: the packed loader rebuilds the pruned widths, not the preset's."""
    from sana_sr.model.loading import load_pipeline
    from sana_sr.quantization.compress import main as compress_main

    pipe.save_pretrained(tmp_path / "base")
    assert prune_main([str(tmp_path / "base"), "--out", str(tmp_path / "pruned"), "--target-params", "0.5",
                       "--importance", "magnitude"]) == 0
    assert compress_main([str(tmp_path / "pruned"), "-o", str(tmp_path / "q"), "--method", "compsrt",
                          "--calib-count", "2", "--calib-size", "64", "--batch-size", "2", "--steps", "2"]) == 0
    first, second = load_pipeline(tmp_path / "q"), load_pipeline(tmp_path / "q")
    assert type(first.transformer).__name__ == "QuantizedPrunedSanaTransformer2DModel"
    assert isinstance(first.transformer, PrunedSanaTransformer2DModel)
    lq = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = first(lq)
        assert torch.isfinite(out).all() and torch.equal(out, second(lq))
