"""The README's main job end to end (reduced steps): shards -> train (2 processes) -> prune + distilled fine-tune ->
CompSRT and SPR²Q -> evaluation -> restore -> cost -> publish --dry-run -> report. Learning must be real."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sana_sr.main_job.stages import COMPRESSED, STAGES
from sana_sr.run_folder import RunFolder

from .train_helpers import REPO, metrics, train_env

pytestmark = pytest.mark.slow  # end to end through the real launchers: minutes

STEPS = 200


def test_main_job_runs_every_stage_and_beats_bicubic(tmp_path):
    out = tmp_path / "quickstart"
    cmd = [sys.executable, "-m", "sana_sr.cli", "quickstart", "--out", str(out), "--steps", str(STEPS),
           "--finetune-steps", "20", "--compress-steps", "10"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=train_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"quickstart report: {out / 'report' / 'report.md'}" in result.stdout
    for name, (_, done) in STAGES.items():
        assert done(RunFolder(out)).exists(), f"stage {name} left no {done(RunFolder(out))}"
    for figure in ("loss.png", "quality_vs_size.png", "samples_trained.png", f"samples_{list(COMPRESSED)[0]}.png"):
        assert (out / "report" / figure).stat().st_size > 1000, figure

    # Two synchronised processes trained the LoRA.
    replicas = json.loads((out / "train" / "replicas.json").read_text())["ranks"]
    assert [r["world_size"] for r in replicas] == [2, 2]
    assert replicas[0]["weights_checksum"] == replicas[1]["weights_checksum"]

    # Learning is real: the pixel loss falls, and the trained model beats bicubic on the photos it trained on and on
    # the held-back one (same Real-ESRGAN LQ for both, fixed seeds).
    # Each batch's difficulty varies more than 200 steps improve the loss, so the loss is compared with bicubic's
    # on the same batches (logged as loss/bicubic_l2).
    ratio = [m["loss/pixel_l2"] / m["loss/bicubic_l2"] for m in metrics(out / "train")]
    assert np.mean(ratio[-3:]) < np.mean(ratio[:3]) - 0.03, ratio
    scores = json.loads((out / "restore" / "scores.json").read_text())
    trained = scores["trained"]
    for subset in ("train_mean", "held_back_mean"):
        assert trained[subset]["psnr_sr"] > trained[subset]["psnr_bicubic"] + 0.1, (subset, trained[subset])

    # Smaller variants are really smaller; every variant was evaluated by eval/realsr.py on 2 processes.
    assert scores["pruned"]["bytes"] < 0.85 * scores["trained"]["bytes"]
    for name in COMPRESSED:
        assert scores[name]["bytes"] < scores["pruned"]["bytes"] / 3, (name, scores[name]["bytes"])
        assert np.isfinite(scores[name]["held_back_mean"]["psnr_sr"])
        # ... and their quantization fine-tunes ran on the training loop, 2 synchronised processes.
        for phase in json.loads((out / "compress" / name / "compression.json").read_text())["finetune"].values():
            ranks = phase["replicas"]["ranks"]
            assert [r["world_size"] for r in ranks] == [2, 2]
            assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    for name in ("trained", "pruned", *COMPRESSED):
        summary = json.loads((out / "eval" / name / "summary.json").read_text())
        assert summary["run"]["world_size"] == 2 and summary["metrics"]["psnr"]["images"] == 1

    # The dry run built a loadable, carded folder and uploaded nothing.
    assert "dry run: nothing uploaded" in result.stdout
    assert (out / "publish" / "merged" / "variants" / "compsrt-w4a4" / "compression.json").is_file()

    # A second run finds every stage done and redoes nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=train_env(), cwd=REPO)
    assert again.returncode == 0 and again.stdout.count("done already") == len(STAGES), again.stdout
