"""Restore fixed LQ versions of photos and score them against bicubic: the main job's quality check.

Each photo is centre-cropped to a multiple of 4, degraded by the Real-ESRGAN model (the x4plus values, or the
setting a model was trained with) with a seed of its own (`degrade_images`: the same LQ every run), restored,
and scored by PSNR/SSIM on the Y channel (border = scale),
next to the bicubic upsampling of the same LQ. Images are written as PNG: lq, bicubic, sr, hq.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sana_sr.atomic import atomic_directory, folder_bytes
from sana_sr.data.degradation_config import DegradationConfig
from sana_sr.evaluation.metrics.fidelity import psnr_y, ssim_y, to_8bit_levels
from sana_sr.images import load_image
from sana_sr.model.pipeline import SanaSRPipeline, bicubic_upsample


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
def score_photos(pipe: SanaSRPipeline, photos: list[Path], crop: int, seed: int, out: Path,
                 degradation: DegradationConfig | None = None) -> dict[str, dict]:
    """{name: {psnr_sr, psnr_bicubic, ssim_sr, ssim_bicubic}} for each photo; images written under `out`.

    `degradation` defaults to the x4plus values at the pipeline's scale."""
    from sana_sr.data.degradation import degrade_images

    scale = pipe.config.upscale
    degradation = degradation or DegradationConfig(scale=scale)
    if degradation.scale != scale:
        raise ValueError(f"degradation scale {degradation.scale} differs from the model's {scale}")
    results = {}
    for path in photos:
        hq = center_crop(path, crop)
        lq = degrade_images(hq, seed + zlib.crc32(path.name.encode()), degradation)
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


def write_center_crops(photos: list[Path], size: int, out: Path) -> None:
    """The centre crops as PNG files, a GT folder for eval/realsr.py --div2k-gt; written atomically."""
    with atomic_directory(out, "write_center_crops") as tmp:
        for path in photos:
            _save(tmp / f"{path.stem}.png", center_crop(path, size)[0].permute(1, 2, 0).numpy())


def _means(scores: dict[str, dict]) -> dict[str, float]:
    return {k: float(np.mean([v[k] for v in scores.values()])) for k in next(iter(scores.values()))}


def score_variants(variants: dict[str, Path], out: Path, seed: int, train: list[Path], held_back: list[Path],
                   real_lq: list[Path], crop: int, degradation: DegradationConfig | None = None) -> dict:
    """Score each model folder and bicubic on the same LQ photos; restore the real LQ photos with the first model.

    Writes out/VARIANT/{train,held_back}/ images, out/real_lq/ and out/scores.json (last, atomically):
    {variant: {bytes, train: {photo: scores}, held_back: ..., train_mean, held_back_mean}}.
    """
    from sana_sr.model.loading import load_pipeline

    scores: dict[str, dict] = {}
    with atomic_directory(out, "score_variants") as tmp:
        for index, (name, folder) in enumerate(variants.items()):
            pipe = load_pipeline(folder)
            pipe.set_progress_bar_config(disable=True)
            # The weights a deployment needs (a stored text encoder is not counted).
            entry: dict = {"bytes": folder_bytes(folder, ".safetensors", skip=("text_encoder",))}
            for subset, photos in (("train", train), ("held_back", held_back)):
                (tmp / name / subset).mkdir(parents=True)
                entry[subset] = score_photos(pipe, photos, crop, seed, tmp / name / subset, degradation)
                entry[f"{subset}_mean"] = _means(entry[subset])
            scores[name] = entry
            if index == 0:
                (tmp / "real_lq").mkdir()
                for path in real_lq:
                    lq = torch.from_numpy(load_image(path).rgb).permute(2, 0, 1)[None]
                    with torch.no_grad():
                        _save(tmp / "real_lq" / path.name, _array(pipe(lq)))
        (tmp / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores
