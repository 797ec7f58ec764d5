"""Image reading/writing round trips and colour correction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sana_sr.images import ImageError, load_image, save_image
from sana_sr.model.color import adain, apply_color_fix, wavelet, wavelet_low_frequency

from .conftest import load_photo
from .image_zoo import BAD, GOOD, write_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    write_zoo(folder)
    return folder


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_good_kind_round_trips_exactly(zoo, tmp_path, name):
    image = load_image(zoo / name)
    save_image(tmp_path / name.replace("/", "_").replace(".jpg", ".png").replace(".webp", ".png"), image)
    again = load_image(tmp_path / name.replace("/", "_").replace(".jpg", ".png").replace(".webp", ".png"))
    step = 1 / (65535 if image.bit_depth == 16 else 255)
    assert again.bit_depth == image.bit_depth and again.grayscale == image.grayscale
    assert np.abs(again.rgb - image.rgb).max() <= step / 2 + 1e-7
    assert (again.alpha is None) == (image.alpha is None)


def test_sixteen_bit_values_are_kept(zoo):
    image = load_image(zoo / "rgb16.png")
    assert image.bit_depth == 16
    values = np.round(image.rgb * 65535)
    assert (values % 257 == 0).all() and values.max() > 255  # the 8->16-bit expansion, not an 8-bit image


def test_exif_orientation_matches_pillow(zoo):
    image = load_image(zoo / "rotated_exif.jpg")
    with Image.open(zoo / "rotated_exif.jpg") as im:
        upright = np.asarray(ImageOps.exif_transpose(im), dtype=np.float32) / 255
    np.testing.assert_array_equal(image.rgb, upright)


@pytest.mark.parametrize("name,reason", sorted(BAD.items()))
def test_bad_inputs_raise_one_line(zoo, name, reason):
    with pytest.raises(ImageError) as info:
        load_image(zoo / name, max_pixels=64 * 64 - 1)
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_failed_writes_leave_nothing(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    image = load_image(path)
    with pytest.raises(ImageError, match="cannot write"):
        save_image(tmp_path / "out.gif", image)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ImageError, match="cannot write .*out.png: disk full"):  # one line, naming the file
        save_image(tmp_path / "out.png", image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_adain_matches_reference_statistics():
    image, reference = load_photo("coffee.png", (64, 48)), load_photo("chelsea.png", (64, 48))
    fixed = adain(image, reference)
    torch.testing.assert_close(fixed.mean((2, 3)), reference.mean((2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.std((2, 3)), reference.std((2, 3)), atol=1e-4, rtol=0)


def test_wavelet_takes_low_frequencies_from_reference_and_detail_from_image():
    reference = load_photo("astronaut.png", (128, 128))
    image = reference.flip(-1) * 0.5 + 0.3  # other colours, other content
    fixed = wavelet(image, reference)
    low = wavelet_low_frequency

    def detail(x):  # the finest wavelet level
        return x - low(x, levels=1)

    assert (low(fixed) - low(reference)).abs().mean() < 0.25 * (low(image) - low(reference)).abs().mean()
    assert (detail(fixed) - detail(image)).abs().mean() < 0.1 * (detail(reference) - detail(image)).abs().mean()
    with pytest.raises(ValueError, match="unknown colour fix"):
        apply_color_fix(image, reference, "histogram")
