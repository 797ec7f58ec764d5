"""NIQE (Mittal et al., "Making a completely blind image quality analyzer", 2013), offline.

Follows the authors' MATLAB release (and its Python ports in BasicSR and pyiqa): the image is turned to grey
(BT.601 luma 0.299/0.587/0.114, i.e. MATLAB's `rgb2gray` and pyiqa's default "YIQ" Y) and rounded to integer
levels, cropped to whole 96x96 blocks, and at two scales (the second from MATLAB's antialiased bicubic `imresize`
by 0.5) each block gives 18 features of its MSCN coefficients (an asymmetric generalised Gaussian fit to them and to
the products of horizontally, vertically and diagonally adjacent ones). The score is the Mahalanobis-like distance
between the Gaussian fitted to the image's block features and the pristine model shipped in
`assets/metrics/niqe_pris_params.npz`. Lower is better. Needs at least two 96x96 blocks.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.ndimage import convolve
from scipy.special import gamma

BLOCK = 96
GRAY_COEFFS = (0.299, 0.587, 0.114)


def params_path() -> Path:
    return Path(str(resources.files("sana_sr") / "assets" / "metrics" / "niqe_pris_params.npz"))


@lru_cache(maxsize=1)
def _pristine() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(params_path()) as p:
        return p["mu_pris_param"][0].copy(), p["cov_pris_param"].copy(), p["gaussian_window"].copy()


# -- MATLAB imresize (bicubic, antialiased when shrinking) -------------------------------------------------
def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's `cubic`)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))


def _contributions(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(weights, 0-based source indices), each (out_len, taps), as MATLAB's `contributions`."""
    shrinking = scale < 1
    width = 4.0 / scale if shrinking else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    # Output pixel centres mapped into input coordinates (1-based, pixel centres at integers).
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(np.ceil(width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    distance = u[:, None] - indices
    weights = scale * _cubic(scale * distance) if shrinking else _cubic(distance)
    weights = weights / weights.sum(axis=1, keepdims=True)
    keep = np.any(weights != 0, axis=0)
    weights, indices = weights[:, keep], indices[:, keep]
    # Out-of-range taps mirror back into the image (MATLAB: symmetric padding).
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    return weights, mirror[np.mod(indices - 1, 2 * in_len).astype(np.int64)]


def imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB `imresize(image, scale)` (bicubic, antialiasing on) of a 2-D float array; output ceil(size * scale)."""
    if image.ndim != 2:
        raise ValueError(f"imresize expects a 2-D array, got shape {image.shape}")
    out = image.astype(np.float64)
    # MATLAB resizes along rows first when both scales are equal.
    for axis in (0, 1):
        in_len = out.shape[axis]
        weights, idx = _contributions(in_len, int(np.ceil(in_len * scale)), scale)
        moved = np.moveaxis(out, axis, 0)
        resized = np.einsum("ot,ot...->o...", weights, moved[idx])
        out = np.moveaxis(resized, 0, axis)
    return out


# -- the NIQE features ----------------------------------------------------------------------------------------
_GAMMA_GRID = np.arange(0.2, 10.0005, 0.001)
_R_GAMMA = gamma(2 / _GAMMA_GRID) ** 2 / (gamma(1 / _GAMMA_GRID) * gamma(3 / _GAMMA_GRID))


def aggd_fit(values: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching on MATLAB's grid: (alpha, beta_left, beta_right)."""
    v = values.ravel()
    left = np.sqrt(np.mean(v[v < 0] ** 2))
    right = np.sqrt(np.mean(v[v > 0] ** 2))
    gamma_hat = left / right
    r_hat = np.mean(np.abs(v)) ** 2 / np.mean(v**2)
    r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    alpha = float(_GAMMA_GRID[np.argmin((_R_GAMMA - r_hat_norm) ** 2)])
    factor = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, float(left * factor), float(right * factor)


def block_features(mscn: np.ndarray) -> list[float]:
    """The 18 features of one block of MSCN coefficients."""
    alpha, bl, br = aggd_fit(mscn)
    features = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, bl, br = aggd_fit(mscn * np.roll(mscn, shift, axis=(0, 1)))
        mean = (br - bl) * gamma(2 / alpha) / gamma(1 / alpha)
        features += [alpha, mean, bl, br]
    return features


def _mscn(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    mu = convolve(image, window, mode="nearest")
    sigma = np.sqrt(np.abs(convolve(image * image, window, mode="nearest") - mu * mu))
    return (image - mu) / (sigma + 1)


def niqe_gray(image: np.ndarray) -> float:
    """NIQE of a grey image (H, W) with values in [0, 255] (use integer levels for MATLAB-identical numbers)."""
    mu_pris, cov_pris, window = _pristine()
    rows, cols = image.shape[0] // BLOCK, image.shape[1] // BLOCK
    if rows * cols < 2:
        raise ValueError(
            f"NIQE needs at least two {BLOCK}x{BLOCK} blocks; the image is {image.shape[1]}x{image.shape[0]}"
        )
    current = image[: rows * BLOCK, : cols * BLOCK].astype(np.float64)
    per_scale = []
    # Blocks whose coefficients have no negative (or no positive) values give NaN features, as in MATLAB;
    # they are left out of the fit below (nanmean / nancov), so the warnings about them are noise.
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for scale in (1, 2):
            mscn = _mscn(current, window)
            size = BLOCK // scale
            per_scale.append([
                block_features(mscn[r * size:(r + 1) * size, c * size:(c + 1) * size])
                for c in range(cols) for r in range(rows)
            ])
            if scale == 1:
                current = imresize(current / 255.0, 0.5) * 255.0
        features = np.concatenate([np.asarray(f) for f in per_scale], axis=1)
        finite = features[~np.isnan(features).any(axis=1)]
        if len(finite) < 2:
            raise ValueError(
                f"NIQE is undefined for this image: {len(finite)} of {len(features)} blocks have finite features "
                "(flat or degenerate content)"
            )
        mu = np.nanmean(features, axis=0)
        cov = np.cov(finite, rowvar=False)
    delta = mu_pris - mu
    return float(np.sqrt(delta @ np.linalg.pinv((cov_pris + cov) / 2) @ delta))


def rgb_to_gray_levels(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] -> BT.601 grey rounded to integer levels in [0, 255] (float64)."""
    rgb = rgb.astype(np.float64) * 255.0
    gray = rgb[..., 0] * GRAY_COEFFS[0] + rgb[..., 1] * GRAY_COEFFS[1] + rgb[..., 2] * GRAY_COEFFS[2]
    return np.round(gray)


def niqe(rgb: np.ndarray) -> float:
    """NIQE of an RGB image (H, W, 3) in [0, 1]. Lower is better."""
    return niqe_gray(rgb_to_gray_levels(rgb))
