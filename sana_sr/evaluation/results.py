"""What an evaluation writes (main process only, every file atomically): per-image CSV, summary JSON, Markdown table,
LQ | SR | HQ grids."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sana_sr.atomic import atomic_file
from sana_sr.evaluation.metrics import METRICS

BASE_COLUMNS = ("index", "name", "rank", "lq", "hq", "lq_size", "sr_size", "seconds")
LABELS = {
    "psnr": "PSNR (Y, dB)", "ssim": "SSIM (Y)", "lpips": "LPIPS", "dists": "DISTS", "niqe": "NIQE (Y)",
    "niqe_gray": "NIQE (grey)", "musiq": "MUSIQ", "maniqa": "MANIQA (PIPAL)", "clipiqa": "CLIPIQA", "fid": "FID",
}
_PACKAGES = ("torch", "diffusers", "accelerate", "transformers", "peft", "numpy", "scipy", "pillow", "pyiqa")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    return str(value)


def write_csv(path: Path, rows: list[dict], metric_names: list[str]) -> None:
    columns = list(BASE_COLUMNS) + metric_names + ["problems"]
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_cell(row.get(c)) for c in columns])


def summarize(rows: list[dict], metric_names: list[str], set_values: dict[str, float]) -> dict[str, dict]:
    """Mean of each metric over the images that have it (a failed or unscorable image is left out and counted)."""
    out: dict[str, dict] = {}
    for name in metric_names:
        values = [r[name] for r in rows if r.get(name) is not None]
        mean = float(np.mean(values)) if values else None
        out[name] = {"mean": mean, "images": len(values), "missing": len(rows) - len(values)}
    for name, value in set_values.items():
        out[name] = {"value": value, "images": len(rows)}
    for name, entry in out.items():
        entry["higher_is_better"] = METRICS[name].higher_is_better
        entry["backend"] = METRICS[name].backend
    return out


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    from sana_sr import __version__

    found["sana_sr"] = __version__
    try:
        repo = Path(__file__).resolve().parents[2]
        found["git_commit"] = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found["git_commit"] = None
    return found


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    import os

    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def write_json(path: Path, payload: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def write_markdown(path: Path, summary: dict) -> None:
    model, data, run = summary["model"], summary["dataset"], summary["run"]
    lines = [
        f"# {data['name']}: {model['spec']}",
        "",
        f"{data['images']} images ({data['kind']}, x{data['scale']}, crop border {data['crop_border']}), "
        f"{run['world_size']} process(es) on {run['device']}; DiT {model['dit_dtype']}.",
        "",
        "| metric | value | better | images |",
        "| --- | ---: | :---: | ---: |",
    ]
    for name, entry in summary["metrics"].items():
        value = entry.get("mean", entry.get("value"))
        lines.append(
            f"| {LABELS[name]} | {_fmt(value)} | {'↑' if entry['higher_is_better'] else '↓'} | {entry['images']} |"
        )
    if summary["unavailable"]:
        lines += ["", "Not computed (never reported as numbers):", ""]
        lines += [f"- **{LABELS[n]}**: {reason}" for n, reason in summary["unavailable"].items()]
    if summary["failed_images"]:
        lines += ["", f"{len(summary['failed_images'])} image(s) failed: see per_image.csv."]
    v = summary["versions"]
    lines += ["", "torch " + str(v["torch"]) + ", diffusers " + str(v["diffusers"]) + ", pyiqa " + str(v["pyiqa"]), ""]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines))


def make_grid(lq: np.ndarray, sr: np.ndarray, hq: np.ndarray | None, gap: int = 4) -> np.ndarray:
    """LQ (nearest-upsampled to the SR size, so its pixels stay visible) | SR | HQ, uint8 (H, W', 3), white gaps."""
    height, width = sr.shape[:2]
    lq_t = torch.from_numpy(np.ascontiguousarray(lq, dtype=np.float32)).permute(2, 0, 1)[None]
    lq_up = F.interpolate(lq_t, size=(height, width), mode="nearest")[0].permute(1, 2, 0).numpy()
    panels = [lq_up, sr] + ([hq[:height, :width]] if hq is not None else [])
    white = np.ones((height, gap, 3), dtype=np.float32)
    parts: list[np.ndarray] = []
    for panel in panels:
        parts += [panel.astype(np.float32), white]
    return (np.clip(np.concatenate(parts[:-1], axis=1), 0, 1) * 255).round().astype(np.uint8)

