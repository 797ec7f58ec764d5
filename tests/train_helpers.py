"""Helpers for the training tests: shards cut from real photos, a small CPU config, reading a run's outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from sana_sr.train.tracking import read_metrics as metrics  # noqa: F401 (re-exported for the tests)

from .conftest import ASSETS

REPO = Path(__file__).resolve().parents[1]

# A tiny run on the CPU: 64x64 HQ crops (16x16 LQ), the bundled pretrained tiny base, LoRA r=8.
TINY_ARGS = [
    "model.preset=tiny", "model.weights=pretrained", "model.lora_rank=8",
    "data.crop=64", "data.workers=1", "data.shuffle_buffer=16",
    "optim.lr=1e-3", "optim.micro_batch_size=2", "optim.global_batch_size=2",
    "log.every_steps=1", "log.samples_every_steps=0", "checkpoint.every_steps=1000",
]


def write_photo_crops(folder: Path, per_photo: int = 6, size: int = 96, seed: int = 0) -> Path:
    """Cut `per_photo` random crops from each bundled photo (real images, small enough for fast shards)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for photo in sorted((ASSETS / "photos").iterdir()):
        with Image.open(photo) as im:
            rgb = im.convert("RGB")
        for i in range(per_photo):
            left, top = rng.integers(rgb.width - size), rng.integers(rgb.height - size)
            rgb.crop((left, top, left + size, top + size)).save(folder / f"{photo.stem}_{i}.png")
    return folder


def make_shards(images: Path, out: Path, per_shard: int = 3) -> Path:
    from sana_sr.cli import main as cli

    code = cli(["shards", str(images), "-o", str(out), "--max-count", str(per_shard), "--min-size", "64",
                "--workers", "1", "--no-progress"])
    assert code == 0
    return out


def train_env(**extra: str) -> dict[str, str]:
    """Environment of a training subprocess: this checkout first on the path, loopback-only gloo, 1 thread."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def accelerate_launch(processes: int, port: int, module: str = "sana_sr.train") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "-m", module]


def run(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=train_env(), **kwargs)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def final_lora(run_dir: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / ("lora_ema" if ema else "lora") / "pytorch_lora_weights.safetensors")


def run_until(cmd: list[str], line_prefix: str, timeout: float = 300) -> tuple[int, str]:
    """Run `cmd`, send it SIGTERM when it prints a line starting with `line_prefix`; (exit code, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=train_env(),
                            cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(line_prefix):
            proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout), "".join(lines)


def run_measured(cmd: list[str], timeout: float = 1800, **kwargs) -> tuple[str, dict[str, float]]:
    """Run `cmd` to completion; (its output, {"wall_s", "cpu_s", "peak_rss_gib"}) from the kernel's account of that
    child (os.wait4: its own peak, or a waited-for descendant's if larger)."""
    import threading
    import time

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=train_env(),
                            **kwargs)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        output = proc.stdout.read()  # to EOF: the child closes it when it exits
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    cost = {"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gib": usage.ru_maxrss / 2**20}
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-5000:]}"
    return output, cost
