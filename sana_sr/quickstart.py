"""`sana-sr quickstart`: the main job on the embedded default (tiny preset, bundled photos, CPU).

    shards  the bundled training photos -> webdataset shards             (sana-sr shards)
    train   the tiny preset, 2 processes, DDP on gloo                      (accelerate launch -m sana_sr.train)
    restore training and held-back photos degraded with a fixed seed, and the real low-quality photos
    report  loss curve, LQ | bicubic | SR | HQ grid, PSNR against bicubic  (report/report.md)

Each stage writes its output atomically and is skipped when the output is already there, so an interrupted run
continues where it stopped (`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .atomic import atomic_directory

TRAIN_PHOTOS = ("astronaut.png", "coffee.png", "rocket.jpg")
HELD_BACK = ("chelsea.png",)
EVAL_CROP = 256  # HQ side of the evaluation crops (LQ 64)


def bundled(folder: str) -> Path:
    """Path of a bundled asset folder (`photos` or `real_lq`)."""
    return Path(str(resources.files("sana_sr") / "assets" / folder))


@dataclass
class Run:
    out: Path
    processes: int
    steps: int
    seed: int

    def path(self, stage: str) -> Path:
        return self.out / stage


def stage_shards(run: Run) -> None:
    from .data.shards import main as shards

    with atomic_directory(run.path("photos")) as tmp:
        for name in TRAIN_PHOTOS:
            shutil.copy(bundled("photos") / name, tmp / name)
    # One photo per shard: each of the ranks x workers readers needs a shard of its own.
    code = shards([str(run.path("photos")), "-o", str(run.path("shards")), "--max-count", "1", "--no-progress",
                   "--seed", str(run.seed)])
    if code != 0:
        raise RuntimeError(f"sana-sr shards failed with exit code {code}")


def stage_train(run: Run) -> None:
    config = Path(str(resources.files("sana_sr") / "configs" / "tiny.yaml"))
    overrides = [f"data.shards={run.path('shards')}", f"output_dir={run.path('train')}",
                 f"optim.max_steps={run.steps}", f"seed={run.seed}", "checkpoint.resume=latest"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(run.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "sana_sr.train", str(config), *overrides]
    if run.processes == 1:
        cmd = [sys.executable, "-m", "sana_sr.train", str(config), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), GLOO_SOCKET_IFNAME="lo")
    print(f"training: {' '.join(cmd[-len(overrides) - 2:])}", flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"training failed with exit code {result.returncode} (log above)")


def stage_restore(run: Run) -> None:
    from .photo_eval import restore_photo_sets

    restore_photo_sets(run.path("train") / "final" / "pipeline", run.path("restore"), seed=run.seed,
                       train=[bundled("photos") / n for n in TRAIN_PHOTOS],
                       held_back=[bundled("photos") / n for n in HELD_BACK],
                       real_lq=bundled("real_lq"), crop=EVAL_CROP)


def stage_report(run: Run) -> None:
    from .report import write_report

    write_report(run.out, run.path("report"))


STAGES = {
    "shards": (stage_shards, "shards/sizes.json"),
    "train": (stage_train, "train/final/pipeline/model_index.json"),
    "restore": (stage_restore, "restore/psnr.json"),
    "report": (stage_report, "report/report.md"),
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sana-sr quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder")
    parser.add_argument("--processes", type=int, default=2, help="training processes (DDP on gloo)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the tiny training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first")
    args = parser.parse_args(argv)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    run = Run(args.out, args.processes, args.steps, args.seed)
    run.out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for name, (stage, marker) in STAGES.items():
        if (run.out / marker).exists():
            print(f"[{name}] done already ({marker})", flush=True)
            continue
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        stage(run)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[{name}] {timings[name]} s", flush=True)
    (run.out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(f"quickstart report: {(run.out / 'report' / 'report.md').resolve()}")
    return 0
