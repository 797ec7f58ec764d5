"""The metric suite: PSNR/SSIM against scikit-image on real photos, NIQE's pieces against independent references,
and the learned metrics reported as unavailable (never as numbers) when pyiqa or its weights are missing."""

from __future__ import annotations

import hashlib
import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sana_sr.evaluation.metrics import MetricSuite, learned, parse_metrics, psnr_y, rgb_to_y, ssim_y, to_8bit_levels
from sana_sr.evaluation.metrics.niqe import aggd_fit, imresize, niqe, params_path

from .conftest import PHOTOS


def _rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def _degradations(im: Image.Image, seed: int) -> dict[str, np.ndarray]:
    """Synthetic degradations of a real photo, each returned at the photo's size on 8-bit levels."""
    rng = np.random.default_rng(seed)
    w, h = im.size
    jpeg = io.BytesIO()
    im.save(jpeg, format="JPEG", quality=30)
    noisy = _rgb(im) + rng.normal(0, 10 / 255, (h, w, 3))
    return {
        "bicubic x4": _rgb(im.resize((w // 4, h // 4), Image.Resampling.BICUBIC).resize((w, h), Image.Resampling.BICUBIC)),
        "gaussian blur": _rgb(im.filter(ImageFilter.GaussianBlur(1.5))),
        "noise": to_8bit_levels(noisy),
        "jpeg q30": _rgb(Image.open(jpeg)),
    }


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.name)
@pytest.mark.slow
def test_psnr_ssim_match_scikit_image_on_degraded_photos(photo):
    with Image.open(photo) as im:
        im = im.convert("RGB")
        # Crop to a multiple of 4 so that the bicubic round trip keeps the size.
        im = im.crop((0, 0, im.width // 4 * 4, im.height // 4 * 4))
        hr = _rgb(im)
        degraded = _degradations(im, seed=len(photo.name))
    border = 4
    y_hr = rgb_to_y(hr)[border:-border, border:-border]
    for name, sr in degraded.items():
        y_sr = rgb_to_y(sr)[border:-border, border:-border]
        expected_psnr = peak_signal_noise_ratio(y_hr, y_sr, data_range=255)
        # Wang et al.'s SSIM as scikit-image documents it: Gaussian window, sigma 1.5, population covariance.
        expected_ssim = structural_similarity(
            y_hr, y_sr, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert abs(psnr_y(sr, hr, border) - expected_psnr) < 1e-4, name
        assert abs(ssim_y(sr, hr, border) - expected_ssim) < 1e-5, name
        assert 10 < expected_psnr < 45 and 0.2 < expected_ssim < 1, (name, expected_psnr, expected_ssim)


def test_y_channel_is_matlab_rgb2ycbcr():
    """Same as scikit-image's BT.601 rgb2ycbcr (MATLAB's matrix) on a real photo, and the studio-swing limits."""
    with Image.open(PHOTOS[0]) as im:
        rgb = _rgb(im)
    assert np.abs(rgb_to_y(rgb) - rgb2ycbcr(rgb)[..., 0]).max() < 1e-9
    assert rgb_to_y(np.zeros((1, 1, 3)))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(np.ones((1, 1, 3)))[0, 0] == pytest.approx(235.0)


def test_psnr_ssim_edge_cases():
    rng = np.random.default_rng(0)
    img = to_8bit_levels(rng.random((32, 40, 3)))
    assert psnr_y(img, img, 4) == float("inf")
    assert ssim_y(img, img, 4) == pytest.approx(1.0)
    # A uniform Y offset of d gives exactly 10 log10(255^2 / d^2).
    shifted = img + 2 / 255
    d = rgb_to_y(shifted) - rgb_to_y(img)
    assert psnr_y(shifted, img) == pytest.approx(10 * np.log10(255**2 / np.mean(d**2)), abs=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_y(img, img[:-1])
    with pytest.raises(ValueError, match="too small"):
        psnr_y(img[:8, :8], img[:8, :8], 4)


def test_imresize_matches_an_independent_antialiased_bicubic_inside_the_image():
    """Pillow's BICUBIC is the same a=-0.5 kernel, widened when shrinking; only the border handling differs."""
    rng = np.random.default_rng(1)
    image = rng.random((64, 80)) * 255
    for scale, size in ((0.5, (40, 32)), (2.0, (160, 128))):
        ours = imresize(image, scale)
        pil = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize(size, Image.Resampling.BICUBIC))
        assert ours.shape == pil.shape[:2]
        assert np.abs(ours - pil)[4:-4, 4:-4].max() < 1e-3  # Pillow computes in float32
    # The cubic kernel reproduces linear functions: output pixel i samples the input at 2i + 0.5 (0-based).
    ramp = np.add.outer(np.arange(64.0), 2 * np.arange(80.0))
    i, j = np.meshgrid(np.arange(32.0), np.arange(40.0), indexing="ij")
    assert np.abs(imresize(ramp, 0.5) - ((2 * i + 0.5) + 2 * (2 * j + 0.5)))[3:-3, 3:-3].max() < 1e-9
    assert np.allclose(imresize(np.full((20, 30), 7.0), 0.5), 7.0)


def test_aggd_fit_recovers_the_shape_of_generalized_gaussian_samples():
    for alpha in (0.8, 1.0, 2.0, 3.0):
        samples = stats.gennorm.rvs(alpha, size=200_000, random_state=np.random.default_rng(int(alpha * 10)))
        fitted, left, right = aggd_fit(samples)
        assert fitted == pytest.approx(alpha, rel=0.05)
        assert left == pytest.approx(right, rel=0.03)


def test_niqe_params_are_the_shipped_basicsr_file():
    assert hashlib.sha256(params_path().read_bytes()).hexdigest().startswith("2a7c182a68c9e7f1")


@pytest.mark.slow
def test_niqe_rises_with_degradation_on_real_photos():
    rng = np.random.default_rng(2)
    for photo in PHOTOS:
        with Image.open(photo) as im:
            im = im.convert("RGB")
            clean = niqe(_rgb(im))
            blurred = niqe(_rgb(im.filter(ImageFilter.GaussianBlur(2.0))))
            noisy = niqe(to_8bit_levels(_rgb(im) + rng.normal(0, 20 / 255, (im.height, im.width, 3))))
        assert 1.5 < clean < 8, (photo.name, clean)
        assert blurred > clean + 1 and noisy > clean + 1, (photo.name, clean, blurred, noisy)
    with pytest.raises(ValueError, match="two 96x96 blocks"):
        niqe(np.zeros((100, 100, 3)))


def test_parse_metrics():
    assert parse_metrics("all") == parse_metrics(["psnr", "ssim", "lpips", "dists", "niqe", "niqe_gray", "musiq",
                                                  "maniqa", "clipiqa", "fid"])
    assert parse_metrics("niqe, PSNR") == ("psnr", "niqe")
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metrics("psnr,brisque")


def test_learned_metrics_unavailable_without_pyiqa(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import pyiqa -> ImportError, whether installed or not
    suite = MetricSuite(parse_metrics("all"), torch.device("cpu"), has_reference=True, crop_border=4)
    assert suite.available == ["psnr", "ssim", "niqe", "niqe_gray"]
    assert set(suite.unavailable) == {"lpips", "dists", "musiq", "maniqa", "clipiqa", "fid"}
    assert all("pyiqa is not installed" in reason for reason in suite.unavailable.values())
    values, problems = suite.score(np.full((200, 200, 3), 0.5), np.full((200, 200, 3), 0.5))
    assert set(values) == {"psnr", "ssim", "niqe", "niqe_gray"} and values["niqe"] is None and "niqe" in problems[0]


def test_learned_metrics_unavailable_when_weights_cannot_be_fetched(monkeypatch):
    """pyiqa present, weights absent and no network: its downloader raises, the metric is listed with the reason."""
    calls = []

    def create_metric(name, **kwargs):
        calls.append(name)
        raise OSError(f"<urlopen error [Errno 101] Network is unreachable> while fetching weights of {name}")

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    suite = MetricSuite(parse_metrics("lpips,maniqa,fid,psnr"), torch.device("cpu"), True, 4)
    assert suite.available == ["psnr"]
    assert calls == ["lpips", "maniqa-pipal"]  # MANIQA is the PIPAL model; FID loads at the end
    assert "Network is unreachable" in suite.unavailable["maniqa"] and "maniqa-pipal" in suite.unavailable["maniqa"]
    assert suite.score_sets(None, None) == {} and "fid" in suite.unavailable
    # LR-only data: the full-reference metrics are unavailable for that reason, before pyiqa is asked.
    calls.clear()
    suite = MetricSuite(parse_metrics("psnr,lpips,niqe"), torch.device("cpu"), False, 4)
    assert suite.available == ["niqe"] and calls == [] and "HR reference" in suite.unavailable["lpips"]


def test_learned_metric_scores_through_pyiqa_when_it_loads(monkeypatch):
    """With a working pyiqa the numbers come from it: FR metrics get (SR, HR), NR metrics SR only."""

    class FakeMetric:
        def __init__(self, name):
            self.name = name

        def __call__(self, *images):
            return torch.tensor(float(len(images)) + images[0].mean().item())

    monkeypatch.setattr(learned, "import_pyiqa", lambda: types.SimpleNamespace(
        create_metric=lambda name, **kw: FakeMetric(name)))
    suite = MetricSuite(parse_metrics("lpips,musiq"), torch.device("cpu"), True, 4)
    values, _ = suite.score(np.full((8, 8, 3), 0.25), np.full((8, 8, 3), 0.75))
    assert values == {"lpips": pytest.approx(2.25), "musiq": pytest.approx(1.25)}
