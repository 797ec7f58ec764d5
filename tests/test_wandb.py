"""wandb, offline: a short training run logs its config, every scalar at its step and the sample grids at their steps,
read back from the run's .wandb log with wandb's own reader (`wandb leet inspect --json`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .train_helpers import REPO, TINY_ARGS, make_shards, metrics, train_env, write_photo_crops

pytestmark = pytest.mark.slow  # a real (tiny) training run


def wandb_records(run_file: Path) -> list[dict]:
    """Every record of a .wandb transaction log, as wandb's own CLI prints them."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "No such command" in result.stderr:
        pytest.skip("this wandb has no `wandb leet inspect` (wandb >= 0.31 has)")
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb")
    shards = make_shards(write_photo_crops(root / "images", per_photo=3), root / "shards")
    out, wandb_dir = root / "run", root / "wandb-dir"
    wandb_dir.mkdir()
    cmd = [sys.executable, "-m", "sana_sr.train", str(REPO / "sana_sr" / "configs" / "tiny.yaml"), *TINY_ARGS,
           f"data.shards={shards}", f"output_dir={out}", "optim.max_steps=4", "optim.warmup_steps=1",
           "log.tracker=wandb", "log.wandb_mode=offline", "log.project=sana-sr-test", "log.every_steps=1",
           "log.samples_every_steps=2"]
    env = train_env(WANDB_DIR=str(wandb_dir), WANDB_SILENT="true")
    env.pop("WANDB_MODE")  # the config's log.wandb_mode must be what makes it offline
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    run_files = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, sorted(p.relative_to(wandb_dir) for p in wandb_dir.rglob("*"))[:40]
    return {"out": out, "run_dir": run_files[0].parent, "records": wandb_records(run_files[0])}


def test_config_is_the_resolved_training_config(offline_run):
    runs = [r["run"] for r in offline_run["records"] if r["type"] == "run"]
    assert len(runs) == 1 and runs[0]["project"] == "sana-sr-test"
    config = dict(runs[0]["config"]["update"])  # Accelerate sends the config just after wandb.init: a config record
    for record in offline_run["records"]:
        if record["type"] == "config":
            config.update(record["config"]["update"])
    assert config["optim"]["max_steps"] == 4 and config["log"]["tracker"] == "wandb"
    assert config["output_dir"] == str(offline_run["out"]) and config["model"]["preset"] == "tiny"


def test_every_scalar_is_logged_at_its_step(offline_run):
    history = {}
    for record in offline_run["records"]:
        if record["type"] == "history":
            item = record["history"]["item"]
            history.setdefault(item["_step"], {}).update(item)
    rows = metrics(offline_run["out"])
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        logged = history[row["step"]]
        for key, value in row.items():
            if key != "step":
                assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (row["step"], key)


def test_sample_grids_are_logged_at_their_steps(offline_run):
    images = {}
    for record in offline_run["records"]:
        item = record.get("history", {}).get("item", {})
        if item.get("samples._type") == "image-file":
            images[item["_step"]] = offline_run["run_dir"] / "files" / item["samples.path"]
    assert sorted(images) == [2, 4]
    for step, path in images.items():
        with Image.open(path) as logged, Image.open(offline_run["out"] / "samples" / f"step-{step:08d}.png") as saved:
            assert np.array_equal(np.asarray(logged), np.asarray(saved)), step
