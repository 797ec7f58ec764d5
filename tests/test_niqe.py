"""NIQE against BasicSR's own `calculate_niqe` (the published convention), imported from ../shared/anchors/basicsr_niqe/
in this test and never copied into the project: both channels, on real and synthetic images of sizes that are not
multiples of 96, colour and grey."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from sana_sr.evaluation.metrics import MetricSuite, parse_metrics
from sana_sr.evaluation.metrics.niqe import _mscn, _pristine, luma_levels, niqe

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ANCHOR = SHARED / "anchors" / "basicsr_niqe"
DATA = SHARED / "data"
SKIMAGE = Path(skimage.data.__file__).parent

# (folder, file): colour and grey, flat backgrounds and textures, sizes from 192x192 to 512x512 (most not multiples
# of 96). Set5's head is the 280x280 image on which float64 arithmetic moved NIQE by 0.37 (see niqe.py).
IMAGES = [
    (DATA, "Set5/HR/head.png"),
    (DATA, "Set5/HR/woman.png"),
    (DATA, "real_faces/face_08.png"),
    (DATA, "real_faces/face_10.png"),
    (DATA, "RealSRSet/comic3.png"),
    (DATA, "RealSRSet/pattern.png"),
    (SKIMAGE, "chelsea.png"),
    (SKIMAGE, "camera.png"),
    (SKIMAGE, "coins.png"),
    (SKIMAGE, "page.png"),
    (SKIMAGE, "chessboard_GRAY.png"),
    (SKIMAGE, "phantom.png"),
]
TOLERANCE = 1e-3  # the bound; measured here: < 1e-12 on all of these


@pytest.fixture(scope="module")
def basicsr():
    """BasicSR's niqe.py, loaded from the anchor folder (its sibling modules are found through sys.path)."""
    if not (ANCHOR / "niqe.py").is_file():
        pytest.skip(f"BasicSR's NIQE anchor is not at {ANCHOR} (a checkout without ../shared)")
    sys.path.insert(0, str(ANCHOR))
    try:
        spec = importlib.util.spec_from_file_location("basicsr_niqe_anchor", ANCHOR / "niqe.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ANCHOR))


def _load(folder: Path, name: str) -> np.ndarray:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"test image {path} is missing")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize(("folder", "name"), IMAGES, ids=[name for _, name in IMAGES])
def test_niqe_equals_basicsr_on_both_channels(basicsr, folder, name):
    rgb8 = _load(folder, name)
    assert rgb8.shape[0] % 96 or rgb8.shape[1] % 96 or name == "RealSRSet/pattern.png"
    bgr8 = np.ascontiguousarray(rgb8[..., ::-1])
    for channel in ("y", "gray"):
        expected = basicsr.calculate_niqe(bgr8, crop_border=0, input_order="HWC", convert_to=channel)
        ours = niqe(rgb8 / 255.0, channel)
        assert abs(ours - expected) < TOLERANCE, (name, channel, ours, expected)


def test_channels_are_rgb2ycbcr_y_and_bt601_grey():
    rgb = np.random.default_rng(0).integers(0, 256, (50, 60, 3)) / 255.0
    r, g, b = (rgb[..., i] * 255 for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    grey = 0.299 * r + 0.587 * g + 0.114 * b
    # Equal after rounding except where float32 lands on the other side of a .5 (BasicSR rounds the float32 value).
    assert np.mean(luma_levels(rgb, "y") != np.round(y)) < 1e-3
    assert np.mean(luma_levels(rgb, "gray") != np.round(grey)) < 1e-3
    assert luma_levels(np.zeros((1, 1, 3)), "y")[0, 0] == 16 and luma_levels(np.ones((1, 1, 3)), "y")[0, 0] == 235
    with pytest.raises(ValueError, match="channel must be one of y, gray"):
        luma_levels(rgb, "ycbcr")


def test_flat_areas_have_exactly_zero_mscn_coefficients():
    """Why the arithmetic is float32: the local mean of a flat patch rounds back to the pixel value."""
    window = _pristine()[2]
    flat = np.full((40, 40), 117.0, dtype=np.float32)
    assert not np.any(_mscn(flat, window))
    assert np.any(_mscn(flat.astype(np.float64), window))  # float64 leaves residue that would count as samples


def test_suite_names_the_channel():
    suite = MetricSuite(parse_metrics("niqe,niqe_gray"), device=None, has_reference=False, crop_border=4)
    with Image.open(SKIMAGE / "chelsea.png") as im:
        rgb = np.asarray(im.convert("RGB")) / 255.0
    values, problems = suite.score(rgb, None)
    assert problems == [] and values == {"niqe": niqe(rgb, "y"), "niqe_gray": niqe(rgb, "gray")}
    assert values["niqe"] != values["niqe_gray"]
