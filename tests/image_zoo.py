"""Writes a folder of good images of every supported kind and bad inputs of every kind, from a real photo."""

from __future__ import annotations

import os
import struct
import zlib
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


# -- the malformed-input corpus (issue 16): every way a file can be bad, next to good files of odd kinds ----------
# name -> (what `sana-sr upscale` says, what `sana-sr shards` says); None = done (restored / made a sample).
# Names ending in "/" are folders; the corpus is run with --max-pixels CORPUS_MAX_PIXELS (and --min-size 1 for shards).
CORPUS_MAX_PIXELS = 20_000
LONG_NAME = "n" * 251 + ".png"  # 255 bytes: the longest name a filesystem takes (its temporary name must fit too)
DEEP = "/".join(["d" * 240] * 15) + "/deep.png"  # fits under the input root; under a long output root it cannot
CORPUS: dict[str, tuple[str | None, str | None]] = {
    # good, of odd kinds and names
    "uni/фото 1.png": (None, None),
    "spaces in a name.jpg": (None, None),
    "日本語の名前.webp": (None, None),
    LONG_NAME: (None, None),
    "one_pixel.png": (None, None),
    "one_row.png": (None, None),
    "gray_alpha.png": (None, None),
    "bilevel.png": (None, None),
    "cmyk.jpg": (None, None),
    "gray16.tif": (None, None),
    "rgba16.png": (None, None),
    "link_to_good.png": (None, None),
    "linked_dir/nested.png": (None, None),
    "folder_named.png/inside.png": (None, None),
    "huge.png": (None, None),  # the zoo's 64x64: under this corpus's pixel limit
    # too large, or an output its format cannot hold
    "bigger.png": ("exceeds the limit", "too many pixels"),
    "bomb_header.png": ("too many pixels", "too many pixels"),
    "bomb_header.jpg": ("exceeds the limit", "too many pixels"),
    "too_wide.jpg": ("larger than JPEG can hold", None),
    "too_wide.webp": ("larger than WEBP can hold", None),
    # corrupt and truncated
    "zero_size.png": ("not an image", "not an image"),
    "bad_crc.png": ("not an image", "not an image"),
    "garbage_after_signature.png": ("not an image", "not an image"),
    "scrambled.jpg": ("not an image", "not an image"),
    "truncated.webp": ("truncated or corrupt", "truncated or corrupt"),
    "truncated.tif": ("truncated or corrupt", "truncated or corrupt"),
    "gif_named.png": ("unsupported format GIF", "unsupported format GIF"),
    # modes, depths, frames
    "float.tif": ("unsupported pixel mode F", None),
    "negative_int32.tif": ("outside 0..65535", None),
    "lab.tif": ("unsupported pixel mode LAB", None),
    "animated.webp": ("2 frames", None),
    "animated.png": ("2 frames", None),
    "pages.tif": ("2 frames", None),
    # not files
    "fifo.png": ("not a regular file", "not a regular file"),
    "link_to_fifo.png": ("not a regular file", "not a regular file"),
    "link_to_device.png": ("not a regular file", "not a regular file"),
    "dangling.png": ("dangling symlink", "unreadable"),
    "loop.png": ("cannot read", "unreadable"),
    # outputs that cannot be written (set up in the output folder by `block_outputs`)
    "blocked/a.png": ("is a file, not a folder", None),
    "dir_in_the_way.png": ("Is a directory", None),
    DEEP: ("File name too long", None),
}


def _png(width: int, height: int, corrupt_crc: bool = False) -> bytes:
    """A PNG that declares `width` x `height` (grey, 8-bit) but holds a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) ^ (1 if corrupt_crc and kind == b"IHDR" else 0)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def write_corpus(folder: Path) -> None:
    """The zoo plus CORPUS under `folder` (the good files of the zoo are good here too)."""
    write_zoo(folder)
    with Image.open(folder / "rgb8.png") as im:
        rgb = im.convert("RGB")
    arr = np.asarray(rgb)
    for name in CORPUS:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
    rgb.save(folder / "uni" / "фото 1.png")
    rgb.save(folder / "spaces in a name.jpg")
    rgb.save(folder / "日本語の名前.webp")
    rgb.save(folder / LONG_NAME)
    Image.new("RGB", (1, 1), (200, 30, 40)).save(folder / "one_pixel.png")
    Image.fromarray(arr[:1]).save(folder / "one_row.png")
    rgb.convert("LA").save(folder / "gray_alpha.png")
    rgb.convert("1").save(folder / "bilevel.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(folder / "gray16.tif")
    cv2.imwrite(str(folder / "rgba16.png"), np.dstack([arr[:, :, ::-1], arr[:, :, :1]]).astype(np.uint16) * 257)
    (folder / "link_to_good.png").symlink_to(folder / "rgb8.png")
    (folder / "linked_dir").rmdir()
    (folder / "linked_dir").symlink_to(folder / "sub", target_is_directory=True)
    rgb.save(folder / "folder_named.png" / "inside.png")

    Image.new("L", (150, 150)).save(folder / "bigger.png")
    (folder / "bomb_header.png").write_bytes(_png(100_000, 100_000))
    jpeg = bytearray((folder / "photo.jpg").read_bytes())
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: height and width at +5 and +7
    jpeg[sof + 5: sof + 9] = struct.pack(">HH", 12_000, 12_000)  # past Pillow's bomb warning, short of its error
    (folder / "bomb_header.jpg").write_bytes(bytes(jpeg))
    Image.new("RGB", (16_384, 1)).save(folder / "too_wide.jpg")
    Image.new("RGB", (4_096, 1)).save(folder / "too_wide.webp")

    (folder / "zero_size.png").write_bytes(_png(0, 0))
    (folder / "bad_crc.png").write_bytes(_png(8, 8, corrupt_crc=True))
    (folder / "garbage_after_signature.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    scrambled = bytearray((folder / "photo.jpg").read_bytes())
    scrambled[2:200] = bytes(range(198))
    (folder / "scrambled.jpg").write_bytes(bytes(scrambled))
    for source, name in (("photo.webp", "truncated.webp"), ("rgb8.tif", "truncated.tif")):
        data = (folder / source).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    rgb.save(folder / "gif_named.png", format="GIF")

    Image.fromarray(arr[:, :, 0].astype(np.float32) / 255).save(folder / "float.tif")
    Image.fromarray(arr[:, :, 0].astype(np.int32) - 100).save(folder / "negative_int32.tif")
    rgb.convert("LAB").save(folder / "lab.tif")
    flipped = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for name in ("animated.webp", "animated.png", "pages.tif"):
        rgb.save(folder / name, save_all=True, append_images=[flipped])

    os.mkfifo(folder / "fifo.png")
    (folder / "link_to_fifo.png").symlink_to(folder / "fifo.png")
    (folder / "link_to_device.png").symlink_to("/dev/null")
    (folder / "dangling.png").symlink_to(folder / "nothing_here.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")

    rgb.save(folder / "blocked" / "a.png")
    rgb.save(folder / "dir_in_the_way.png")
    rgb.save(folder / DEEP)


def block_outputs(out: Path) -> None:
    """What makes three good inputs unwritable in `out`: a file where a folder must go, a folder where a file must
    go (with a file of its own), and a long output root under which DEEP passes the path length limit."""
    from sana_sr.atomic import mark

    out.mkdir(parents=True, exist_ok=True)
    mark(out, "sana-sr upscale")  # an earlier upscale's folder: its files may be replaced, if they can be
    (out / "blocked").write_text("a file, where the output needs a folder\n")
    (out / "dir_in_the_way.png").mkdir()
    (out / "dir_in_the_way.png" / "keep.txt").write_text("a folder, where the output needs a file\n")
