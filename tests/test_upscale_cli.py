"""`sana-sr upscale` on a folder that mixes every supported kind of image with every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sana_sr.atomic import MARKER
from sana_sr.cli import main as cli

from .image_zoo import BAD, CORPUS, CORPUS_MAX_PIXELS, GOOD, SIZE, block_outputs, write_corpus, write_zoo


def _files(folder: Path) -> set[str]:
    """Every file under `folder` but the marker that makes it an upscale output folder."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER}


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name != MARKER]


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
    assert not _temporaries(out)
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_malformed_corpus_one_line_each_and_every_good_file_done(tmp_path, capsys):
    """Issue 16: one upscale call over every kind of bad input and odd good one, with outputs that cannot be
    written: no traceback, one line per failure naming its reason, every good file restored, nothing partial."""
    inputs = tmp_path / "in"
    out = tmp_path / ("o" * 250) / ("o" * 250)  # long enough that DEEP cannot be written under it
    write_corpus(inputs)
    block_outputs(out)
    before = {p: p.read_bytes() for p in inputs.rglob("*") if p.is_file() and "fifo" not in p.name}
    code = cli(["upscale", str(inputs), "-o", str(out), "--max-pixels", str(CORPUS_MAX_PIXELS), "--tile", "0"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]

    bad = {name: reason for name, reason in BAD.items() if name != "huge.png"}
    bad |= {name: upscale for name, (upscale, _) in CORPUS.items() if upscale is not None}
    good = (set(GOOD) | {name for name, (upscale, _) in CORPUS.items() if upscale is None}) - set(bad)
    assert len(bad) + len(good) >= 40
    assert code == 1
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == len(errors) == len(bad), "\n".join(lines)
    for name, reason in bad.items():
        assert [e for e in errors if f"{Path(name).name}:" in e and reason in e], (name, reason, errors)
    assert f"{len(good)} of {len(good) + len(bad)} images written" in captured.out
    assert _files(out) == good | {"blocked", "dir_in_the_way.png/keep.txt"}  # and what was in the way, untouched
    assert not _temporaries(out)
    assert all(p.read_bytes() == data for p, data in before.items())  # inputs untouched


@pytest.mark.slow
def test_an_unrelated_folder_keeps_its_files_and_reruns_replace_their_own(tmp_path, capsys):
    folder = tmp_path / "photos"
    write_zoo(folder)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "rgb8.png").write_bytes(b"the user's own file of that name")
    (mine / "notes.txt").write_text("kept")
    args = [str(folder / "rgb8.png"), str(folder / "photo.jpg"), "--tile", "0"]
    assert cli(["upscale", *args, "-o", str(mine)]) == 1
    assert "exists and" in capsys.readouterr().err and (mine / "rgb8.png").read_bytes().startswith(b"the user's")
    assert _files(mine) == {"rgb8.png", "notes.txt", "photo.jpg"} and not (mine / MARKER).exists()
    assert cli(["upscale", *args, "-o", str(mine), "--overwrite"]) == 0
    assert Image.open(mine / "rgb8.png").size == (SIZE[0] * 4, SIZE[1] * 4)
    ours = tmp_path / "ours"
    assert cli(["upscale", *args, "-o", str(ours)]) == 0
    first = (ours / "photo.jpg").stat().st_mtime_ns
    assert cli(["upscale", *args, "-o", str(ours)]) == 0  # its own folder: replaced without --overwrite
    assert (ours / "photo.jpg").stat().st_mtime_ns >= first and _files(ours) == {"rgb8.png", "photo.jpg"}


@pytest.mark.parametrize("flags, message", [
    (["--scale", "0"], "--scale must be >= 1"),
    (["--tile", "-1"], "--tile must be >= 0"),
    (["--tile", "64", "--tile-overlap", "64"], "tile overlap must be in [0, tile=64)"),
    (["--ae-tile", "0"], "--ae-tile must be >= 1"),
    (["--max-pixels", "0"], "--max-pixels must be >= 1"),
    (["--format", "gif"], "invalid choice: 'gif'"),
    (["--dtype", "int4"], "invalid choice: 'int4'"),
    (["--scale", "two"], "invalid int value: 'two'"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    write_zoo(tmp_path / "in")
    try:
        code = cli(["upscale", str(tmp_path / "in" / "rgb8.png"), "-o", str(tmp_path / "out"), *flags])
    except SystemExit as e:  # argparse's own checks: usage, then one error line
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err), err
    assert not (tmp_path / "out").exists() or not _files(tmp_path / "out")


def test_output_that_is_a_file_is_one_line(tmp_path, capsys):
    write_zoo(tmp_path / "in")
    (tmp_path / "out").write_text("a file")
    assert cli(["upscale", str(tmp_path / "in" / "rgb8.png"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot write into" in err and (tmp_path / "out").read_text() == "a file"
