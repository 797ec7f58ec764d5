"""NIQE (Mittal et al., "Making a completely blind image quality analyzer", 2013), offline.

The published convention is BasicSR's `calculate_niqe` (which matches the authors' MATLAB release to 1e-4 on its
reference image): the image is reduced to one channel and rounded to integer levels, cropped to whole 96x96 blocks,
and at two scales (the second from MATLAB's antialiased bicubic `imresize` by 0.5) each block gives 18 features of
its MSCN coefficients (an asymmetric generalised Gaussian fit to them and to the products of horizontally,
vertically and diagonally adjacent ones). The score is the Mahalanobis-like distance between the Gaussian fitted to
the image's block features and the pristine model in `assets/metrics/niqe_pris_params.npz`. Lower is better. Needs at
least two 96x96 blocks.

Two channels, named in the metric: `niqe` is the Y of YCbCr (MATLAB `rgb2ycbcr`, BasicSR's default), `niqe_gray`
the BT.601 grey 0.299/0.587/0.114 (BasicSR's `convert_to="gray"`; the same weights as pyiqa's default "YIQ" Y).

The arithmetic is float32 where BasicSR's is, on purpose: in a flat area the local mean then rounds back to the
pixel value and the MSCN coefficient is exactly 0, as in exact arithmetic, and a 0 counts on neither side of the
AGGD fit. In float64 the 7x7 window's sum (1 - 1e-16) leaves +-1e-14 residues that count as samples: on Set5's
`head` (280x280, a flat dark background) that moved NIQE by 0.37.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.ndimage import convolve
from scipy.special import gamma

BLOCK = 96
CHANNELS = ("y", "gray")
"""What NIQE sees of a colour image: the Y of YCbCr (MATLAB `rgb2ycbcr`) or the BT.601 grey (MATLAB `rgb2gray`)."""
Y_COEFFS_BGR = (24.966, 128.553, 65.481)  # MATLAB rgb2ycbcr's Y row, in B, G, R order (R, G, B in [0, 1])


def params_path() -> Path:
    return Path(str(resources.files("sana_sr") / "assets" / "metrics" / "niqe_pris_params.npz"))


@lru_cache(maxsize=1)
def _pristine() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(params_path()) as p:
        return p["mu_pris_param"][0].copy(), p["cov_pris_param"].copy(), p["gaussian_window"].copy()


# -- MATLAB imresize (bicubic, antialiased when shrinking), in float32 ------------------------------------
# The second NIQE scale is read from this resize. Flat areas of its output keep float32 rounding residue whose exact
# pattern decides the MSCN coefficients there (see the module docstring), so the arithmetic is laid out as BasicSR's
# port lays it out: float32 weights, one matrix-vector product per output line, over a symmetrically padded copy.
def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's `cubic`)."""
    ax = x.abs()
    ax2, ax3 = ax**2, ax**3
    near = (ax <= 1).to(x.dtype)
    far = ((ax > 1) & (ax <= 2)).to(x.dtype)
    return (1.5 * ax3 - 2.5 * ax2 + 1) * near + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * far


def _contributions(out_len: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, 1-based source indices, unbounded), each (out_len, taps), as MATLAB's `contributions`."""
    shrinking = scale < 1
    width = 4.0 / scale if shrinking else 4.0
    # Output pixel centres mapped into input coordinates (1-based, pixel centres at integers).
    u = torch.linspace(1, out_len, out_len) / scale + 0.5 * (1 - 1 / scale)
    taps = math.ceil(width) + 2
    indices = torch.floor(u - width / 2)[:, None] + torch.linspace(0, taps - 1, taps)[None, :]
    distance = u[:, None] - indices
    weights = scale * _cubic(distance * scale) if shrinking else _cubic(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)
    keep = (weights != 0).any(dim=0)
    return weights[:, keep].contiguous(), indices[:, keep].long()


def imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB `imresize(image, scale)` (bicubic, antialiased when shrinking) of a 2-D array, computed in float32;
    output ceil(size * scale)."""
    if image.ndim != 2:
        raise ValueError(f"imresize expects a 2-D array, got shape {image.shape}")
    out = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    # MATLAB resizes along rows first when both scales are equal.
    for axis in (0, 1):
        in_len = out.shape[axis]
        weights, indices = _contributions(math.ceil(in_len * scale), scale)
        before, after = max(0, 1 - int(indices.min())), max(0, int(indices.max()) - in_len)
        if before > in_len or after > in_len:
            raise ValueError(f"imresize: a side of {in_len} pixels is too short for scale {scale}")
        lines = out.movedim(axis, 0)
        # Out-of-range taps read the image mirrored at its edge (MATLAB: symmetric padding).
        padded = torch.cat([lines[:before].flip(0), lines, lines[in_len - after:].flip(0)]).movedim(0, axis)
        padded = padded.contiguous()
        taps = weights.shape[1]
        starts = (indices[:, 0] - 1 + before).tolist()
        if axis == 0:
            resized = [padded[s:s + taps, :].T.mv(w) for s, w in zip(starts, weights)]
        else:
            resized = [padded[:, s:s + taps].mv(w) for s, w in zip(starts, weights)]
        out = torch.stack(resized, dim=axis)
    return out.numpy()


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
    # scipy keeps the input's dtype: float32 in, float32 local mean and deviation out (see the module docstring).
    mu = convolve(image, window, mode="nearest")
    sigma = np.sqrt(np.abs(convolve(image * image, window, mode="nearest") - mu * mu))
    return (image - mu) / (sigma + 1)


def niqe_levels(levels: np.ndarray) -> float:
    """NIQE of one channel (H, W) of integer levels in [0, 255], e.g. from `luma_levels`."""
    if levels.ndim != 2:
        raise ValueError(f"NIQE expects one channel (H, W), got shape {levels.shape}")
    mu_pris, cov_pris, window = _pristine()
    rows, cols = levels.shape[0] // BLOCK, levels.shape[1] // BLOCK
    if rows * cols < 2:
        raise ValueError(
            f"NIQE needs at least two {BLOCK}x{BLOCK} blocks; the image is {levels.shape[1]}x{levels.shape[0]}"
        )
    current = levels[: rows * BLOCK, : cols * BLOCK].astype(np.float32)
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
                current = imresize(current / np.float32(255.0), 0.5) * np.float32(255.0)
        features = np.concatenate([np.asarray(f, dtype=np.float64) for f in per_scale], axis=1)
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


def luma_levels(rgb: np.ndarray, channel: str = "y") -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] -> the channel NIQE reads, rounded to integer levels in [0, 255] (float32).

    Rounded from float32 values computed as BasicSR computes them, so that a level that lies within float32's error
    of a .5 rounds the same way.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    if channel not in CHANNELS:
        raise ValueError(f"NIQE channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
    bgr = (rgb[..., ::-1].astype(np.float64) * 255.0).astype(np.float32) / np.float32(255.0)
    if channel == "y":
        y = np.dot(bgr, np.asarray(Y_COEFFS_BGR)) + 16.0  # float64, then stored as float32 in [0, 1]
        out = (y / 255.0).astype(np.float32) * np.float32(255.0)
    else:
        out = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2GRAY) * np.float32(255.0)
    return np.round(out)


def niqe(rgb: np.ndarray, channel: str = "y") -> float:
    """NIQE of an RGB image (H, W, 3) in [0, 1] on `channel` ("y": `niqe`, "gray": `niqe_gray`). Lower is better."""
    return niqe_levels(luma_levels(rgb, channel))
