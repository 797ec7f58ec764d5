"""Calibration pairs for pruning and quantization: real photo crops, a degradation, and each photo's prompt.

The degradation is a hook (`Degradation`, any callable `(hq (B, 3, H, W) in [0, 1], scale, generator) -> lq`); the
default is training's Real-ESRGAN second-order degradation with every draw seeded from `generator`.
Prompts: a caption file next to each image (`photo.png` -> `photo.txt`), the bundled photos' captions, or "".
Unreadable or too-small images are skipped with a warning naming them; none left is an error. `prepare_batches`
encodes pairs once through a pipeline's frozen parts, for the losses of pruning and quantization.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sana_sr.bundled import train_photos as bundled_train_photos

Degradation = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


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


def realesrgan_degradation(hq: torch.Tensor, scale: int, generator: torch.Generator) -> torch.Tensor:
    """Training's degradation (sana_sr.data), every kernel and noise draw seeded from `generator`."""
    from sana_sr.data.degradation import degrade_images
    from sana_sr.data.degradation_config import DegradationConfig

    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    return degrade_images(hq, seed, DegradationConfig(scale=scale))


def prompt_for(path: Path) -> str:
    """The caption next to the image, else the bundled photo's caption, else "" (the null prompt)."""
    from sana_sr.bundled import CAPTIONS

    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text().strip()
    return CAPTIONS.get(path.name, "")


def expand_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images (sorted); an error names what was not found."""
    from sana_sr.images import find_images

    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"calibration image {missing[0]} does not exist")
    images = [path for path, _ in find_images(list(paths))]
    if not images:
        raise ValueError(f"no calibration images in {[str(p) for p in paths]}")
    return images


def load_photos(paths: Sequence[Path], crop: int) -> list[tuple[Path, torch.Tensor]]:
    """(path, (3, H, W) in [0, 1]) of every readable image with both sides >= crop; the rest skipped with a warning."""
    from sana_sr.images import ImageError, load_image

    photos = []
    for path in paths:
        try:
            rgb = load_image(path).rgb
        except ImageError as e:
            print(f"warning: skipping calibration image {path}: {e}", file=sys.stderr)
            continue
        if min(rgb.shape[:2]) < crop:
            print(f"warning: skipping calibration image {path}: {rgb.shape[1]}x{rgb.shape[0]} is smaller than the "
                  f"{crop} px crop", file=sys.stderr)
            continue
        photos.append((path, torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()))
    if not photos:
        raise ValueError(f"no calibration image of at least {crop}x{crop} pixels among {len(paths)}: add larger "
                         "images or lower the crop size")
    return photos


def calibration_batches(
    images: Sequence[str | Path] | None = None,
    pairs: int = 16,
    batch_size: int = 4,
    crop: int = 64,
    scale: int = 4,
    seed: int = 0,
    degradation: Degradation = realesrgan_degradation,
    prompts: Callable[[Path], str] = prompt_for,
) -> list[CalibrationBatch]:
    """`pairs` random HQ crops (`crop` px, a multiple of `scale`) of `images`, degraded to LQ, in batches."""
    if crop % scale:
        raise ValueError(f"crop {crop} must be a multiple of the scale {scale}")
    if pairs < 1 or batch_size < 1:
        raise ValueError(f"need pairs >= 1 and batch_size >= 1, got {pairs} and {batch_size}")
    loaded = load_photos(expand_images(images) if images else bundled_train_photos(), crop)
    photos, captions = [photo for _, photo in loaded], [prompts(path) for path, _ in loaded]
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


@dataclass
class PreparedBatch:
    """A calibration batch in the form the SR loss consumes (the frozen parts precomputed)."""

    latents: torch.Tensor
    target: torch.Tensor
    """HQ in [-1, 1]."""
    embeds: torch.Tensor
    mask: torch.Tensor


@torch.no_grad()
def prepare_batches(pipe, batches: Sequence[CalibrationBatch], null_prompt: bool = False,
                    stored_prompt: bool = False) -> list[PreparedBatch]:
    """Encode LQ (bicubic-upsampled, as in inference) and prompts once; the HQ becomes the target.

    Prompts: the batch's (embeddings, else its texts through the text encoder); with `null_prompt` the empty
    prompt; with `stored_prompt` the pipeline's stored default prompt, what inference uses without a prompt."""
    from sana_sr.model.pipeline import bicubic_upsample

    prepared = []
    device = pipe.vae.device
    for batch in batches:
        b, _, h, w = batch.hq.shape
        latents = pipe.encode(bicubic_upsample(batch.lq.to(device), h, w) * 2 - 1)
        if null_prompt:
            embeds, mask = _null_prompt(pipe, b)
        elif stored_prompt:
            embeds, mask = pipe.encode_prompt(None, b)
        elif batch.prompt_embeds is not None:
            embeds = batch.prompt_embeds.to(device)
            mask = (batch.prompt_mask.to(device) if batch.prompt_mask is not None
                    else torch.ones(embeds.shape[:2], dtype=torch.long, device=device))
        else:
            embeds, mask = pipe.encode_prompt(list(batch.prompts), b)
        prepared.append(PreparedBatch(latents, batch.hq.to(device) * 2 - 1, embeds, mask))
    return prepared


def _null_prompt(pipe, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if pipe.text_encoder is not None and pipe.tokenizer is not None:
        return pipe.encode_prompt([""] * batch_size, batch_size)
    if pipe.default_prompt is not None and pipe.default_prompt.config.prompt == "":
        return pipe.encode_prompt(None, batch_size)
    raise ValueError("null-prompt importance needs a text encoder or a stored default prompt of \"\"")
