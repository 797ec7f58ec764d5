"""Blur and sinc kernels of Real-ESRGAN's degradation model, and their per-sample random draws.

These run on the CPU in the loader workers (numpy), one draw per sample, so that a batch carries as many different
kernels as it has samples; everything else in the degradation runs batched on the training device
(`sana_sr.data.degradation`).

Conventions (Real-ESRGAN's, which the tests pin down):
- a kernel of odd size k is sampled at integer offsets -k//2+1 .. k//2 around its centre; `x` runs along columns
  (image width), `y` along rows (image height);
- an anisotropic kernel's covariance is R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T, so its long axis (for
  sigma_x > sigma_y) points at angle theta from the +x axis towards +y (clockwise on screen, as rows grow down);
- every kernel is normalised to sum 1, and padded with zeros to `blur_kernel_size` (21) so that a batch stacks.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import numpy as np
from scipy import special

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


@functools.lru_cache(maxsize=32)
def mesh(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(xx, yy) offsets from the centre of a size x size kernel; xx varies along columns (read-only: cached, as
    every sample's draw asks for them)."""
    if size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {size}")
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    xx.flags.writeable = yy.flags.writeable = False
    return xx, yy


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """d^T C^-1 d at every kernel position, C = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T."""
    xx, yy = mesh(size)
    c, s = math.cos(theta), math.sin(theta)
    # Coordinates along the kernel's own axes: the rotation's transpose applied to (x, y).
    u = c * xx + s * yy
    v = -s * xx + c * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> np.ndarray:
    """Normalised bivariate Gaussian exp(-q/2), q the quadratic form; isotropic when sigma_y is None."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    kernel = np.exp(-0.5 * q)
    return kernel / kernel.sum()


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None, theta: float, beta: float
) -> np.ndarray:
    """Normalised generalized Gaussian exp(-q^beta / 2): beta = 1 is the Gaussian, beta > 1 flatter-topped."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    kernel = np.exp(-0.5 * np.power(q, beta))
    return kernel / kernel.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float | None, theta: float, beta: float) -> np.ndarray:
    """Normalised plateau kernel 1 / (1 + q^beta): a flat top with heavy, polynomially decaying tails."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    kernel = 1.0 / (np.power(q, beta) + 1.0)
    return kernel / kernel.sum()


def sinc_kernel(size: int, cutoff: float, pad_to: int = 0) -> np.ndarray:
    """Circularly symmetric ideal low-pass (2-D sinc, `cutoff` in radians/pixel, pi = Nyquist), normalised.

    h(r) = cutoff * J1(cutoff * r) / (2 pi r), with its limit cutoff^2 / (4 pi) at r = 0.
    """
    xx, yy = mesh(size)
    r = np.hypot(xx, yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    kernel[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
    kernel = kernel / kernel.sum()
    return pad_kernel(kernel, pad_to) if pad_to > size else kernel


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a centred odd kernel to size x size."""
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel, pad) if pad > 0 else kernel


def pulse_kernel(size: int) -> np.ndarray:
    """The identity kernel: convolving with it changes nothing."""
    kernel = np.zeros((size, size))
    kernel[size // 2, size // 2] = 1.0
    return kernel


class KernelDrawConfig(Protocol):
    """The fields of `DegradationConfig` that the kernel draws read (any object with them will do)."""

    blur_kernel_size: int
    min_kernel_size: int
    kernel_list: tuple[str, ...]
    kernel_prob: tuple[float, ...]
    sinc_prob: float
    blur_sigma: tuple[float, float]
    betag_range: tuple[float, float]
    betap_range: tuple[float, float]
    kernel_list2: tuple[str, ...]
    kernel_prob2: tuple[float, ...]
    sinc_prob2: float
    blur_sigma2: tuple[float, float]
    betag_range2: tuple[float, float]
    betap_range2: tuple[float, float]
    final_sinc_prob: float


def _draw_beta(rng: np.random.Generator, low: float, high: float) -> float:
    # Real-ESRGAN's rule: half of the draws below 1, half above (so betap in [1, 2] gives beta = 1 half the time).
    return float(rng.uniform(low, 1.0) if rng.uniform() < 0.5 else rng.uniform(1.0, high))


def random_mixed_kernel(
    rng: np.random.Generator,
    size: int,
    kernel_list: tuple[str, ...],
    kernel_prob: tuple[float, ...],
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
) -> np.ndarray:
    """One blur kernel of a type drawn with `kernel_prob`, its parameters drawn as Real-ESRGAN draws them."""
    kind = kernel_list[rng.choice(len(kernel_list), p=np.asarray(kernel_prob) / np.sum(kernel_prob))]
    sigma_x = float(rng.uniform(*sigma_range))
    if kind.endswith("aniso"):
        sigma_y, theta = float(rng.uniform(*sigma_range)), float(rng.uniform(-math.pi, math.pi))
    else:
        sigma_y, theta = sigma_x, 0.0
    if kind in ("iso", "aniso"):
        return gaussian_kernel(size, sigma_x, sigma_y, theta)
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, _draw_beta(rng, *betag_range))
    if kind.startswith("plateau"):
        return plateau_kernel(size, sigma_x, sigma_y, theta, _draw_beta(rng, *betap_range))
    raise ValueError(f"unknown kernel type {kind!r} (known: {', '.join(KERNEL_TYPES)})")


def _draw_size(rng: np.random.Generator, config: KernelDrawConfig) -> int:
    sizes = np.arange(config.min_kernel_size, config.blur_kernel_size + 1, 2)
    return int(rng.choice(sizes))


def _blur_or_sinc(rng: np.random.Generator, config: KernelDrawConfig, stage: int) -> np.ndarray:
    suffix = "" if stage == 1 else "2"
    size = _draw_size(rng, config)
    if rng.uniform() < getattr(config, "sinc_prob" + suffix):
        # Small kernels cannot represent very low cut-offs: Real-ESRGAN keeps cutoff >= pi/3 below size 13.
        cutoff = rng.uniform(math.pi / 3, math.pi) if size < 13 else rng.uniform(math.pi / 5, math.pi)
        kernel = sinc_kernel(size, float(cutoff))
    else:
        kernel = random_mixed_kernel(
            rng,
            size,
            tuple(getattr(config, "kernel_list" + suffix)),
            tuple(getattr(config, "kernel_prob" + suffix)),
            tuple(getattr(config, "blur_sigma" + suffix)),
            tuple(getattr(config, "betag_range" + suffix)),
            tuple(getattr(config, "betap_range" + suffix)),
        )
    return pad_kernel(kernel, config.blur_kernel_size)


def draw_kernels(rng: np.random.Generator, config: KernelDrawConfig) -> dict[str, np.ndarray]:
    """One sample's kernels: `kernel1` and `kernel2` (blur of each stage) and `sinc_kernel` (the final low-pass,
    or the identity with probability 1 - final_sinc_prob); float32, blur_kernel_size square."""
    kernel1 = _blur_or_sinc(rng, config, 1)
    kernel2 = _blur_or_sinc(rng, config, 2)
    if rng.uniform() < config.final_sinc_prob:
        size = _draw_size(rng, config)
        final = sinc_kernel(size, float(rng.uniform(math.pi / 3, math.pi)), pad_to=config.blur_kernel_size)
    else:
        final = pulse_kernel(config.blur_kernel_size)
    return {
        "kernel1": kernel1.astype(np.float32),
        "kernel2": kernel2.astype(np.float32),
        "sinc_kernel": final.astype(np.float32),
    }
