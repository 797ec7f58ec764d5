"""The main job's report: loss curves, quality vs size, sample grids and tables, as Markdown with PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from sana_sr.atomic import atomic_directory
from sana_sr.run_folder import RunFolder
from sana_sr.train.tracking import read_metrics


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


def quality_vs_size(scores: dict, png: Path) -> None:
    """Held-back PSNR-Y of every variant against its weight bytes; bicubic as a horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
    for name, entry in scores.items():
        mib, psnr = entry["bytes"] / 2**20, entry["held_back_mean"]["psnr_sr"]
        ax.scatter(mib, psnr)
        ax.annotate(name, (mib, psnr), fontsize=8, xytext=(4, 4), textcoords="offset points")
    bicubic = next(iter(scores.values()))["held_back_mean"]["psnr_bicubic"]
    ax.axhline(bicubic, color="grey", linestyle="--", label=f"bicubic {bicubic:.2f} dB")
    ax.set(xscale="log", xlabel="weights on disk (MiB)", ylabel="held-back PSNR-Y (dB)", title="quality vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def sample_grid(variant_dir: Path, png: Path) -> list[str]:
    """One row per scored photo: LQ (nearest) | bicubic | SR | HQ."""
    rows, names = [], []
    for subset in ("train", "held_back"):
        for hq_path in sorted((variant_dir / subset).glob("*_hq.png")):
            stem = hq_path.name.removesuffix("_hq.png")
            hq = Image.open(hq_path).convert("RGB")
            lq = Image.open(variant_dir / subset / f"{stem}_lq.png").convert("RGB").resize(hq.size, Image.NEAREST)
            sr = [Image.open(variant_dir / subset / f"{stem}_{k}.png").convert("RGB") for k in ("bicubic", "sr")]
            rows.append(np.concatenate([np.asarray(p) for p in (lq, *sr, hq)], axis=1))
            names.append(f"{subset}/{stem}")
    Image.fromarray(np.concatenate(rows, axis=0)).save(png)
    return names


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
    with atomic_directory(out, "sana-sr quickstart") as tmp:
        loss_curves(runs, tmp / "loss.png")
        quality_vs_size(scores, tmp / "quality_vs_size.png")
        lines = [
            "# sana-sr quickstart report", "",
            f"Tiny SANA-SR: LoRA trained on {replicas['ranks'][0]['world_size']} processes (replica weights identical "
            f"at the end: {_identical(replicas['ranks'])}), pruned to half the DiT, fine-tuned with distillation, "
            "quantized to W4A4.", "",
            _loss_line("LoRA training", runs["LoRA training"], "pixel_l2"),
            _loss_line("pruned fine-tune", runs["pruned fine-tune (distilled)"], "distill"),
            *_quantization_lines(run), "",
            "![loss](loss.png)", "",
            "## Quality vs size", "",
            "Same LQ photos (Real-ESRGAN degradation, fixed seeds) for every variant; PSNR/SSIM on Y, border 4.", "",
            "| variant | weights MiB | train PSNR (bicubic) | held-back PSNR (bicubic) | held-back SSIM (bicubic) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, e in scores.items():
            tr, hb = e["train_mean"], e["held_back_mean"]
            lines.append(f"| {name} | {e['bytes'] / 2**20:.3f} | {tr['psnr_sr']:.2f} ({tr['psnr_bicubic']:.2f}) | "
                         f"{hb['psnr_sr']:.2f} ({hb['psnr_bicubic']:.2f}) | "
                         f"{hb['ssim_sr']:.4f} ({hb['ssim_bicubic']:.4f}) |")
        lines += ["", "![quality vs size](quality_vs_size.png)", "", "## Evaluation (eval/realsr.py)", ""]
        for summary_path in run.evaluation_summaries():
            summary = json.loads(summary_path.read_text())
            values = ", ".join(f"{k} {v.get('mean', v.get('value')):.4g}" for k, v in summary["metrics"].items())
            lines.append(f"- {summary_path.parent.name}: {values} ({summary['dataset']['images']} images, "
                         f"world size {summary['run']['world_size']})")
        for name in scores:
            grid = f"samples_{name}.png"
            rows = sample_grid(run.restore / name, tmp / grid)
            lines += ["", f"### Samples: {name}", "", f"Rows: {', '.join(rows)}; columns: LQ | bicubic | SR | HQ.", "",
                      f"![{name}]({grid})"]
        lines += ["", f"Real low-quality photos restored by the trained model: `{run.restore / 'real_lq'}`.",
                  f"Hub-ready folder (dry run, nothing uploaded): `{run.publish('merged')}`.", "",
                  "## Stage timings (s)", "", "| " + " | ".join(timings) + " |", "|" + " ---: |" * len(timings),
                  "| " + " | ".join(str(v) for v in timings.values()) + " |", ""]
        (tmp / "report.md").write_text("\n".join(lines))
