"""Reading and writing the images a user hands us: PNG, JPEG, WebP, TIFF; 8/16-bit; grey, palette, RGB(A).

Pillow decodes and validates everything (it reports truncation, which OpenCV does not); OpenCV is used only
for 16-bit colour, which Pillow silently reduces to 8 bits. Every failure is an `ImageError` with a one-line
message; every write is atomic.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sana_sr.atomic import atomic_file

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}
EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
              ".bmp": "BMP"}
"""The one list of image file suffixes every command reads and writes, with Pillow's format for each."""
SIXTEEN_BIT_FORMATS = ("PNG", "TIFF")
MAX_SIDE = {"JPEG": 65535, "WEBP": 16383, "PNG": 2**31 - 1, "TIFF": 2**31 - 1, "BMP": 2**31 - 1}
"""The largest width or height each format's encoder can write."""
_EXIF_ORIENTATION = 0x0112


class ImageError(Exception):
    """A bad input or output image; `str()` is the one-line reason."""


@dataclass
class LoadedImage:
    """Pixels as floats in [0, 1] plus what is needed to write the result back in kind."""

    rgb: np.ndarray
    """(H, W, 3) float32; a grey image is repeated over the three channels."""
    alpha: np.ndarray | None
    """(H, W) float32, or None."""
    bit_depth: int
    """8 or 16."""
    grayscale: bool
    format: str
    """One of FORMATS."""


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an (H, W[, C]) array so that it displays upright."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
        7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
        8: lambda a: np.swapaxes(a, 0, 1)[::-1],
    }
    return np.ascontiguousarray(ops[orientation](array)) if orientation in ops else array


def printable(text: str) -> str:
    """`text` with control characters and undecodable bytes of file names escaped: a message stays one line."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in text)


def check_output_size(path: str | os.PathLike, width: int, height: int) -> None:
    """ImageError if the format of `path` cannot hold a `width` x `height` image."""
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt is not None and max(width, height) > MAX_SIDE[fmt]:
        raise ImageError(f"the output would be {width}x{height}, larger than {fmt} can hold ({MAX_SIDE[fmt]} pixels "
                         "a side): use --format png or tile the input")


def walk_files(root: str | os.PathLike) -> Iterator[Path]:
    """Every file under the folder `root`, recursively, in sorted order; hidden files and folders are skipped.

    Links to folders are followed (a tree of symlinked datasets works) and a link cycle is entered only once."""
    root = Path(root)
    visited = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        visited.add(os.path.realpath(dirpath))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in visited)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in EXTENSIONS


def find_images(inputs: list[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """(path, path relative to its input) of every image under the named folders, and each named file as it is
    (whatever its suffix, even missing: reading it says what is wrong)."""
    found = []
    for name in inputs:
        root = Path(name)
        if root.is_dir():
            found += [(path, path.relative_to(root)) for path in walk_files(root) if is_image_name(path)]
        else:
            found.append((root, Path(root.name)))
    return found


def _is_16bit_color(path: Path, im: Image.Image) -> bool:
    if im.mode not in ("RGB", "RGBA"):
        return False
    if im.format == "PNG":
        with open(path, "rb") as f:
            header = f.read(25)
        return len(header) == 25 and struct.unpack("B", header[24:25])[0] == 16
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) == 16
    return False


@contextmanager
def decode_errors(error: type[Exception]) -> Iterator[None]:
    """Re-raise PIL's ways of failing on a bad file as `error` with a one-line reason (and `error` as is).

    Pillow's decompression-bomb *warning* is silenced: callers enforce pixel limits of their own, and a warning
    would print lines of its own."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except error:
        raise
    except Image.DecompressionBombError as e:
        raise error(f"too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise error("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise error(f"truncated or corrupt image: {e}") from None
    except Exception as e:  # noqa: BLE001 - decoders fail in many more ways on hostile bytes (struct, index, memory)
        raise error(f"cannot decode ({type(e).__name__}: {e})") from None


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> LoadedImage:
    """Decode `path` fully, or raise ImageError saying why not."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        dangling = path.is_symlink() and e.errno == 2
        raise ImageError("a link to nothing (dangling symlink)" if dangling else
                         "no such file" if e.errno == 2 else f"cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise ImageError("is a folder, not an image")
    if not stat.S_ISREG(mode):  # a FIFO would block for ever; opening a device can do things
        raise ImageError("not a regular file (a FIFO, socket or device)")
    if path.stat().st_size == 0:
        raise ImageError("empty file (0 bytes)")
    with decode_errors(ImageError):
        with Image.open(path) as im:
            if im.format not in FORMATS:
                raise ImageError(f"unsupported format {im.format} (supported: {', '.join(FORMATS)})")
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise ImageError(f"{frames} frames (an animation or a multi-page file): only single images are "
                                 "restored")
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            im.load()
            sixteen_color = _is_16bit_color(path, im)
            decoded = _decode_pil(im) if not sixteen_color else None
            fmt = im.format

    if sixteen_color:
        decoded = _decode_16bit_color(path)
    values, alpha, bit_depth, grayscale = decoded
    values, alpha = _orient(values, orientation), _orient(alpha, orientation) if alpha is not None else None
    scale = 65535.0 if bit_depth == 16 else 255.0
    rgb = values.astype(np.float32) / scale
    if grayscale:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    return LoadedImage(
        rgb=rgb,
        alpha=alpha.astype(np.float32) / scale if alpha is not None else None,
        bit_depth=bit_depth,
        grayscale=grayscale,
        format=fmt,
    )


def _decode_pil(im: Image.Image):
    """(values, alpha, bit_depth, grayscale) of an image Pillow can represent exactly."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(im).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageError(f"32-bit integer pixels outside 0..65535 are not supported (mode {mode})")
        return values.astype(np.uint16), None, 16, True
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode == "L":
        return np.asarray(im), None, 8, True
    if mode == "LA":
        a = np.asarray(im)
        return a[:, :, 0], a[:, :, 1], 8, True
    if mode == "RGBA":
        a = np.asarray(im)
        return a[:, :, :3], a[:, :, 3], 8, False
    if mode in ("RGB", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB")), None, 8, False
    raise ImageError(f"unsupported pixel mode {mode}")


def _decode_16bit_color(path: Path):
    import cv2

    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint16 or array.ndim != 3:
        raise ImageError("truncated or corrupt 16-bit image")
    if array.shape[2] == 4:
        return array[:, :, [2, 1, 0]], array[:, :, 3], 16, False
    return array[:, :, ::-1], None, 16, False


def save_image(path: str | os.PathLike, image: LoadedImage) -> None:
    """Write `image` atomically in the format named by the path's extension (16-bit kept where it can be)."""
    path = Path(path)
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"cannot write {path.suffix!r} files (use one of {', '.join(sorted(EXTENSIONS))})")
    bit_depth = image.bit_depth if fmt in SIXTEEN_BIT_FORMATS else 8
    scale = 65535.0 if bit_depth == 16 else 255.0
    dtype = np.uint16 if bit_depth == 16 else np.uint8

    def quantize(a: np.ndarray) -> np.ndarray:
        return (np.clip(a, 0, 1) * scale).round().astype(dtype)

    if image.grayscale:
        # ITU-R BT.601 luma, as Pillow's RGB -> L conversion.
        values = quantize(image.rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    else:
        values = quantize(image.rgb)
    alpha = quantize(image.alpha) if image.alpha is not None and fmt != "JPEG" else None
    options = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}.get(fmt, {})

    # The deepest part of the path that exists must be a folder (else mkdir says only "File exists").
    parent = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if parent is not None and not parent.is_dir():
        raise ImageError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        _write(path, values, alpha, image.grayscale, bit_depth, fmt, options)
    except ImageError:
        raise
    except OSError as e:  # the folder, the name, the disk: one line naming the file
        raise ImageError(f"cannot write {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - encoders raise ValueError, SystemError, ... for what they cannot hold
        raise ImageError(f"cannot write {path} as {fmt}: {type(e).__name__}: {e}") from None


def _write(path: Path, values: np.ndarray, alpha: np.ndarray | None, grayscale: bool, bit_depth: int, fmt: str,
           options: dict) -> None:
    with atomic_file(path) as tmp:
        if bit_depth == 16 and (not grayscale or alpha is not None):
            # Pillow has no 16-bit colour (nor 16-bit grey + alpha): OpenCV writes those, grey as RGB.
            import cv2

            color = values if values.ndim == 3 else np.repeat(values[:, :, None], 3, axis=2)
            array = color[:, :, ::-1] if alpha is None else np.dstack([color[:, :, ::-1], alpha])
            if not cv2.imwrite(str(tmp), np.ascontiguousarray(array)):
                raise ImageError(f"OpenCV could not write {path.name}")
            return
        # Pillow picks L / LA / RGB / RGBA / I;16 from the array's shape and dtype.
        pil = Image.fromarray(values if alpha is None else np.dstack([values, alpha]))
        if fmt == "JPEG" and pil.mode == "LA":
            pil = pil.convert("L")
        pil.save(tmp, format=fmt, **options)
