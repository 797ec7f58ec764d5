"""Prompt-aware vs null-prompt vs magnitude importance at equal size and equal fine-tune budget (tiny SANA-SR).

For each importance method: a copy of the same base pipeline is pruned to the same parameter target, evaluated,
fine-tuned for the same steps on the same data (SR pixel loss + distillation from the unpruned base: output and
block features, `compress.pruning.distill`), and evaluated again: PSNR / SSIM (Y, border 4) on held-out real photos
(chelsea.png, held back from all training here, and Set5's HR images from /work/shared/data), degraded by the same
seeded degradation as the calibration pairs, each centre-cropped to at most --eval-size.

Base: `--base FOLDER` (a trained SanaSRPipeline, e.g. the tiny preset's pretrained base after SR training), else
a tiny pipeline prepared here from the bundled training photos (DC-AE reconstruction training, then one-step SR
training of the whole DiT with the photos' captions), cached in OUT/base. The fine-tune loop here is a stand-in
for the project's training loop (`sana_sr/train/`), which the real recovery fine-tune goes through.

    python benchmarks/prune_importance.py --out runs/bench-prune            # ~20 min on 2 busy CPU cores
    python benchmarks/prune_importance.py --base runs/tiny-sr --out runs/bench-prune-pretrained
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import FeatureTap  # noqa: E402
from compress.pruning import DistillWeights, distillation_loss, feature_pairs  # noqa: E402
from sana_sr import SanaSRPipeline, build_pipeline  # noqa: E402
from sana_sr.atomic import atomic_directory, atomic_file  # noqa: E402
from sana_sr.data.calibration_pairs import (
    calibration_batches,  # noqa: E402
    prepare_batches,  # noqa: E402
)
from sana_sr.evaluation.metrics.fidelity import psnr_y, ssim_y, to_8bit_levels  # noqa: E402
from sana_sr.model.pipeline import predict_velocity  # noqa: E402
from sana_sr.pruning.dit_structure import block_names  # noqa: E402
from sana_sr.pruning.prompt_aware import PruneSettings, importance_scores, prune_pipeline  # noqa: E402

SET5 = Path("/work/shared/data/Set5/HR")
EVAL_PROMPTS = {
    "chelsea.png": "a photo of a cat, fur, animal",
    "baby.png": "a photo of a child, face, portrait",
    "bird.png": "a photo of a bird, feather, animal",
    "butterfly.png": "a butterfly, flower, pattern, texture",
    "head.png": "a photo of a man, face, portrait",
    "woman.png": "a photo of a woman, face, hair",
}


def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def simple_degradation(hq: torch.Tensor, scale: int, generator: torch.Generator) -> torch.Tensor:
    """Per image: Gaussian blur (sigma in [0.4, 1.6]), bicubic x1/scale, Gaussian noise (sigma in [1, 8]/255),
    JPEG (quality in [50, 95]), 8-bit levels. This benchmark's degradation as it was measured (docs/pruning.md);
    the project's calibration uses the Real-ESRGAN one (sana_sr.data.calibration_pairs.realesrgan_degradation)."""
    out = []
    for image in hq:
        u = torch.rand(4, generator=generator).tolist()
        sigma = 0.4 + 1.2 * u[0]
        radius = max(1, math.ceil(3 * sigma))
        k = _gaussian_kernel(sigma, radius)
        x = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        x = F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        h, w = image.shape[1] // scale, image.shape[2] // scale
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x + torch.randn(x.shape, generator=generator) * (1 + 7 * u[1]) / 255
        array = (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=int(50 + 45 * u[2]))
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32) / 255
        out.append(torch.from_numpy(decoded).permute(2, 0, 1))
    return torch.stack(out)

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def eval_set(size: int, seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor, str]]:
    """(name, LQ, HQ, prompt) for chelsea + Set5, centre crops of at most `size` px (a multiple of 16)."""
    from sana_sr import bundled

    paths = bundled.held_back_photos() + (sorted(SET5.glob("*.png")) if SET5.is_dir() else [])
    out = []
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            a = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        h, w = (min(s, size) // 16 * 16 for s in a.shape[1:])
        top, left = (a.shape[1] - h) // 2, (a.shape[2] - w) // 2
        hq = a[:, top: top + h, left: left + w][None]
        lq = simple_degradation(hq, 4, torch.Generator().manual_seed(seed + i))
        out.append((path.name, lq, hq, EVAL_PROMPTS.get(path.name, "")))
    return out


@torch.no_grad()
def evaluate(pipe: SanaSRPipeline | None, images) -> dict:
    """Mean PSNR / SSIM of the pipeline's restorations (None: plain bicubic upsampling, the floor to beat)."""
    from sana_sr.model.pipeline import bicubic_upsample

    psnrs, ssims = [], []
    for _, lq, hq, prompt in images:
        if pipe is None:
            sr = bicubic_upsample(lq, *hq.shape[2:])[0].permute(1, 2, 0).numpy()
        else:
            sr = pipe(lq, prompt=prompt)[0].permute(1, 2, 0).cpu().numpy()
        hr = hq[0].permute(1, 2, 0).numpy()
        sr = to_8bit_levels(sr)
        psnrs.append(psnr_y(sr, hr, crop_border=4))
        ssims.append(ssim_y(sr, hr, crop_border=4))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)),
            "per_image": {n: [round(p, 3), round(s, 4)] for (n, *_), p, s in zip(images, psnrs, ssims)}}


def train_steps(pipe, steps: int, lr: float, batch: int, crop: int, seed: int, teacher=None,
                weights: DistillWeights | None = None, label: str = "") -> list[float]:
    """Adam on the whole DiT: SR pixel loss (+ distillation from `teacher` when given). Same data for every run."""
    dit = pipe.transformer
    dit.train().requires_grad_(True)
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.0)
    pairs = feature_pairs(getattr(dit.config, "kept_blocks", None), len(dit.transformer_blocks))
    losses = []
    for step in range(steps):
        pairs_now = calibration_batches(None, batch, batch, crop, 4, seed * 100003 + step, simple_degradation)
        (b,) = prepare_batches(pipe, pairs_now)
        t = torch.full((b.latents.shape[0],), pipe.timestep)
        with FeatureTap(dit, block_names(dit)) as s_feats:
            v = predict_velocity(dit, b.latents, t, b.embeds, b.mask)
        loss = torch.nn.functional.mse_loss(pipe.decode(b.latents - pipe.sigma * v).float(), b.target)
        if teacher is not None:
            with torch.no_grad(), FeatureTap(teacher, block_names(teacher)) as t_feats:
                v_t = predict_velocity(teacher, b.latents, t, b.embeds, b.mask)
            distill, _ = distillation_loss(v, v_t, s_feats.ordered(), t_feats.ordered(), pairs, weights)
            loss = loss + distill
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"{label} step {step}/{steps} loss {loss.item():.4f}")
    dit.eval().requires_grad_(False)
    return losses


def prepare_base(args) -> SanaSRPipeline:
    """A tiny SR pipeline: trained DC-AE (reconstruction), then the DiT trained for one-step SR with captions."""
    from sana_sr import bundled
    from sana_sr.data.calibration_pairs import load_photos
    from sana_sr.train.pretrain_tiny import AutoencoderStage, PhotoCrops, StageSettings, set_scaling_factor

    folder = args.out / "base"
    if (folder / "model_index.json").is_file():
        log(f"base: reusing {folder}")
        return SanaSRPipeline.from_pretrained(folder)
    pipe = build_pipeline("tiny", seed=args.seed)
    crops = PhotoCrops([photo for _, photo in load_photos(bundled.train_photos(), args.crop)], args.crop, args.seed)
    AutoencoderStage(pipe.vae, crops, StageSettings(args.ae_steps, 2e-3, args.batch, args.out / "base-ae.work",
                                                    seed=args.seed)).run()
    set_scaling_factor(pipe.vae, crops)
    train_steps(pipe, args.base_steps, 1e-3, args.batch, args.crop, args.seed + 7, label="base SR")
    with atomic_directory(folder, "benchmarks/prune_importance.py") as tmp:
        pipe.save_pretrained(tmp)
    return SanaSRPipeline.from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, help="a trained SanaSRPipeline folder (default: prepare a tiny one)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-prune"))
    p.add_argument("--methods", default="taylor,taylor-null,magnitude")
    p.add_argument("--target-params", type=float, default=0.5)
    p.add_argument("--structures", default="heads,cross_heads,channels")
    p.add_argument("--calib-pairs", type=int, default=16)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--distill-output", type=float, default=1.0)
    p.add_argument("--distill-features", type=float, default=0.1)
    p.add_argument("--ae-steps", type=int, default=800, help="base preparation: DC-AE steps")
    p.add_argument("--base-steps", type=int, default=400, help="base preparation: one-step SR steps of the DiT")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=32, help="HQ crop side for calibration and training")
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="base preparation and the evaluation's degradations")
    p.add_argument("--run-seed", type=int, default=0, help="calibration pairs and fine-tune data")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    env = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "loadavg_start": os.getloadavg()}
    import diffusers
    import torch_pruning

    env.update(diffusers=diffusers.__version__, torch_pruning=torch_pruning.__version__)

    base = SanaSRPipeline.from_pretrained(args.base) if args.base else prepare_base(args)
    base.set_progress_bar_config(disable=True)
    base.merge_lora()
    images = eval_set(args.eval_size, 1000 + args.seed)
    results = {"bicubic": {"eval": evaluate(None, images)},
               "unpruned": {"eval": evaluate(base, images), "params": sum(t.numel() for t in base.transformer.parameters())}}
    log(f"unpruned: {results['unpruned']['eval']['psnr']:.3f} dB")
    calib = calibration_batches(None, args.calib_pairs, 4, args.crop, 4, args.run_seed + 11, simple_degradation)
    weights = DistillWeights(args.distill_output, args.distill_features)
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        pipe = copy.deepcopy(base)
        scores = importance_scores(pipe, method, calib)
        report = prune_pipeline(pipe, PruneSettings(target_params=args.target_params, importance=method,
                                                    structures=tuple(args.structures.split(","))), scores=scores)
        pruned_eval = evaluate(pipe, images)
        losses = train_steps(pipe, args.finetune_steps, args.lr, args.batch, args.crop, args.run_seed + 99,
                             teacher=base.transformer, weights=weights, label=method)
        results[method] = {"params": report["after"]["params"], "macs_512": report["after"]["macs"],
                           "widths": report["widths_after"], "pruned": pruned_eval, "finetuned": evaluate(pipe, images),
                           "finetune_loss_last10": float(np.mean(losses[-10:])) if losses else None,
                           "seconds": round(time.perf_counter() - t0, 1)}
        log(f"{method}: pruned {pruned_eval['psnr']:.3f} dB -> fine-tuned {results[method]['finetuned']['psnr']:.3f} dB")
    env["loadavg_end"] = os.getloadavg()
    env["seconds"] = round(time.perf_counter() - start, 1)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "env": env, "results": results}
    rows = ["| importance | DiT params | PSNR / SSIM pruned | PSNR / SSIM after fine-tune |", "| --- | ---: | ---: | ---: |"]
    b = results["bicubic"]["eval"]
    rows.append(f"| (bicubic upsampling) | – | {b['psnr']:.2f} / {b['ssim']:.4f} | – |")
    u = results["unpruned"]
    rows.append(f"| unpruned | {u['params'] / 1e3:,.1f}K | {u['eval']['psnr']:.2f} / {u['eval']['ssim']:.4f} | – |")
    for m in args.methods.split(","):
        r = results[m]
        rows.append(f"| {m} | {r['params'] / 1e3:,.1f}K | {r['pruned']['psnr']:.2f} / {r['pruned']['ssim']:.4f} | "
                    f"{r['finetuned']['psnr']:.2f} / {r['finetuned']['ssim']:.4f} |")
    table = "\n".join(rows)
    print(table)
    with atomic_file(args.out / "results.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_file(args.out / "results.md") as tmp:
        tmp.write_text(table + "\n\n```json\n" + json.dumps(env, indent=2) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
