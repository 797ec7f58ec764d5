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
