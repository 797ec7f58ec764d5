"""Restore fixed LQ versions of photos and score them against bicubic: the main job's quality check.

Each photo is centre-cropped (to at most `crop`, a multiple of 16) and made LQ by one of two protocols:
`degraded`, the Real-ESRGAN model (the setting a model was trained with) with a seed of its own per photo
(`degrade_images`: the same LQ every run), and `bicubic`, plain x4 antialiased bicubic downsampling rounded to
8 bit (how the shipped `tiny-sr` model was trained and measured). It is restored and scored by PSNR/SSIM on the Y
channel (border = scale), next to the bicubic upsampling of the same LQ. Images are written as PNG: lq, bicubic,
sr, hq.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sana_sr.atomic import atomic_directory, folder_bytes
from sana_sr.data.degradation_config import DegradationConfig
from sana_sr.evaluation.metrics.fidelity import psnr_y, ssim_y, to_8bit_levels
from sana_sr.images import load_image
from sana_sr.model.pipeline import SanaSRPipeline, bicubic_upsample

PROTOCOLS = ("degraded", "bicubic")
"""The two ways a scored photo's LQ is made (module docstring)."""
SIDE_MULTIPLE = 16  # LQ side a multiple of 4, so that the x4 output lands on the HQ grid of the f4 autoencoder


def center_crop(path: Path, size: int) -> torch.Tensor:
    """(1, 3, s, s) in [0, 1]: the centre of the photo, s = `size`, or less for a smaller photo (a multiple of 16)."""
    rgb = load_image(path).rgb
    side = min(size, *rgb.shape[:2]) // SIDE_MULTIPLE * SIDE_MULTIPLE
    if side == 0:
        raise ValueError(f"{path} is {rgb.shape[1]}x{rgb.shape[0]}: smaller than {SIDE_MULTIPLE} px, cannot be scored")
    top, left = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
    return torch.from_numpy(rgb[top : top + side, left : left + side].copy()).permute(2, 0, 1)[None]


def bicubic_down(hq: torch.Tensor, scale: int) -> torch.Tensor:
    """Plain x`scale` downsampling: torch's antialiased bicubic (PIL's kernel), rounded to 8-bit levels."""
    h, w = hq.shape[-2:]
    lq = F.interpolate(hq, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return (lq.clamp(0, 1) * 255).round() / 255


def make_lq(hq: torch.Tensor, name: str, protocol: str, seed: int, degradation: DegradationConfig) -> torch.Tensor:
    """The LQ of one photo under `protocol`; the seed of `degraded` depends on the photo's name only."""
    if protocol == "bicubic":
        return bicubic_down(hq, degradation.scale)
    if protocol == "degraded":
        from sana_sr.data.degradation import degrade_images

        # The degraded protocol alone: rows a training config swaps for plain bicubic LQ are the other protocol.
        return degrade_images(hq, seed + zlib.crc32(name.encode()), replace(degradation, bicubic_prob=0.0))
    raise ValueError(f"unknown LQ protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


def _array(image: torch.Tensor) -> np.ndarray:
    return to_8bit_levels(image[0].permute(1, 2, 0).cpu().numpy())


def _save(path: Path, image: np.ndarray) -> None:
    Image.fromarray((image * 255).round().astype(np.uint8)).save(path, format="PNG")


@torch.no_grad()
def score_photos(pipe: SanaSRPipeline, photos: list[Path], crop: int, seed: int, out: Path,
                 degradation: DegradationConfig | None = None, protocol: str = "degraded") -> dict[str, dict]:
    """{name: {psnr_sr, psnr_bicubic, ssim_sr, ssim_bicubic}} for each photo; images written under `out`.

    `degradation` defaults to the x4plus values at the pipeline's scale."""
    scale = pipe.config.upscale
    degradation = degradation or DegradationConfig(scale=scale)
    if degradation.scale != scale:
        raise ValueError(f"degradation scale {degradation.scale} differs from the model's {scale}")
    results = {}
    for path in photos:
        hq = center_crop(path, crop)
        lq = make_lq(hq, path.name, protocol, seed, degradation)
        sr = pipe(lq)
        bicubic = bicubic_upsample(lq, hq.shape[2], hq.shape[3])
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


def write_eval_pairs(photos: list[Path], size: int, seed: int, degradation: DegradationConfig, out: Path) -> None:
    """out/hr/PROTOCOL/NAME.png (the centre crops) and out/lr/PROTOCOL/NAME.png for each protocol: one HR/LR folder
    pair for `sana-sr evaluate --hr --lr` (pairs match by relative path), the same LQ that `score_variants` scores;
    written atomically."""
    with atomic_directory(out, "write_eval_pairs") as tmp:
        for protocol in PROTOCOLS:
            (tmp / "hr" / protocol).mkdir(parents=True)
            (tmp / "lr" / protocol).mkdir(parents=True)
            for path in photos:
                hq = center_crop(path, size)
                _save(tmp / "hr" / protocol / f"{path.stem}.png", _array(hq))
                _save(tmp / "lr" / protocol / f"{path.stem}.png",
                      _array(make_lq(hq, path.name, protocol, seed, degradation)))


def _means(scores: dict[str, dict]) -> dict[str, float]:
    return {k: float(np.mean([v[k] for v in scores.values()])) for k in next(iter(scores.values()))}


@torch.no_grad()
def restore_real_lq(pipes: dict[str, SanaSRPipeline], photos: list[Path], out: Path) -> None:
    """out/STEM_lq.png, STEM_bicubic.png and STEM_NAME.png for each pipeline: real LQ photos with no reference."""
    if not pipes:
        return
    scale = next(iter(pipes.values())).config.upscale
    for path in photos:
        lq = torch.from_numpy(load_image(path).rgb).permute(2, 0, 1)[None]
        _save(out / f"{path.stem}_lq.png", _array(lq))
        _save(out / f"{path.stem}_bicubic.png",
              _array(bicubic_upsample(lq, lq.shape[2] * scale, lq.shape[3] * scale)))
        for name, pipe in pipes.items():
            _save(out / f"{path.stem}_{name}.png", _array(pipe(lq)))


def score_variants(variants: dict[str, Path], out: Path, seed: int, subsets: dict[str, list[Path]],
                   real_lq: list[Path], crop: int, degradation: DegradationConfig | None = None,
                   real_lq_variants: tuple[str, ...] = ()) -> dict:
    """Score each model folder and bicubic on the same LQ photos, under each protocol of PROTOCOLS; restore the real
    LQ photos with the variants named in `real_lq_variants` (default: the first).

    Writes out/VARIANT/PROTOCOL/SUBSET/ images, out/real_lq/ and out/scores.json (last, atomically):
    {variant: {bytes, PROTOCOL: {SUBSET: {photo: scores}, SUBSET_mean: {...}}}}.
    """
    from sana_sr.model.loading import load_pipeline

    real_lq_variants = real_lq_variants or tuple(variants)[:1]
    scores: dict[str, dict] = {}
    real_lq_pipes: dict[str, SanaSRPipeline] = {}
    with atomic_directory(out, "score_variants") as tmp:
        for name, folder in variants.items():
            pipe = load_pipeline(folder)
            pipe.set_progress_bar_config(disable=True)
            # The weights a deployment needs (a stored text encoder is not counted).
            entry: dict = {"bytes": folder_bytes(folder, ".safetensors", skip=("text_encoder",))}
            for protocol in PROTOCOLS:
                entry[protocol] = {}
                for subset, photos in subsets.items():
                    (tmp / name / protocol / subset).mkdir(parents=True)
                    found = score_photos(pipe, photos, crop, seed, tmp / name / protocol / subset, degradation,
                                         protocol)
                    entry[protocol][subset], entry[protocol][f"{subset}_mean"] = found, _means(found)
            scores[name] = entry
            if name in real_lq_variants:
                real_lq_pipes[name] = pipe
        (tmp / "real_lq").mkdir()
        restore_real_lq(real_lq_pipes, real_lq, tmp / "real_lq")
        (tmp / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores
