"""`sana-sr quickstart`: the whole pipeline on the embedded default (tiny preset, bundled photos, CPU).

    shards    the bundled training photos -> webdataset shards                (sana-sr shards)
    train     the tiny preset's LoRA, 2 processes, DDP on gloo                  (accelerate launch -m sana_sr.train)
    prune     prompt-aware pruning of the DiT to half its parameters, then a full fine-tune distilled from the
              trained model, 2 processes                                       (sana-sr prune; sana_sr.train)
    compress  CompSRT and SPR²Q W4A4 of the pruned model, packed to disk; their fine-tunes on the training
              loop, 2 processes                                                (accelerate launch sana-sr compress)
    evaluate  every variant on the held-back photo, 2 processes                 (accelerate launch eval/realsr.py)
    restore   training and held-back photos degraded with fixed seeds, every variant and bicubic scored side by
              side; the real low-quality photos restored with the trained model
    cost      parameters and MACs per component                                 (sana-sr cost)
    publish   the hub-ready folder and model card, nothing uploaded             (sana-sr publish --dry-run)
    report    loss curves, quality vs size, sample grids, tables               (report/report.md)

Each stage writes its output atomically and is skipped when the output is already there, so an interrupted run
continues where it stopped (`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .atomic import atomic_directory, atomic_file

TRAIN_PHOTOS = ("astronaut.png", "coffee.png", "rocket.jpg")
HELD_BACK = ("chelsea.png",)
EVAL_CROP = 256  # HQ side of the evaluation crops (LQ 64)
COMPRESSED = {"compsrt-w4a4": ["--method", "compsrt"], "spr2q-w4a4": ["--method", "spr2q"]}
REPO_ID = "sana-sr/tiny-quickstart"


def bundled(folder: str) -> Path:
    """Path of a bundled asset folder (`photos`, `real_lq`) or file (`configs/tiny.yaml`)."""
    return Path(str(resources.files("sana_sr") / ("configs" if folder.endswith(".yaml") else "assets") / folder))


@dataclass
class Run:
    out: Path
    processes: int
    steps: int
    finetune_steps: int
    compress_steps: int
    seed: int
    overrides: tuple[str, ...] = ()

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def variants(self) -> dict[str, Path]:
        """Model folders scored side by side, smallest last."""
        found = {"trained": self.path("train", "final", "pipeline"),
                 "pruned": self.path("prune", "finetune", "final", "pipeline")}
        return found | {name: self.path("compress", name) for name in COMPRESSED}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run: Run, target: list[str]) -> list[str]:
    """`accelerate launch` of a module (`-m name`) or script on run.processes CPU processes (gloo on loopback)."""
    if run.processes == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(run.processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), *target]


def call(cmd: list[str], what: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), GLOO_SOCKET_IFNAME="lo")
    print(f"  $ {' '.join(c if len(c) < 80 else '…' + c[-60:] for c in cmd[1:])}", flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {result.returncode} (log above)")


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sana_sr.cli", *args]


def stage_shards(run: Run) -> None:
    with atomic_directory(run.path("photos")) as tmp:
        for name in TRAIN_PHOTOS:
            shutil.copy(bundled("photos") / name, tmp / name)
    # One photo per shard: each of the ranks x workers readers needs a shard of its own.
    call(cli(["shards", str(run.path("photos")), "-o", str(run.path("shards")), "--max-count", "1",
              "--min-size", "128", "--no-progress",
              "--seed", str(run.seed)]), "sana-sr shards")


def train(run: Run, output: Path, steps: int, *overrides: str) -> None:
    call(launch(run, ["-m", "sana_sr.train", str(bundled("tiny.yaml")), f"data.shards={run.path('shards')}",
                      f"output_dir={output}", f"optim.max_steps={steps}", f"seed={run.seed}",
                      "checkpoint.resume=latest", *overrides, *run.overrides]), "training")


def stage_train(run: Run) -> None:
    train(run, run.path("train"), run.steps)


def stage_prune(run: Run) -> None:
    trained = run.path("train", "final", "pipeline")
    if not (run.path("prune", "pruned") / "model_index.json").is_file():
        call(cli(["prune", str(trained), "--out", str(run.path("prune", "pruned")), "--target-params", "0.5",
                  "--importance", "taylor", "--text-encoder", "tiny", "--calib", str(run.path("photos")),
                  "--seed", str(run.seed)]),
             "sana-sr prune")
    # The recovery fine-tune: every weight of the pruned DiT, distilled from the trained one (output and blocks).
    train(run, run.path("prune", "finetune"), run.finetune_steps, f"model.path={run.path('prune', 'pruned')}",
          "model.finetune=full", f"model.teacher={trained}", "loss.prior_alignment=0", "loss.adapter_consistency=0",
          "optim.lr=2e-4", "optim.warmup_steps=0")


def stage_compress(run: Run) -> None:
    for name, method in COMPRESSED.items():
        if (run.path("compress", name) / "model_index.json").is_file():
            continue
        call(launch(run, ["-m", "sana_sr.cli", "compress", *method, "--wbits", "4", "--abits", "4",
                          str(run.variants()["pruned"]), "-o", str(run.path("compress", name)),
                          "--calib", str(run.path("photos")), "--steps", str(run.compress_steps),
                          "--routing-steps", str(max(1, run.compress_steps // 4)), "--seed", str(run.seed)]),
             f"sana-sr compress {name}")


def stage_evaluate(run: Run) -> None:
    from .photo_eval import write_center_crops

    gt = run.path("eval-gt")
    if not gt.is_dir():
        write_center_crops([bundled("photos") / n for n in HELD_BACK], EVAL_CROP, gt)
    script = Path(str(resources.files("sana_sr"))).parent / "eval" / "realsr.py"
    if not script.is_file():
        raise RuntimeError(f"{script} not found: the quickstart runs from a checkout (pip install -e .)")
    with atomic_directory(run.path("eval")) as tmp:
        for name, folder in run.variants().items():
            call(launch(run, [str(script), "--model", str(folder), "--div2k-gt", str(gt), "--name", "held-back",
                              "--cache", str(run.path("eval-cache")), "--seed", str(run.seed), "--device", "cpu",
                              "--metrics", "psnr,ssim,niqe", "--grids", "1", "-o", str(tmp / name)]),
                 f"evaluation of {name}")


def stage_restore(run: Run) -> None:
    from .photo_eval import score_variants
    from .train.config import load_config

    # LQ made by the degradation the model was trained with (the main job's is lighter than x4plus).
    degradation = load_config(run.path("train", "config.yaml")).data.degradation
    score_variants(run.variants(), run.path("restore"), seed=run.seed,
                   train=[bundled("photos") / n for n in TRAIN_PHOTOS],
                   held_back=[bundled("photos") / n for n in HELD_BACK], real_lq=bundled("real_lq"), crop=EVAL_CROP,
                   degradation=degradation)


def stage_cost(run: Run) -> None:
    call(cli(["cost", "--model", str(run.variants()["trained"]), "--size", "256", "512",
              "--output", str(run.path("cost.md"))]), "sana-sr cost")


def stage_publish(run: Run) -> None:
    call(cli(["publish", str(run.out), "--repo-id", REPO_ID, "--dry-run"]), "sana-sr publish --dry-run")


def stage_report(run: Run) -> None:
    from .report import write_report

    write_report(run.out, run.path("report"))


STAGES = {
    "shards": (stage_shards, "shards/sizes.json"),
    "train": (stage_train, "train/final/pipeline/model_index.json"),
    "prune": (stage_prune, "prune/finetune/final/pipeline/model_index.json"),
    "compress": (stage_compress, f"compress/{list(COMPRESSED)[-1]}/model_index.json"),
    "evaluate": (stage_evaluate, "eval/trained/summary.json"),
    "restore": (stage_restore, "restore/scores.json"),
    "cost": (stage_cost, "cost.md"),
    "publish": (stage_publish, "publish/merged/README.md"),
    "report": (stage_report, "report/report.md"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sana-sr quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder")
    parser.add_argument("--processes", type=int, default=2, help="processes for training and evaluation (gloo)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the LoRA training")
    parser.add_argument("--finetune-steps", type=int, default=100, help="steps of the pruned model's fine-tune")
    parser.add_argument("--compress-steps", type=int, default=60, help="quantization fine-tune steps per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first")
    parser.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra training config override for both trainings (repeatable)")
    args = parser.parse_args(argv)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    run = Run(args.out.resolve(), args.processes, args.steps, args.finetune_steps, args.compress_steps, args.seed,
              tuple(args.train_override))
    run.out.mkdir(parents=True, exist_ok=True)
    timings_file = run.path("timings.json")
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for name, (stage, marker) in STAGES.items():
        if run.path(marker).exists():
            print(f"[{name}] done already ({marker})", flush=True)
            continue
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        try:
            stage(run)
        except (RuntimeError, OSError, ValueError) as e:
            print(f"sana-sr quickstart: stage {name} failed: {e}; rerun to continue from it", file=sys.stderr)
            return 1
        timings[name] = round(time.perf_counter() - start, 1)
        with atomic_file(timings_file) as tmp:
            tmp.write_text(json.dumps(timings, indent=2) + "\n")
        print(f"[{name}] {timings[name]} s", flush=True)
    print(f"quickstart report: {run.path('report', 'report.md')}")
    return 0
