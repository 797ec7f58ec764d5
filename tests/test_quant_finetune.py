"""The quantization fine-tunes on the training loop: the same fine-tune as compress's own loop, two processes that
really synchronise, and a stopped `sana-sr compress` that resumes to the same bytes."""

from __future__ import annotations

import functools
import json
import sys

import pytest
import torch

from compress import METHODS, QuantizeConfig, quantize
from sana_sr.quantization.finetune import QuantLoopSettings, finetune_on_loop
from tests.compress_nets import one_thread, toy_batches, toy_model  # noqa: F401 (autouse fixture)

from .slurm_cluster import free_ports
from .train_helpers import REPO, accelerate_launch, run, run_until

CALIB = ["--calib-count", "8", "--calib-size", "64", "--batch-size", "2"]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "minmax"])
@pytest.mark.slow
def test_loop_finetune_equals_compress_distill_bitwise(method, tmp_path):
    """One process: the training loop runs exactly compress.finetune.distill's fine-tune (loss, Adam, cosine, clip)."""
    config = dict(method=method, wbits=3, abits=4, steps=5, routing_steps=3, rank=2)
    own = quantize(toy_model(), toy_batches(), QuantizeConfig(**config), feature_modules=["proj"])
    loop = functools.partial(finetune_on_loop, settings=QuantLoopSettings(tmp_path / "work", log_every=100))
    on_loop = quantize(toy_model(), toy_batches(), QuantizeConfig(**config, trainer=loop), feature_modules=["proj"])
    assert own.losses == on_loop.losses and all(len(v) > 1 for v in own.losses.values())
    assert own.losses[next(iter(own.losses))][-1] < own.losses[next(iter(own.losses))][0]
    a, b = own.model.state_dict(), on_loop.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    phases = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert phases == (["spr2q-rectifiers", "spr2q-routing"] if method == "spr2q" else [f"{method}-bounds"])


@pytest.mark.slow
def test_compress_on_two_processes_synchronises(tmp_path):
    out = tmp_path / "q"
    cmd = [*accelerate_launch(2, free_ports(1)[0], "sana_sr.cli"), "compress", "tiny-random", "-o", str(out),
           "--method", "spr2q", "--steps", "4", "--routing-steps", "2", *CALIB]
    result = run(cmd, cwd=REPO)
    assert result.stdout.count("spr2q W4A4") == 1, result.stdout  # one report, from rank 0
    report = json.loads((out / "compression.json").read_text())
    assert set(report["finetune"]) == {"spr2q-rectifiers", "spr2q-routing"}
    for phase, steps in (("spr2q-rectifiers", 4), ("spr2q-routing", 2)):
        replicas = report["finetune"][phase]["replicas"]
        ranks = replicas["ranks"]
        assert replicas["step"] == steps and [r["world_size"] for r in ranks] == [2, 2]
        assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]  # identical after steps on ...
        assert ranks[0]["data_digest"] != ranks[1]["data_digest"]  # ... different calibration batches
        assert [r["samples"] for r in ranks] == [2 * steps, 2 * steps]  # batch 2, one batch per rank per step
    assert not out.with_name("q.work").exists()  # removed once the export is in place

    from sana_sr import load_pipeline

    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        sr = pipe(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert sr.shape == (1, 3, 64, 64) and torch.isfinite(sr).all()


@pytest.mark.slow
def test_stopped_compress_resumes_to_the_same_bytes(tmp_path):
    args = ["compress", "tiny-random", "--method", "compsrt", "--steps", "8", "--log-every", "1", *CALIB]
    entry = [sys.executable, "-m", "sana_sr.cli"]
    run([*entry, *args, "-o", str(tmp_path / "straight")], cwd=REPO)

    out = tmp_path / "stopped"
    code, output = run_until([*entry, *args, "-o", str(out)], "step 3:")
    assert code == 75, output[-3000:]
    assert "rerun the same command to resume" in output
    assert not out.exists()  # nothing half-written
    saved = [p.name for p in (tmp_path / "stopped.work" / "compsrt-bounds").glob("checkpoint-*")]
    assert len(saved) == 1 and 3 <= int(saved[0].split("-")[1]) < 8, saved

    resumed = run([*entry, *args, "-o", str(out)], cwd=REPO)
    assert "resumed from" in resumed.stdout and saved[0] in resumed.stdout
    for component in ("transformer", "vae"):
        straight = (tmp_path / "straight" / component / "weights.safetensors").read_bytes()
        assert (out / component / "weights.safetensors").read_bytes() == straight, component


@pytest.mark.slow
def test_work_folder_of_another_run_is_refused(tmp_path, capsys):
    from sana_sr.quantization.compress import main

    args = ["tiny-random", "-o", str(tmp_path / "q"), *CALIB]
    work = tmp_path / "q.work"
    assert main([*args, "--method", "spr2q", "--steps", "0", "--routing-steps", "0", "--keep-work-dir"]) == 0
    assert (work / "run.json").is_file()
    assert main([*args, "--method", "compsrt", "--steps", "0", "--routing-steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: work folder {work} holds a run with other settings (method)") and "\n" not in err
    assert json.loads((tmp_path / "q" / "compression.json").read_text())["config"]["method"] == "spr2q"  # untouched
