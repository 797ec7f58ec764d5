"""PSNR and SSIM on the Y channel, the way the super-resolution literature reports them.

- Y is MATLAB's `rgb2ycbcr` luma (ITU-R BT.601, "studio swing"): Y = 16 + 65.481 R + 128.553 G + 24.966 B with
  R, G, B in [0, 1], so Y lies in [16, 235]. It is kept as a float (not rounded to 8 bits), as BasicSR and pyiqa do.
- `crop_border` pixels are removed on every side first (the convention: the scale factor).
- SSIM is Wang et al.'s: an 11x11 Gaussian window with sigma 1.5, "valid" filtering (no padding), constants
  K1 = 0.01, K2 = 0.03 on the data range 255, float64 throughout.

The images given here are RGB arrays (H, W, 3) in [0, 1]; the evaluation quantises its outputs to 8-bit levels
first (`to_8bit_levels`), so that the numbers are those of the PNG files it writes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# MATLAB rgb2ycbcr, first row of its matrix and offset (R, G, B in [0, 1] -> Y in [16, 235]).
Y_COEFFS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def to_8bit_levels(rgb: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round to the 256 levels an 8-bit file stores (float64)."""
    return np.round(np.clip(rgb.astype(np.float64), 0.0, 1.0) * 255.0) / 255.0


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] -> (H, W) float64 Y in [16, 235] (MATLAB rgb2ycbcr, unrounded)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    rgb = rgb.astype(np.float64)
    return Y_OFFSET + rgb[..., 0] * Y_COEFFS[0] + rgb[..., 1] * Y_COEFFS[1] + rgb[..., 2] * Y_COEFFS[2]


def _crop(a: np.ndarray, border: int) -> np.ndarray:
    if border < 0:
        raise ValueError(f"crop border must be >= 0, got {border}")
    if border == 0:
        return a
    if a.shape[0] <= 2 * border or a.shape[1] <= 2 * border:
        raise ValueError(f"image {a.shape[1]}x{a.shape[0]} is too small for a crop border of {border}")
    return a[border:-border, border:-border]


def _check_pair(sr: np.ndarray, hr: np.ndarray) -> None:
    if sr.shape != hr.shape:
        raise ValueError(f"SR {sr.shape} and HR {hr.shape} differ in shape")


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop_border: int = 0) -> float:
    """PSNR (dB) between the Y channels of two RGB images in [0, 1]; inf when they are identical."""
    _check_pair(sr, hr)
    a, b = _crop(rgb_to_y(sr), crop_border), _crop(rgb_to_y(hr), crop_border)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(DATA_RANGE**2 / mse)


def gaussian_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian; the 2-D SSIM window is its outer product with itself."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int = 0) -> float:
    """SSIM between the Y channels of two RGB images in [0, 1] (mean of the SSIM map over valid positions)."""
    _check_pair(sr, hr)
    a, b = _crop(rgb_to_y(sr), crop_border), _crop(rgb_to_y(hr), crop_border)
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"image {a.shape[1]}x{a.shape[0]} (after cropping) is smaller than the SSIM window {SSIM_WINDOW}")
    g = torch.from_numpy(gaussian_1d())

    def blur(x: torch.Tensor) -> torch.Tensor:
        # "valid" 11x11 Gaussian filtering as two 1-D passes (the window is separable; 6x faster in float64).
        return F.conv2d(F.conv2d(x[None, None], g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))[0, 0]

    a, b = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))

    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())
