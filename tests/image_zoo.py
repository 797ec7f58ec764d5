"""Writes a folder of good images of every supported kind and bad inputs of every kind, from a real photo."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .conftest import ASSETS

# name -> (mode the output must have, bit depth, has alpha)
GOOD = {
    "rgb8.png": ("RGB", 8, False),
    "rgb16.png": ("RGB", 16, False),
    "gray8.png": ("L", 8, False),
    "gray16.png": ("I;16", 16, False),
    "palette.png": ("RGB", 8, False),
    "palette_transparent.png": ("RGBA", 8, True),
    "rgba.png": ("RGBA", 8, True),
    "photo.jpg": ("RGB", 8, False),
    "gray.jpg": ("L", 8, False),
    "rotated_exif.jpg": ("RGB", 8, False),
    "photo.webp": ("RGB", 8, False),
    "alpha.webp": ("RGBA", 8, True),
    "rgb8.tif": ("RGB", 8, False),
    "rgb16.tif": ("RGB", 16, False),
    "sub/nested.png": ("RGB", 8, False),
}
BAD = {
    "empty.png": "empty file",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "not_an_image.png": "not an image",
    "huge.png": "exceeds the limit",
}
SIZE = (20, 12)  # width, height of the good inputs
HUGE = (64, 64)


def write_zoo(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    with Image.open(ASSETS / "photos" / "coffee.png") as im:
        rgb = im.convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)
    arr = np.asarray(rgb)
    alpha = np.tile(np.linspace(0, 255, SIZE[0], dtype=np.uint8), (SIZE[1], 1))
    rgb.save(folder / "rgb8.png")
    cv2.imwrite(str(folder / "rgb16.png"), (arr[:, :, ::-1].astype(np.uint16) * 257))
    rgb.convert("L").save(folder / "gray8.png")
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(folder / "gray16.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(folder / "palette.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(folder / "palette_transparent.png", transparency=0)
    Image.fromarray(np.dstack([arr, alpha])).save(folder / "rgba.png")
    rgb.save(folder / "photo.jpg", quality=95)
    rgb.convert("L").save(folder / "gray.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displays rotated 90 degrees clockwise
    rgb.save(folder / "rotated_exif.jpg", quality=95, exif=exif)
    rgb.save(folder / "photo.webp", quality=95)
    Image.fromarray(np.dstack([arr, alpha])).save(folder / "alpha.webp", lossless=True)
    rgb.save(folder / "rgb8.tif")
    cv2.imwrite(str(folder / "rgb16.tif"), (arr[:, :, ::-1].astype(np.uint16) * 257))
    rgb.save(folder / "sub" / "nested.png")

    (folder / "empty.png").write_bytes(b"")
    data = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    data = (folder / "rgb8.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "not_an_image.png").write_text("this is a text file with an image's name\n")
    Image.new("RGB", HUGE).save(folder / "huge.png")
    (folder / "notes.txt").write_text("not an image extension: ignored when walking a folder\n")
