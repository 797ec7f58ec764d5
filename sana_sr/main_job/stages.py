"""The stages of the main job, each a subprocess of the real command a user would run:

    shards    the bundled training photos -> webdataset shards                (sana-sr shards)
    train     a LoRA fine-tune of the shipped tiny SR model (`tiny-sr`) on the training photos, 2 processes,
              DDP on gloo                                                       (accelerate launch -m sana_sr.train)
    prune     prompt-aware pruning of the DiT to half its parameters, then a full fine-tune distilled from the
              trained model, 2 processes                                       (sana-sr prune; sana_sr.train)
    compress  CompSRT and SPR²Q W4A4 (per-token activations) of the pruned model, packed to disk; their fine-tunes
              on the training loop, 2 processes                                (accelerate launch sana-sr compress)
    evaluate  the start and every variant on the ten held-out crops (Set5, Urban100), LQ by the training
              degradation (fixed seeds) and by plain bicubic x4, 2 processes    (accelerate launch sana-sr evaluate)
    restore   training photos and held-out crops under both LQ protocols, the start, every variant and bicubic
              scored side by side; the real low-quality photos restored by the start and the trained model
    cost      parameters and MACs per component                                 (sana-sr cost)
    publish   the hub-ready folder and model card, nothing uploaded             (sana-sr publish --dry-run)
    report    loss curves, quality vs size, sample grids, tables               (report/report.md)

Each stage writes its output atomically; `STAGES` names the file whose presence means the stage is done.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sana_sr import bundled
from sana_sr.atomic import atomic_directory
from sana_sr.data.degradation_config import DegradationConfig
from sana_sr.run_folder import RunFolder

EVAL_CROP = 256  # HQ side of the evaluation crops (LQ 64)
# Per-token activation grids (one dynamic grid per token / pixel): on the pruned tiny model they kept 0.70 and 0.76 dB
# of a 1.24 dB held-out gain under plain bicubic, one static grid per tensor 0.44 (docs/compression.md).
# CompSRT's magnitude pruning at 30 % instead of the paper's 40 % (the CLI's default): the DiT it compresses is already
# structurally pruned to half. On the pruned tiny model (30 steps) 40 % kept 0.36 dB of a 0.85 dB held-out gain under
# the degradation, 30 % 0.52, 20 % 0.54 (docs/compression.md).
COMPRESSED = {"compsrt-w4a4": ["--method", "compsrt", "--act-granularity", "token", "--prune", "0.3"],
              "spr2q-w4a4": ["--method", "spr2q", "--act-granularity", "token"]}
REPO_ID = "sana-sr/tiny-quickstart"
# Both trainings see the LQ of tiny-sr's last training stage: plain bicubic in 1 of 4 rows, the rest tiny.yaml's light
# degradation run on a 128² crop before the 64² pair is cut (degrading the 64² crop itself is a harsher distribution
# that teaches the model to flatten structure: docs/tiny_model.md).
TRAIN_DATA = ("data.degradation.bicubic_prob=0.25", "data.crop=128", "data.degradation.gt_size=64")


@dataclass
class Run:
    folder: RunFolder
    processes: int
    steps: int
    finetune_steps: int
    compress_steps: int
    seed: int
    overrides: tuple[str, ...] = ()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run: Run, target: list[str]) -> list[str]:
    """`accelerate launch` of a module (`-m name`) on run.processes CPU processes (gloo on loopback)."""
    if run.processes == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(run.processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), *target]


def call(cmd: list[str], what: str) -> None:
    # PYTHONSAFEPATH (3.11+): `python -m` would put the working directory first on sys.path, and a run folder's own
    # `compress/` or `eval/` output (when the job is run from inside it) would then shadow the packages of that name.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), GLOO_SOCKET_IFNAME="lo",
               PYTHONSAFEPATH="1")
    print(f"  $ {' '.join(c if len(c) < 80 else '…' + c[-60:] for c in cmd[1:])}", flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {result.returncode} (log above)")


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sana_sr.cli", *args]


def stage_shards(run: Run) -> None:
    with atomic_directory(run.folder.photos, "sana-sr quickstart") as tmp:
        for photo in bundled.train_photos():
            shutil.copy(photo, tmp / photo.name)
    # One photo per shard: each of the ranks x workers readers needs a shard of its own.
    call(cli(["shards", str(run.folder.photos), "-o", str(run.folder.shards), "--max-count", "1",
              "--min-size", "128", "--no-progress", "--seed", str(run.seed)]), "sana-sr shards")


def train(run: Run, output: Path, steps: int, *overrides: str) -> None:
    call(launch(run, ["-m", "sana_sr.train", str(bundled.config_file("tiny.yaml")),
                      f"data.shards={run.folder.shards}", f"output_dir={output}", f"optim.max_steps={steps}",
                      f"seed={run.seed}", "checkpoint.resume=latest", *TRAIN_DATA, *overrides, *run.overrides]),
         "training")


def stage_train(run: Run) -> None:
    # The main job adapts the shipped tiny SR model to the training photos, as a user adapts a released model.
    train(run, run.folder.train, run.steps, f"model.path={bundled.TINY_SR}", "optim.lr=1e-3")


def stage_prune(run: Run) -> None:
    folder = run.folder
    if not (folder.pruned_raw / "model_index.json").is_file():
        call(cli(["prune", str(folder.trained), "--out", str(folder.pruned_raw), "--target-params", "0.5",
                  "--importance", "taylor", "--text-encoder", "tiny", "--calib", str(folder.photos),
                  "--seed", str(run.seed)]), "sana-sr prune")
    # The recovery fine-tune: every weight of the pruned DiT, distilled from the trained one (output and blocks).
    train(run, folder.prune_finetune, run.finetune_steps, f"model.path={folder.pruned_raw}", "model.finetune=full",
          f"model.teacher={folder.trained}", "loss.prior_alignment=0", "loss.adapter_consistency=0",
          "optim.lr=1e-3", "optim.warmup_steps=0")


def stage_compress(run: Run) -> None:
    for name, method in COMPRESSED.items():
        out = run.folder.compressed(name)
        if (out / "model_index.json").is_file():
            continue
        call(launch(run, ["-m", "sana_sr.cli", "compress", *method, "--wbits", "4", "--abits", "4",
                          str(run.folder.pruned), "-o", str(out), "--calib", str(run.folder.photos),
                          "--steps", str(run.compress_steps), "--routing-steps", str(max(1, run.compress_steps // 4)),
                          "--seed", str(run.seed)]),
             f"sana-sr compress {name}")


def variants(folder: RunFolder) -> dict[str, Path]:
    """{name: pipeline} of what the run scores: its start (the shipped model, as shipped), then what it made."""
    return {"start": bundled.TINY_SR} | folder.variants()


def degradation(folder: RunFolder) -> DegradationConfig:
    """The degradation the model was trained with (the main job's is lighter than x4plus)."""
    from sana_sr.train.config import load_config

    return load_config(folder.training_config).data.degradation


def stage_evaluate(run: Run) -> None:
    from sana_sr.evaluation.photos import write_eval_pairs

    folder = run.folder
    if not folder.eval_photos.is_dir():
        write_eval_pairs(bundled.held_out_photos(), EVAL_CROP, run.seed, degradation(folder), folder.eval_photos)
    # One launch per variant scores both LQ protocols (20 images): a launch costs more than its ten extra images.
    for name, model in variants(folder).items():
        if (folder.evaluation(name) / "summary.json").is_file():
            continue
        call(launch(run, ["-m", "sana_sr.cli", "evaluate", "--model", str(model), "--hr",
                          str(folder.eval_photos / "hr"), "--lr", str(folder.eval_photos / "lr"),
                          "--name", "held-out-degraded-and-bicubic", "--device", "cpu",
                          "--metrics", "psnr,ssim,niqe", "--grids", "2", "-o", str(folder.evaluation(name))]),
             f"evaluation of {name}")


def stage_restore(run: Run) -> None:
    import torch

    from sana_sr.evaluation.photos import score_variants

    subsets = {"train": bundled.train_photos(), "held_out": bundled.held_out_photos()}
    # One thread, as every other stage's processes: on shared cores two threads stalled at OpenMP's barriers (here
    # the restore took several times longer than with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        score_variants(variants(run.folder), run.folder.restore, seed=run.seed, subsets=subsets,
                       real_lq=bundled.real_lq_photos(), crop=EVAL_CROP, degradation=degradation(run.folder),
                       real_lq_variants=("start", "trained"))
    finally:
        torch.set_num_threads(threads)


def stage_cost(run: Run) -> None:
    call(cli(["cost", "--model", str(run.folder.trained), "--size", "256", "512", "--output", str(run.folder.cost)]),
         "sana-sr cost")


def stage_publish(run: Run) -> None:
    call(cli(["publish", str(run.folder.root), "--repo-id", REPO_ID, "--dry-run"]), "sana-sr publish --dry-run")


def stage_report(run: Run) -> None:
    from sana_sr.main_job.report import write_report

    write_report(run.folder, run.folder.report)


# name -> (stage, the file whose presence means it is done)
STAGES: dict[str, tuple[Callable[[Run], None], Callable[[RunFolder], Path]]] = {
    "shards": (stage_shards, lambda f: f.shards / "sizes.json"),
    "train": (stage_train, lambda f: f.trained / "model_index.json"),
    "prune": (stage_prune, lambda f: f.pruned / "model_index.json"),
    "compress": (stage_compress, lambda f: f.compressed(list(COMPRESSED)[-1]) / "model_index.json"),
    "evaluate": (stage_evaluate, lambda f: f.evaluation(list(COMPRESSED)[-1]) / "summary.json"),
    "restore": (stage_restore, lambda f: f.restore / "scores.json"),
    "cost": (stage_cost, lambda f: f.cost),
    "publish": (stage_publish, lambda f: f.publish("merged") / "README.md"),
    "report": (stage_report, lambda f: f.report / "report.md"),
}
