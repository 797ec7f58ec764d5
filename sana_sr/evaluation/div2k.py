"""DIV2K-Val as StableSR builds it: GT crops, and LQ made from them once by the Real-ESRGAN degradation, cached.

Each LQ image is drawn with its own seed, derived from the run's seed and the GT file name, so that the set does
not depend on the order or number of files or processes. The cache is one folder per (GT folder, scale, seed)
with a manifest; it is written atomically by the main process and reused when the manifest matches.

The degradation is `sana_sr.data.degradation.degrade_images` (Real-ESRGAN x4plus, no pair queue), imported lazily.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sana_sr.atomic import atomic_directory
from sana_sr.evaluation.datasets import DatasetError, list_images
from sana_sr.images import ImageError, load_image

MANIFEST = "manifest.json"


def _degradation_config(scale: int):
    from sana_sr.data.degradation_config import DegradationConfig

    return DegradationConfig(scale=scale)


def degrade_one(config, hq: torch.Tensor, seed: int) -> torch.Tensor:
    """LQ (1, 3, H/s, W/s) in [0, 1] from HQ (1, 3, H, W) in [0, 1], every random draw from `seed`."""
    from sana_sr.data.degradation import degrade_images

    return degrade_images(hq, seed, config)


def image_seed(seed: int, name: str) -> int:
    """The seed of one image: the run's seed mixed with a hash of its name (independent of file order)."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def _manifest(gt_files: list[Path], gt_dir: Path, scale: int, seed: int, config) -> dict:
    return {
        "gt_dir": str(gt_dir.resolve()),
        "scale": scale,
        "seed": seed,
        "degradation": repr(config),
        "files": [[p.relative_to(gt_dir).as_posix(), p.stat().st_size] for p in gt_files],
    }


def cache_folder(cache_root: Path, gt_dir: Path, scale: int, seed: int) -> Path:
    return Path(cache_root) / f"{Path(gt_dir).name}-realesrgan-x{scale}-seed{seed}"


def prepare_lq(gt_dir: Path, cache_root: Path, scale: int, seed: int, progress: bool = True) -> Path:
    """The cached LQ folder for `gt_dir`, generating it first if absent or stale. Call on ONE process only."""
    gt_dir = Path(gt_dir)
    gt_files = list_images(gt_dir, "DIV2K-Val GT")
    config = _degradation_config(scale)
    manifest = _manifest(gt_files, gt_dir, scale, seed, config)
    target = cache_folder(cache_root, gt_dir, scale, seed)
    if (target / MANIFEST).is_file() and json.loads((target / MANIFEST).read_text()) == manifest:
        return target

    from tqdm import tqdm

    # A stale cache is ours to replace: its manifest says what made it (caches older than the marker file have one).
    with atomic_directory(target, "sana-sr evaluate --div2k-gt", overwrite=(target / MANIFEST).is_file()) as tmp:
        for path in tqdm(gt_files, desc="DIV2K-Val LQ", unit="img", disable=not progress):
            relative = path.relative_to(gt_dir)
            try:
                rgb = load_image(path).rgb
            except ImageError as e:
                raise DatasetError(f"DIV2K-Val GT {path}: {e}") from None
            height, width = rgb.shape[:2]
            if height % scale or width % scale:
                raise DatasetError(
                    f"DIV2K-Val GT {path} is {width}x{height}, not a multiple of the scale {scale}; crop the GT first"
                )
            hq = torch.from_numpy(rgb).permute(2, 0, 1)[None]
            with torch.no_grad():
                lq = degrade_one(config, hq, image_seed(seed, relative.as_posix()))
            expected = (height // scale, width // scale)
            if tuple(lq.shape[-2:]) != expected:
                raise DatasetError(f"the degradation returned {tuple(lq.shape[-2:])} for {path}, expected {expected}")
            array = (lq[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            out = tmp / relative.with_suffix(".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(out, format="PNG")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return target
