"""Shared fixtures: the tiny preset with a non-trivial LoRA adapter, and real photos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
os.environ.setdefault("WANDB_MODE", "offline")

ASSETS = Path(__file__).resolve().parents[1] / "sana_sr" / "assets"
PHOTOS = sorted((ASSETS / "photos").iterdir())


def load_photo(name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A bundled photo as a (1, 3, H, W) tensor in [0, 1], optionally resized (bicubic, antialiased)."""
    with Image.open(ASSETS / "photos" / name) as im:
        im = im.convert("RGB")
        if size is not None:
            im = im.resize(size, Image.Resampling.BICUBIC)
        array = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def randomize_lora(transformer: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give the adapter non-zero B matrices: a fresh LoRA (B = 0) is a no-op and would prove nothing."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * std


@pytest.fixture(scope="session")
def tiny_pipe():
    from sana_sr import LoraSettings, build_pipeline

    pipe = build_pipeline("tiny", lora=LoraSettings(rank=4))
    randomize_lora(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def lq_photo() -> torch.Tensor:
    """A 32x48 low-quality crop of a real photo."""
    return load_photo("chelsea.png", size=(48, 32))
