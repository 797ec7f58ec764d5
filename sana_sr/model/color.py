"""Colour correction of a restored image towards its (bicubic-upsampled) input, as StableSR and OSEDiff do.

- `adain`: match each channel's mean and standard deviation to the reference.
- `wavelet`: keep the restored image's high frequencies and take the low frequencies from the reference; the
  frequency split is a five-level "a trous" wavelet (a 3x3 binomial blur at dilations 1, 2, 4, 8, 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("none", "adain", "wavelet")


def adain(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-image, per-channel mean/std of `image` (B, C, H, W) set to those of `reference` (same shape)."""
    mean, std = image.mean((2, 3), keepdim=True), image.std((2, 3), keepdim=True)
    ref_mean, ref_std = reference.mean((2, 3), keepdim=True), reference.std((2, 3), keepdim=True)
    return (image - mean) / (std + eps) * ref_std + ref_mean


def _binomial_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0], device=image.device, dtype=image.dtype)
    kernel = (kernel[:, None] * kernel[None, :]) / 16
    channels = image.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=dilation)


def wavelet_low_frequency(image: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The residual low-pass band after `levels` a-trous wavelet levels."""
    low = image
    for level in range(levels):
        low = _binomial_blur(low, 2**level)
    return low


def wavelet(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """High frequencies of `image` plus low frequencies of `reference`."""
    return image - wavelet_low_frequency(image, levels) + wavelet_low_frequency(reference, levels)


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, method: str | None) -> torch.Tensor:
    """Dispatch on `method` (one of COLOR_FIXES or None) and clamp the result to [0, 1]."""
    if method in (None, "none"):
        return image
    if method == "adain":
        return adain(image, reference).clamp(0, 1)
    if method == "wavelet":
        return wavelet(image, reference).clamp(0, 1)
    raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOR_FIXES)}")
