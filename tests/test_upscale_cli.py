"""`sana-sr upscale` on a folder that mixes every supported kind of image with every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sana_sr.cli import main as cli

from .image_zoo import BAD, GOOD, SIZE, write_zoo


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_folder_of_good_and_bad_inputs(tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_zoo(inputs)
    before = {p: p.read_bytes() for p in inputs.rglob("*") if p.is_file()}
    huge_pixels = 64 * 64
    code = cli(["upscale", str(inputs), str(tmp_path / "missing.png"), "-o", str(out),
                "--max-pixels", str(huge_pixels - 1), "--tile", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]

    assert code == 1
    # One line per bad input, naming the file and the reason; nothing about the good ones.
    assert len(errors) == len(BAD) + 1
    for name, reason in BAD.items():
        assert [e for e in errors if f"{name}:" in e and reason in e], (name, errors)
    assert [e for e in errors if "missing.png" in e and "no such file" in e]
    # Exactly the good files were written, under the same relative names, and nothing partial.
    assert _files(out) == set(GOOD)
    assert not [p for p in out.rglob(".*")]
    # Inputs untouched.
    assert all(p.read_bytes() == data for p, data in before.items())

    for name, (mode, bits, has_alpha) in GOOD.items():
        path = out / name
        with Image.open(path) as im:
            if bits == 16 and mode == "RGB":
                array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                assert array.dtype == np.uint16 and array.shape[2] == 3, name
                height, width = array.shape[:2]
            else:
                assert im.mode == mode, (name, im.mode)
                width, height = im.size
        if name == "rotated_exif.jpg":  # EXIF orientation 6 was applied: upright is SIZE transposed
            assert (width, height) == (SIZE[1] * 4, SIZE[0] * 4), name
        else:
            assert (width, height) == (SIZE[0] * 4, SIZE[1] * 4), name
        if has_alpha:
            with Image.open(path) as im:
                alpha = np.asarray(im.getchannel("A"), dtype=np.float32)
            if name == "palette_transparent.png":  # palette index 0 is transparent
                assert alpha.min() < 200 and alpha.max() == 255, name
            else:  # the input alpha ramps 0 -> 255 left to right: upscaled, it still does
                assert alpha[:, :8].mean() < 40 and alpha[:, -8:].mean() > 215, name


def test_output_never_overwrites_an_input(tmp_path, capsys):
    folder = tmp_path / "photos"
    write_zoo(folder)
    original = (folder / "rgb8.png").read_bytes()
    code = cli(["upscale", str(folder / "rgb8.png"), "-o", str(folder), "--tile", "0"])
    assert code == 1
    assert "would overwrite an input" in capsys.readouterr().err
    assert (folder / "rgb8.png").read_bytes() == original


def test_format_option_and_all_good_exit_zero(tmp_path):
    folder = tmp_path / "photos"
    write_zoo(folder)
    code = cli(["upscale", str(folder / "photo.jpg"), str(folder / "rgb16.tif"), "-o", str(tmp_path / "out"),
                "--format", "png", "--color-fix", "wavelet"])
    assert code == 0
    assert _files(tmp_path / "out") == {"photo.png", "rgb16.png"}
    array = cv2.imread(str(tmp_path / "out" / "rgb16.png"), cv2.IMREAD_UNCHANGED)
    assert array.dtype == np.uint16


def test_bad_model_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty_model").mkdir()
    code = cli(["upscale", str(tmp_path), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "empty_model")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "not a SANA-SR pipeline folder" in err
