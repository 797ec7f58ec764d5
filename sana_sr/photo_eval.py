"""Restore fixed LQ versions of photos and score them against bicubic: the main job's quality check.

Each photo is centre-cropped to a multiple of 4, degraded by the Real-ESRGAN model with a seed of its own
(`degrade_images`: the same LQ every run), restored, and scored by PSNR/SSIM on the Y channel (border = scale),
next to the bicubic upsampling of the same LQ. Images are written as PNG: lq, bicubic, sr, hq.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import atomic_directory
from .images import load_image
from .metrics.fidelity import psnr_y, ssim_y, to_8bit_levels
from .pipeline import SanaSRPipeline, bicubic_upsample


def center_crop(path: Path, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: the centre of the photo."""
    rgb = load_image(path).rgb
    top, left = (rgb.shape[0] - size) // 2, (rgb.shape[1] - size) // 2
    if top < 0 or left < 0:
        raise ValueError(f"{path} is smaller than the {size}x{size} evaluation crop")
    return torch.from_numpy(rgb[top : top + size, left : left + size].copy()).permute(2, 0, 1)[None]


def _array(image: torch.Tensor) -> np.ndarray:
    return to_8bit_levels(image[0].permute(1, 2, 0).cpu().numpy())


def _save(path: Path, image: np.ndarray) -> None:
    Image.fromarray((image * 255).round().astype(np.uint8)).save(path, format="PNG")


@torch.no_grad()
def score_photos(pipe: SanaSRPipeline, photos: list[Path], crop: int, seed: int, out: Path) -> dict[str, dict]:
    """{name: {psnr_sr, psnr_bicubic, ssim_sr, ssim_bicubic}} for each photo; images written under `out`."""
    from .data.degradation import degrade_images
    from .data.degradation_config import DegradationConfig

    scale = pipe.config.upscale
    results = {}
    for path in photos:
        hq = center_crop(path, crop)
        lq = degrade_images(hq, seed + zlib.crc32(path.name.encode()), DegradationConfig(scale=scale))
        sr = pipe(lq)
        bicubic = bicubic_upsample(lq, crop, crop)
        images = {"lq": _array(lq), "bicubic": _array(bicubic), "sr": _array(sr), "hq": _array(hq)}
        for kind, image in images.items():
            _save(out / f"{path.stem}_{kind}.png", image)
        results[path.stem] = {
            "psnr_sr": psnr_y(images["sr"], images["hq"], scale),
            "psnr_bicubic": psnr_y(images["bicubic"], images["hq"], scale),
            "ssim_sr": ssim_y(images["sr"], images["hq"], scale),
            "ssim_bicubic": ssim_y(images["bicubic"], images["hq"], scale),
        }
    return results


def restore_photo_sets(model_dir: Path, out: Path, seed: int, train: list[Path], held_back: list[Path],
                       real_lq: Path, crop: int) -> dict:
    """Score the training and held-back photos, restore the real LQ photos; writes `out/psnr.json` last."""
    pipe = SanaSRPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    with atomic_directory(out) as tmp:
        scores = {}
        for name, photos in (("train", train), ("held_back", held_back)):
            (tmp / name).mkdir()
            scores[name] = score_photos(pipe, photos, crop, seed, tmp / name)
        (tmp / "real_lq").mkdir()
        for path in sorted(p for p in real_lq.iterdir() if p.suffix == ".png"):
            lq = torch.from_numpy(load_image(path).rgb).permute(2, 0, 1)[None]
            _save(tmp / "real_lq" / path.name, _array(pipe(lq)))
        for name in ("train", "held_back"):
            values = scores[name].values()
            scores[f"{name}_mean"] = {k: float(np.mean([v[k] for v in values])) for k in next(iter(values))}
        (tmp / "psnr.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores
