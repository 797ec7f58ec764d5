"""Blur and sinc kernels against their formulas, and their per-sample draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from sana_sr.data.degradation_config import DegradationConfig
from sana_sr.data.kernels import (
    draw_kernels,
    gaussian_kernel,
    generalized_gaussian_kernel,
    mesh,
    plateau_kernel,
    random_mixed_kernel,
    sinc_kernel,
)


def _reference(size, sigma_x, sigma_y, theta, profile):
    """The formula written independently: covariance R diag(sx^2, sy^2) R^T, q = d^T C^-1 d, k = profile(q)."""
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    inv = np.linalg.inv(rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T)
    xx, yy = mesh(size)
    d = np.stack([xx, yy], -1)
    q = np.einsum("...i,ij,...j->...", d, inv, d)
    k = profile(q)
    return k / k.sum()


@pytest.mark.parametrize("sx, sy, theta", [(1.5, 1.5, 0.0), (3.0, 0.8, 0.4), (0.5, 2.5, -2.0)])
def test_kernels_match_their_formulas(sx, sy, theta):
    ref = _reference(21, sx, sy, theta, lambda q: np.exp(-0.5 * q))
    np.testing.assert_allclose(gaussian_kernel(21, sx, sy, theta), ref, atol=1e-12)
    for beta in (0.5, 1.0, 2.7):
        ref = _reference(21, sx, sy, theta, lambda q, b=beta: np.exp(-0.5 * q**b))
        np.testing.assert_allclose(generalized_gaussian_kernel(21, sx, sy, theta, beta), ref, atol=1e-12)
        ref = _reference(21, sx, sy, theta, lambda q, b=beta: 1 / (1 + q**b))
        np.testing.assert_allclose(plateau_kernel(21, sx, sy, theta, beta), ref, atol=1e-12)


def test_every_drawn_kernel_is_normalised_and_point_symmetric():
    config = DegradationConfig()
    rng = np.random.default_rng(0)
    for _ in range(300):
        for name, k in draw_kernels(rng, config).items():
            assert k.shape == (21, 21) and k.dtype == np.float32 and np.isfinite(k).all(), name
            assert abs(float(k.sum()) - 1) < 1e-5, name
            # Every kernel of the model is centrally symmetric (a Gaussian-like form of d, or a radial sinc).
            np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-6, err_msg=name)


def test_isotropic_kernels_are_mirror_and_rotation_symmetric():
    for k in (gaussian_kernel(15, 2.0), generalized_gaussian_kernel(15, 2.0, None, 0.0, 3.0),
              plateau_kernel(15, 2.0, None, 0.0, 1.5), sinc_kernel(15, 1.3)):  # fmt: skip
        for variant in (k.T, k[::-1], k[:, ::-1], np.rot90(k)):
            np.testing.assert_allclose(variant, k, atol=1e-12)


@pytest.mark.parametrize("theta", [0.0, math.pi / 6, math.pi / 2, -1.0, 2.5])
def test_anisotropic_orientation(theta):
    """The long axis points at theta from +x (columns) towards +y (rows); variances are sigma_x^2, sigma_y^2."""
    sx, sy = 4.0, 1.0
    k = gaussian_kernel(61, sx, sy, theta)  # large enough that truncation does not bias the moments
    xx, yy = mesh(61)
    cov = np.array([[np.sum(k * xx * xx), np.sum(k * xx * yy)], [np.sum(k * xx * yy), np.sum(k * yy * yy)]])
    values, vectors = np.linalg.eigh(cov)
    np.testing.assert_allclose(values, [sy**2, sx**2], rtol=1e-3)
    long_axis = vectors[:, 1]
    angle = math.atan2(long_axis[1], long_axis[0])
    assert abs(math.remainder(angle - theta, math.pi)) < 1e-3
    if theta == math.pi / 2:  # spread along the rows (image height)
        assert np.sum(k * yy * yy) > 10 * np.sum(k * xx * xx)


def test_generalized_and_plateau_shapes():
    sigma = 3.0
    centre = 10
    gauss = gaussian_kernel(21, sigma)
    flat = generalized_gaussian_kernel(21, sigma, None, 0.0, 2.0)
    peaky = generalized_gaussian_kernel(21, sigma, None, 0.0, 0.5)
    plateau = plateau_kernel(21, sigma, None, 0.0, 2.0)

    def ratio(k, r):
        return k[centre, centre + r] / k[centre, centre]

    # beta = 1 is the Gaussian; at r = sigma (q = 1) every generalized Gaussian is at exp(-1/2) of its peak.
    np.testing.assert_allclose(generalized_gaussian_kernel(21, sigma, None, 0.0, 1.0), gauss, atol=1e-12)
    for k in (gauss, flat, peaky):
        assert ratio(k, 3) == pytest.approx(math.exp(-0.5))
    # beta > 1: flatter top and a faster fall; beta < 1: a sharper peak and heavier tails.
    assert ratio(flat, 1) > ratio(gauss, 1) > ratio(peaky, 1)
    assert ratio(flat, 6) < ratio(gauss, 6) < ratio(peaky, 6)
    # plateau: half height at q = 1, and a polynomial tail 1 / (1 + q^beta) above the Gaussian's exp(-q / 2).
    assert ratio(plateau, 3) == pytest.approx(0.5)
    assert ratio(plateau, 9) == pytest.approx(1 / (1 + 9.0**2))
    assert ratio(plateau, 10) > 2 * ratio(gauss, 10)
    assert ratio(plateau_kernel(21, sigma, None, 0.0, 1.0), 9) > 5 * ratio(gauss, 9)


def test_sinc_kernel_formula_and_low_pass_response():
    cutoff = math.pi / 2
    k = sinc_kernel(21, cutoff)
    xx, yy = mesh(21)
    r = np.hypot(xx, yy)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = cutoff * special.j1(cutoff * r) / (2 * math.pi * r)
    ref[10, 10] = cutoff * special.j1(cutoff * 1e-8) / (2 * math.pi * 1e-8)  # the r -> 0 limit
    np.testing.assert_allclose(k, ref / ref.sum(), rtol=1e-6)
    assert (k < 0).any()  # ringing lobes: what the sinc kernel is there to simulate
    response = np.abs(np.fft.fft2(np.pad(k, 100)))
    freqs = np.fft.fftfreq(response.shape[0]) * 2 * math.pi
    radius = np.hypot(*np.meshgrid(freqs, freqs))
    assert response[radius < 0.6 * cutoff].min() > 0.85
    assert response[radius > 1.6 * cutoff].max() < 0.15
    assert sinc_kernel(9, 2.0, pad_to=21).shape == (21, 21)


def test_draws_follow_the_configured_probabilities_and_sizes():
    config = DegradationConfig()
    rng = np.random.default_rng(1)
    draws = [draw_kernels(rng, config) for _ in range(1000)]
    pulses = sum(1 for d in draws if d["sinc_kernel"][10, 10] == 1.0)
    # final_sinc_prob 0.8: 200 pulses expected, sd 12.6; the bounds are ~4 sd.
    assert 150 < pulses < 250
    for d in draws[:200]:
        support = np.nonzero(d["kernel1"].any(0))[0]
        width = support[-1] - support[0] + 1
        assert width % 2 == 1 and 7 <= width <= 21 or width < 7  # a tiny sigma can underflow the outer taps


def test_draws_are_reproducible_from_the_seed():
    config = DegradationConfig()
    a = [draw_kernels(np.random.default_rng(7), config) for _ in range(3)]
    b = [draw_kernels(np.random.default_rng(7), config) for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])
    c = draw_kernels(np.random.default_rng(8), config)
    assert not np.array_equal(a[0]["kernel1"], c["kernel1"])


def test_unknown_kernel_type_and_bad_config_are_clear():
    with pytest.raises(ValueError, match="unknown kernel type 'box'"):
        random_mixed_kernel(np.random.default_rng(0), 7, ("box",), (1.0,), (1, 2), (0.5, 4), (1, 2))
    with pytest.raises(ValueError, match="kernel_prob needs 6 probabilities summing to 1"):
        DegradationConfig(kernel_prob=(0.5, 0.5, 0.0, 0.0, 0.0, 0.1))
    with pytest.raises(ValueError, match="blur_kernel_size must be odd"):
        DegradationConfig(blur_kernel_size=20)
