"""The main job's report: loss curves, quality vs size, sample grids and tables, as Markdown with PNG figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from sana_sr.atomic import atomic_directory
from sana_sr.evaluation.photos import PROTOCOLS
from sana_sr.run_folder import RunFolder
from sana_sr.train.tracking import read_metrics

PROTOCOL_TEXT = {"degraded": "the training degradation (light Real-ESRGAN, fixed seeds)",
                 "bicubic": "plain bicubic x4 downsampling"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bicubic_ratios(rows: list[dict]) -> list[float]:
    """Pixel loss over bicubic's on the same batch: learning net of each batch's difficulty."""
    return [r["loss/pixel_l2"] / r["loss/bicubic_l2"] for r in rows]


def _identical(ranks: list[dict]) -> bool:
    """Whether every rank of a replica report holds the same trained weights."""
    return len({str(r["weights_checksum"]) for r in ranks}) == 1


def loss_curves(runs: dict[str, Path], png: Path) -> None:
    """One panel per training run, one line per (unweighted) loss term."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.5), dpi=110, squeeze=False)
    for ax, (title, run_dir) in zip(axes[0], runs.items()):
        rows = read_metrics(run_dir)
        for key in sorted({k for r in rows for k in r if k.startswith("loss/")}):
            ax.plot(*zip(*[(r["step"], r[key]) for r in rows if key in r]), label=key.removeprefix("loss/"))
        ax.set(yscale="log", xlabel="optimizer step", ylabel="loss", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        if all("loss/pixel_l2" in r and "loss/bicubic_l2" in r for r in rows):  # progress net of batch difficulty
            ratio = ax.twinx()
            ratio.plot([r["step"] for r in rows], _bicubic_ratios(rows),
                       color="black", linestyle=":", label="pixel_l2 / bicubic_l2 (right)")
            ratio.set_ylabel("pixel_l2 / bicubic_l2")
            ratio.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def gain(entry: dict, protocol: str, subset: str) -> float:
    """Mean PSNR-Y gain (dB) of a scored variant over bicubic on the same LQ."""
    mean = entry[protocol][f"{subset}_mean"]
    return mean["psnr_sr"] - mean["psnr_bicubic"]


def quality_vs_size(scores: dict, png: Path) -> None:
    """Held-out gain over bicubic of every variant against its weight bytes, one marker per LQ protocol."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
    for protocol, marker in zip(PROTOCOLS, "os"):
        points = [(e["bytes"] / 2**20, gain(e, protocol, "held_out")) for e in scores.values()]
        ax.scatter(*zip(*points), marker=marker, label=f"{protocol} LQ")
        for name, (mib, db) in zip(scores, points):
            ax.annotate(name, (mib, db), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.axhline(0.0, color="grey", linestyle="--", label="bicubic")
    ax.set(xscale="log", xlabel="weights on disk (MiB)", ylabel="held-out gain over bicubic (dB)",
           title="quality vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _tile(images: list[Image.Image], cell: int) -> np.ndarray:
    """One grid row: each image on a white cell of side `cell` (crops of smaller photos are smaller)."""
    row = np.full((cell, cell * len(images), 3), 255, np.uint8)
    for i, image in enumerate(images):
        pixels = np.asarray(image.convert("RGB"))[:cell, :cell]
        row[: pixels.shape[0], i * cell : i * cell + pixels.shape[1]] = pixels
    return row


def sample_grid(restore: Path, names: list[str], protocol: str, png: Path) -> list[str]:
    """One row per photo (the first training photo, three held-out crops): LQ (nearest) | bicubic | each variant's
    SR | HQ, every variant on the very same LQ."""
    first = restore / names[0] / protocol
    stems = sorted(first.glob("train/*_hq.png"))[:1]
    held_out = sorted(first.glob("held_out/*_hq.png"))
    stems += held_out[:: max(1, len(held_out) // 3)][:3]
    rows, labels = [], []
    for hq_path in stems:
        subset, stem = hq_path.parent.name, hq_path.name.removesuffix("_hq.png")
        hq = Image.open(hq_path)
        lq = Image.open(first / subset / f"{stem}_lq.png").resize(hq.size, Image.NEAREST)
        bicubic = Image.open(first / subset / f"{stem}_bicubic.png")
        srs = [Image.open(restore / name / protocol / subset / f"{stem}_sr.png") for name in names]
        rows.append(_tile([lq, bicubic, *srs, hq], max(hq.size)))
        labels.append(f"{subset}/{stem}")
    width = max(r.shape[1] for r in rows)
    Image.fromarray(np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                                    for r in rows])).save(png)
    return labels


def real_lq_grid(folder: Path, names: tuple[str, ...], png: Path) -> list[str]:
    """One row per real low-quality photo: LQ (nearest) | bicubic | each named model's restoration."""
    rows, stems = [], sorted(p.name.removesuffix("_lq.png") for p in folder.glob("*_lq.png"))
    for stem in stems:
        bicubic = Image.open(folder / f"{stem}_bicubic.png")
        lq = Image.open(folder / f"{stem}_lq.png").resize(bicubic.size, Image.NEAREST)
        srs = [Image.open(folder / f"{stem}_{name}.png") for name in names]
        rows.append(_tile([lq, bicubic, *srs], max(max(i.size) for i in (bicubic, *srs))))
    width = max(r.shape[1] for r in rows)
    Image.fromarray(np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                                    for r in rows])).save(png)
    return stems


def quality_lines(scores: dict) -> list[str]:
    """Per LQ protocol: a table of every variant's PSNR-Y and gain over bicubic, and what each step kept."""
    lines = []
    for protocol in PROTOCOLS:
        first = next(iter(scores.values()))[protocol]
        lines += [f"### LQ: {PROTOCOL_TEXT[protocol]}", "",
                  "| variant | weights MiB | train PSNR-Y (gain) | held-out PSNR-Y (gain) | held-out SSIM-Y |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, e in scores.items():
            tr, ho = e[protocol]["train_mean"], e[protocol]["held_out_mean"]
            lines.append(f"| {name} | {e['bytes'] / 2**20:.3f} | {tr['psnr_sr']:.2f} "
                         f"({gain(e, protocol, 'train'):+.2f}) | {ho['psnr_sr']:.2f} "
                         f"({gain(e, protocol, 'held_out'):+.2f}) | {ho['ssim_sr']:.4f} |")
        lines += [f"| bicubic | — | {first['train_mean']['psnr_bicubic']:.2f} | "
                  f"{first['held_out_mean']['psnr_bicubic']:.2f} | {first['held_out_mean']['ssim_bicubic']:.4f} |", ""]
        if "start" in scores and "trained" in scores:
            added = {s: gain(scores["trained"], protocol, s) - gain(scores["start"], protocol, s)
                     for s in ("train", "held_out")}
            lines.append(f"The main job's own training added {added['train']:+.2f} dB on its training photos and "
                         f"{added['held_out']:+.2f} dB on the held-out crops to its start (tiny-sr as shipped).")
            trained = gain(scores["trained"], protocol, "held_out")
            kept = [f"{name} {gain(e, protocol, 'held_out') / trained:.0%}" for name, e in scores.items()
                    if name not in ("start", "trained")]
            if kept and trained > 0:
                lines.append(f"Of the trained model's held-out gain over bicubic, kept: {', '.join(kept)}.")
            lines.append("")
    return lines


def _loss_line(title: str, run_dir: Path, key: str) -> str:
    rows = [r for r in read_metrics(run_dir) if f"loss/{key}" in r]
    first, last = rows[0], rows[-1]
    line = (f"- {title}: {key} {first[f'loss/{key}']:.4f} at step {first['step']} → {last[f'loss/{key}']:.4f} at "
            f"step {last['step']}")
    if key == "pixel_l2" and "loss/bicubic_l2" in first:  # each batch's difficulty differs: compare with bicubic
        ratios = _bicubic_ratios(rows)
        head, tail = ratios[: max(1, len(ratios) // 5)], ratios[-max(1, len(ratios) // 5):]
        line += (f"; relative to bicubic on the same batches {sum(head) / len(head):.3f} (first fifth) → "
                 f"{sum(tail) / len(tail):.3f} (last fifth)")
    return line


def _quantization_lines(run: RunFolder) -> list[str]:
    """One line per quantization fine-tune (from each compressed folder's compression.json)."""
    lines = []
    for report in sorted(folder / "compression.json" for folder in run.compressed_variants().values()):
        if not report.is_file():
            continue
        for phase, entry in json.loads(report.read_text()).get("finetune", {}).items():
            logged, ranks = entry.get("logged_loss"), entry.get("replicas", {}).get("ranks")
            if not logged or not ranks:
                continue
            lines.append(f"- {report.parent.name} {phase}: loss {logged[0][1]:.4f} at step {logged[0][0]} → "
                         f"{logged[-1][1]:.4f} at step {logged[-1][0]}, {ranks[0]['world_size']} processes "
                         f"(replica weights identical: {_identical(ranks)})")
    return lines


def write_report(run: RunFolder, out: Path) -> None:
    scores = json.loads((run.restore / "scores.json").read_text())
    replicas = json.loads((run.train / "replicas.json").read_text())
    timings = json.loads(run.timings.read_text())
    runs = {"LoRA training": run.train, "pruned fine-tune (distilled)": run.prune_finetune}
    real_lq_names = tuple(n for n in ("start", "trained") if n in scores)
    with atomic_directory(out, "sana-sr quickstart") as tmp:
        loss_curves(runs, tmp / "loss.png")
        quality_vs_size(scores, tmp / "quality_vs_size.png")
        lines = [
            "# sana-sr quickstart report", "",
            "Tiny SANA-SR: the shipped `tiny-sr` model (the start) fine-tuned by a LoRA on the training photos on "
            f"{replicas['ranks'][0]['world_size']} processes (replica weights identical at the end: "
            f"{_identical(replicas['ranks'])}), pruned to half the DiT, fine-tuned with distillation, quantized to "
            "W4A4.", "",
            _loss_line("LoRA training", runs["LoRA training"], "pixel_l2"),
            _loss_line("pruned fine-tune", runs["pruned fine-tune (distilled)"], "distill"),
            *_quantization_lines(run), "",
            "![loss](loss.png)", "",
            "## Quality", "",
            "The same LQ for every variant; PSNR/SSIM on Y, border 4; gain = PSNR-Y minus bicubic's on the same LQ. "
            "Train: centre crops (256²) of the training photos; held-out: the ten crops of Set5 and Urban100 that "
            "nothing trains on.", "",
            *quality_lines(scores),
            "![quality vs size](quality_vs_size.png)", "",
            "## Stage times (s)", "", "| " + " | ".join([*timings, "total"]) + " |",
            "|" + " ---: |" * (len(timings) + 1),
            "| " + " | ".join([*(str(v) for v in timings.values()), f"{sum(timings.values()):.1f}"]) + " |", "",
            # Shared cores stretch every stage: the load says how much of the machine the run had.
            f"Load average when the report was written (1, 5, 15 min): "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs.", "",
            "## Evaluation (eval/realsr.py)", "",
        ]
        for summary_path in run.evaluation_summaries():
            summary = json.loads(summary_path.read_text())
            values = ", ".join(f"{k} {v.get('mean', v.get('value')):.4g}" for k, v in summary["metrics"].items())
            lines.append(f"- {summary_path.parent.name} on {summary['dataset']['name']}: {values} "
                         f"({summary['dataset']['images']} images, world size {summary['run']['world_size']})")
        names = list(scores)
        for protocol in PROTOCOLS:
            grid = f"samples_{protocol}.png"
            rows = sample_grid(run.restore, names, protocol, tmp / grid)
            lines += ["", f"### Samples, LQ: {PROTOCOL_TEXT[protocol]}", "",
                      f"Rows: {', '.join(rows)}; columns: LQ | bicubic | {' | '.join(names)} | HQ.", "",
                      f"![samples {protocol}]({grid})"]
        rows = real_lq_grid(run.restore / "real_lq", real_lq_names, tmp / "real_lq.png")
        lines += ["", "### Real low-quality photos (no reference)", "",
                  f"Rows: {', '.join(rows)}; columns: LQ | bicubic | {' | '.join(real_lq_names)}.", "",
                  "![real LQ](real_lq.png)", "",
                  f"Hub-ready folder (dry run, nothing uploaded): `{run.publish('merged')}`.", ""]
        (tmp / "report.md").write_text("\n".join(lines))
