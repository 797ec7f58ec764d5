"""What a run reports: scalars to the tracker (wandb or nothing) and to `metrics.jsonl`, and sample grids.

Only rank 0 writes; Accelerate's `log` is a no-op without trackers, so the loop never asks whether wandb is on.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image

from sana_sr.atomic import atomic_file
from sana_sr.train.config import LogConfig

# Exit code of a run that saved because it was asked to stop (SIGTERM / SIGUSR1): EX_TEMPFAIL, "try again".
REQUEUE_EXIT_CODE = 75


def tracker_names(log: LogConfig) -> list[str] | None:
    if log.tracker == "none":
        return None
    if log.tracker != "wandb":
        raise ValueError(f"log.tracker must be 'wandb' or 'none', got {log.tracker!r}")
    os.environ.setdefault("WANDB_MODE", log.wandb_mode)
    return ["wandb"]


class MetricsLog:
    """Appends one JSON line per logged step to `metrics.jsonl` and forwards to the accelerator's trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.accelerator.log(metrics, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The rows MetricsLog wrote to `output_dir/metrics.jsonl`, in order."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line]


def sample_grid(lq: torch.Tensor, sr: torch.Tensor, hq: torch.Tensor, count: int = 4) -> np.ndarray:
    """Rows of LQ (nearest-upscaled) | SR | HQ as an (H, W, 3) uint8 array."""
    lq = F.interpolate(lq[:count].float(), size=hq.shape[2:], mode="nearest")
    rows = [torch.cat([a, b, c], dim=2) for a, b, c in zip(lq, sr[:count].float(), hq[:count].float())]
    grid = torch.cat(rows, dim=1).clamp(0, 1)
    return (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def save_samples(accelerator: Accelerator, output_dir: Path, step: int, grid: np.ndarray) -> None:
    if not accelerator.is_main_process:
        return
    path = output_dir / "samples" / f"step-{step:08d}.png"
    with atomic_file(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({"samples": wandb.Image(grid, caption="LQ | SR | HQ")}, step=step)


class StopRequest:
    """SIGTERM / SIGUSR1 (Slurm preemption or the time limit) set a flag; the loop saves and exits at a step end."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def close(self) -> None:
        """Give the signals back to the handlers from before (a loop inside a longer command, e.g. compress)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank when any rank got the signal (ranks must stop at the same step)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
