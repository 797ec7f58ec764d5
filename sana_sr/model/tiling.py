"""Tiled application of a latent-to-latent function, with overlapping tiles blended by a Gaussian window.

The DiT's linear attention is global, so a tile sees less context than the whole image; overlap plus a smooth
window (weights that fall to ~0 at tile borders) hides the seams that a hard cut would leave.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class TileSettings:
    """Tile sizes in output pixels; the code converts them to latent units with the AE's compression ratio."""

    tile: int = 1024
    """Side of a DiT tile. Images whose output side is at most this run untiled through the DiT."""
    overlap: int = 256
    """Overlap between neighbouring DiT tiles."""
    ae_tile: int = 512
    """Side of a DC-AE encode/decode tile (diffusers' AE tiling)."""
    ae_overlap: int = 64
    """Overlap between neighbouring AE tiles."""

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile overlap must be in [0, tile={self.tile}), got {self.overlap}")
        if not 0 <= self.ae_overlap < self.ae_tile:
            raise ValueError(f"AE tile overlap must be in [0, ae_tile={self.ae_tile}), got {self.ae_overlap}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets that cover [0, length) with tiles of `tile`, the last one flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def gaussian_window(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Separable Gaussian weights with sigma = side/4 (MultiDiffusion/StableSR use the same shape)."""

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, device=device, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (0.25 * n)) ** 2)

    return (axis(height)[:, None] * axis(width)[None, :]).to(dtype)


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, tile: int, overlap: int
) -> torch.Tensor:
    """Apply `fn` (shape-preserving on (B, C, h, w)) tile by tile and blend; one call when the input fits a tile."""
    _, _, height, width = latents.shape
    if height <= tile and width <= tile:
        return fn(latents)
    out = None
    weight_sum = torch.zeros(1, 1, height, width, device=latents.device, dtype=torch.float32)
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            patch = latents[:, :, top : top + tile, left : left + tile]
            result = fn(patch).float()
            if out is None:
                out = torch.zeros(latents.shape[0], result.shape[1], height, width, device=latents.device)
            w = gaussian_window(patch.shape[2], patch.shape[3], latents.device, torch.float32)
            out[:, :, top : top + tile, left : left + tile] += result * w
            weight_sum[:, :, top : top + tile, left : left + tile] += w
    return (out / weight_sum).to(latents.dtype)
