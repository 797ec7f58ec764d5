"""The main job's report: loss curve, sample grid and the PSNR table, as Markdown with PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import atomic_directory


def loss_curve(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key in sorted({k for r in rows for k in r if k.startswith("loss/")}):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), label=key.removeprefix("loss/"))
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per-term, unweighted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def sample_grid(restore_dir: Path, png: Path) -> list[str]:
    """One row per scored photo: LQ (nearest) | bicubic | SR | HQ."""
    rows, names = [], []
    for subset in ("train", "held_back"):
        for hq_path in sorted((restore_dir / subset).glob("*_hq.png")):
            stem = hq_path.name.removesuffix("_hq.png")
            hq = Image.open(hq_path).convert("RGB")
            lq = Image.open(restore_dir / subset / f"{stem}_lq.png").convert("RGB").resize(hq.size, Image.NEAREST)
            parts = [lq, *(Image.open(restore_dir / subset / f"{stem}_{k}.png").convert("RGB") for k in ("bicubic", "sr")),
                     hq]
            rows.append(np.concatenate([np.asarray(p) for p in parts], axis=1))
            names.append(f"{subset}/{stem}")
    Image.fromarray(np.concatenate(rows, axis=0)).save(png)
    return names


def write_report(run_dir: Path, out: Path) -> None:
    scores = json.loads((run_dir / "restore" / "psnr.json").read_text())
    replicas = json.loads((run_dir / "train" / "replicas.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0], metrics[-1]
    with atomic_directory(out) as tmp:
        loss_curve(run_dir / "train" / "metrics.jsonl", tmp / "loss.png")
        rows = sample_grid(run_dir / "restore", tmp / "samples.png")
        lines = [
            "# sana-sr quickstart report",
            "",
            f"Tiny SANA-SR trained for {last['step']} steps on {replicas['ranks'][0]['world_size']} processes "
            f"(replica weights identical at the end: {len({str(r['weights_checksum']) for r in replicas['ranks']}) == 1}).",
            f"Pixel loss {first.get('loss/pixel_l2', float('nan')):.4f} at step {first['step']} → "
            f"{last.get('loss/pixel_l2', float('nan')):.4f} at step {last['step']}.",
            "",
            "| set | photo | PSNR-Y SR | PSNR-Y bicubic | SSIM-Y SR | SSIM-Y bicubic |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for subset in ("train", "held_back"):
            for name, s in {**scores[subset], "mean": scores[f"{subset}_mean"]}.items():
                lines.append(f"| {subset} | {name} | {s['psnr_sr']:.2f} | {s['psnr_bicubic']:.2f} | "
                             f"{s['ssim_sr']:.4f} | {s['ssim_bicubic']:.4f} |")
        lines += ["", "![loss](loss.png)", "", f"Rows: {', '.join(rows)}; columns: LQ | bicubic | SR | HQ.", "",
                  "![samples](samples.png)", "",
                  f"Restored real low-quality photos: `{(run_dir / 'restore' / 'real_lq').resolve()}`.", ""]
        (tmp / "report.md").write_text("\n".join(lines))
