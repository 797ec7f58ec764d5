"""Calibration pairs for prompt-aware pruning: real photo crops, a degradation, and each photo's prompt.

The degradation is a hook (`Degradation`): the default here is a simple, seeded blur -> downscale -> noise ->
JPEG chain. The Real-ESRGAN second-order degradation of training (sana_sr/data on the data branch) plugs in as
any callable `(hq (B, 3, H, W) in [0, 1], scale, generator) -> lq (B, 3, H / scale, W / scale) in [0, 1]`.
Prompts: a caption file next to each image (`photo.png` -> `photo.txt`), the bundled photos' captions, or "".
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Degradation = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class CalibrationBatch:
    """LQ/HQ pairs with their prompts (or their precomputed prompt embeddings)."""

    lq: torch.Tensor
    """(B, 3, h, w) in [0, 1]."""
    hq: torch.Tensor
    """(B, 3, h * scale, w * scale) in [0, 1]."""
    prompts: list[str]
    """One prompt per pair ("" = the null prompt)."""
    prompt_embeds: torch.Tensor | None = None
    """Optional (B, L, C) embeddings (e.g. cached in shards): used instead of encoding `prompts`."""
    prompt_mask: torch.Tensor | None = None
    """(B, L) mask of `prompt_embeds`."""


def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def simple_degradation(hq: torch.Tensor, scale: int, generator: torch.Generator) -> torch.Tensor:
    """Per image: Gaussian blur (sigma in [0.4, 1.6]), bicubic x1/scale, Gaussian noise (sigma in [1, 8]/255),
    JPEG (quality in [50, 95]), 8-bit levels. A stand-in for Real-ESRGAN's degradation, same interface."""
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


def bundled_calibration_images() -> list[Path]:
    """The bundled training photos (chelsea.png is held back for evaluation, so it is not among them)."""
    from .quickstart import bundled
    from .tiny_base import TRAIN_PHOTOS

    return [bundled("photos") / name for name in TRAIN_PHOTOS]


def prompt_for(path: Path) -> str:
    """The caption next to the image, else the bundled photo's caption, else "" (the null prompt)."""
    from .tiny_base import TRAIN_PHOTOS

    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    return TRAIN_PHOTOS.get(path.name, "")


def expand_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); an error names what was not found."""
    images = []
    for p in map(Path, paths):
        if p.is_dir():
            images += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            images.append(p)
        else:
            raise FileNotFoundError(f"calibration image {p} does not exist")
    if not images:
        raise ValueError(f"no calibration images in {[str(p) for p in paths]}")
    return images


def calibration_batches(
    images: Sequence[str | Path] | None = None,
    pairs: int = 16,
    batch_size: int = 4,
    crop: int = 64,
    scale: int = 4,
    seed: int = 0,
    degradation: Degradation = simple_degradation,
    prompts: Callable[[Path], str] = prompt_for,
) -> list[CalibrationBatch]:
    """`pairs` random HQ crops (`crop` px, a multiple of `scale`) of `images`, degraded to LQ, in batches."""
    if crop % scale:
        raise ValueError(f"crop {crop} must be a multiple of the scale {scale}")
    if pairs < 1 or batch_size < 1:
        raise ValueError(f"need pairs >= 1 and batch_size >= 1, got {pairs} and {batch_size}")
    paths = expand_images(images) if images else bundled_calibration_images()
    photos, captions = [], []
    for path in paths:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        if min(array.shape[:2]) < crop:
            raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]}, smaller than the {crop} px crop: "
                             "pass larger images or a smaller --crop")
        photos.append(torch.from_numpy(array).permute(2, 0, 1))
        captions.append(prompts(path))
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, pairs, batch_size):
        n = min(batch_size, pairs - start)
        crops, texts = [], []
        for _ in range(n):
            i = int(torch.randint(len(photos), (1,), generator=generator))
            _, h, w = photos[i].shape
            top = int(torch.randint(h - crop + 1, (1,), generator=generator))
            left = int(torch.randint(w - crop + 1, (1,), generator=generator))
            crops.append(photos[i][:, top: top + crop, left: left + crop])
            texts.append(captions[i])
        hq = torch.stack(crops)
        batches.append(CalibrationBatch(lq=degradation(hq, scale, generator), hq=hq, prompts=texts))
    return batches
