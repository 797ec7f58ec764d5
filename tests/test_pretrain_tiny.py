"""`sana-sr pretrain-tiny` on the training loop: a few steps of both stages, written in the hub layout the `tiny`
preset loads through `from_pretrained`; a rerun after the end finds every stage done."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sana_sr.model.loading import build_pipeline

from .train_helpers import train_env


@pytest.mark.slow
def test_pretrain_tiny_writes_a_loadable_base(tmp_path, lq_photo):
    out = tmp_path / "base"
    cmd = [sys.executable, "-m", "sana_sr.cli", "pretrain-tiny", "--out", str(out), "--ae-steps", "6",
           "--dit-steps", "4", "--batch", "2", "--crop", "32"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=train_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["final loss"]) == {"dc-ae", "dit"}
    assert report["final loss"]["dc-ae"]["loss/l1"] > 0 and report["scaling_factor"] > 0
    assert not (tmp_path / "base.work").exists()  # checkpoints are removed once the base is written
    pipe = build_pipeline("tiny", weights="pretrained", vae_id=str(out / "dc-ae"), base_id=str(out / "sana"))
    assert pipe.vae.config.scaling_factor == report["scaling_factor"]
    assert torch.isfinite(pipe(lq_photo)).all()


def test_the_tiny_sr_architecture_is_that_of_the_shipped_model():
    from sana_sr import bundled
    from sana_sr.model.presets import TINY_SR_TRANSFORMER, TINY_SR_VAE

    for name, config in (("vae", TINY_SR_VAE), ("transformer", TINY_SR_TRANSFORMER)):
        shipped = json.loads((bundled.TINY_SR / name / "config.json").read_text())
        differing = {k for k, v in json.loads(json.dumps(config)).items() if shipped.get(k) != v}
        assert differing <= {"scaling_factor"}, (name, differing)  # the scale is measured by training


@pytest.mark.slow
def test_pretrain_tiny_sr_recipe_trains_a_loadable_sr_pipeline_from_random_weights(tmp_path, lq_photo):
    from sana_sr.model.pipeline import SanaSRPipeline
    from sana_sr.model.presets import TINY_SR_TRANSFORMER

    out = tmp_path / "tiny-sr"
    cmd = [sys.executable, "-m", "sana_sr.cli", "pretrain-tiny", "--recipe", "sr", "--out", str(out),
           "--ae-steps", "6", "--ae-l1-steps", "3", "--sr-steps", "3", "--sr-batch", "2", "--batch", "2",
           "--crop", "32"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=train_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["tiles"] >= 3 and report["scaling_factor"] > 0
    assert set(report["in-batch gain over bicubic (dB, RGB)"]) == {"sr1", "sr2", "sr3"}
    losses = [set(row) for row in map(json.loads, (out / "metrics-dc-ae.jsonl").read_text().splitlines())]
    assert any("loss/l1" in keys for keys in losses) and "loss/l2" in losses[-1]  # L1, then L2
    for i in (1, 2, 3):  # the SR stages, each from the one before
        assert "loss/pixel_l2" in json.loads((out / f"metrics-sr{i}.jsonl").read_text().splitlines()[-1])
    assert not (tmp_path / "tiny-sr.work").exists()
    pipe = SanaSRPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_layers == TINY_SR_TRANSFORMER["num_layers"]
    assert pipe.vae.config.scaling_factor == report["scaling_factor"]
    assert pipe.transformer.proj_out.weight.abs().sum() > 0  # zero at the start, trained by the SR stage
    assert torch.isfinite(pipe(lq_photo)).all()
