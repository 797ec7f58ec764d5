"""Evaluation datasets: paired HR/LR folders (RealSR, DRealSR, DIV2K-Val), or LR-only folders.

Pairs are matched by name after stripping the role and scale tags the public sets put in their file names
(`Canon_001_HR.png` / `Canon_001_LR4.png` in RealSR, `x_x1.png` / `x_x4.png` in DRealSR, `babyx4.png` in the
classic sets); StableSR's 128->512 crops use identical names in `test_HR/` and `test_LR/`. Every problem is one
`DatasetError` line naming the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sana_sr.images import EXTENSIONS, is_image_name, walk_files

# Sub-folder pairs (HR, LR) recognised under a dataset root, in order of preference.
KNOWN_LAYOUTS = (("test_HR", "test_LR"), ("HR", "LR"), ("GT", "LQ"), ("gt", "lq"), ("hr", "lr"))
_TAG = re.compile(r"([_\-.]?(hr|lr\d*|gt|lq|x\d+))$", re.IGNORECASE)
_EXIF_ORIENTATION = 0x0112
_MAX_LISTED = 5


class DatasetError(ValueError):
    """A dataset that cannot be evaluated; `str()` is the one-line reason, naming the files."""


@dataclass(frozen=True)
class Sample:
    """One image to restore (and its reference)."""

    name: str
    """Output stem, unique in the dataset (the LR file's path relative to its folder, without suffix)."""
    lq: Path
    hq: Path | None = None


@dataclass
class Dataset:
    """What the evaluation runs over."""

    name: str
    kind: str
    """"paired" or "lr-only"."""
    lr_dir: Path
    hr_dir: Path | None
    scale: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def has_reference(self) -> bool:
        return self.hr_dir is not None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def list_images(folder: Path, role: str) -> list[Path]:
    """Image files under `folder` (recursive, sorted, hidden files skipped), or DatasetError."""
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(f"{role} folder {folder} does not exist")
    if not folder.is_dir():
        raise DatasetError(f"{role} path {folder} is not a folder")
    images = [p for p in walk_files(folder) if is_image_name(p)]
    if not images:
        raise DatasetError(
            f"{role} folder {folder} has no images (looked for {', '.join(sorted(EXTENSIONS))}, recursively)"
        )
    return images


def pair_key(relative: Path) -> str:
    """Match key of a file: its relative path without suffix, lower-cased, role/scale tags stripped."""
    stem = relative.with_suffix("").as_posix().lower()
    while True:
        stripped = _TAG.sub("", stem)
        if stripped == stem or not stripped or stripped.endswith("/"):
            return stem
        stem = stripped


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read from the header only."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
            return width, height
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None


def _keyed(folder: Path, role: str) -> dict[str, Path]:
    keyed: dict[str, Path] = {}
    clashes = []
    for path in list_images(folder, role):
        key = pair_key(path.relative_to(folder))
        if key in keyed:
            clashes.append(f"{keyed[key].name} and {path.name}")
        keyed[key] = path
    if clashes:
        raise DatasetError(f"{role} folder {folder} has files that match the same name: {_listing(clashes)}")
    return keyed


def paired_dataset(hr_dir: Path, lr_dir: Path, scale: int, name: str | None = None) -> Dataset:
    """HR/LR pairs matched by name, each HR exactly `scale` times its LR (up to scale-1 extra pixels, cropped)."""
    if scale < 1:
        raise DatasetError(f"scale must be a positive integer, got {scale}")
    hr_dir, lr_dir = Path(hr_dir), Path(lr_dir)
    hr, lr = _keyed(hr_dir, "HR"), _keyed(lr_dir, "LR")
    lr_only = sorted(lr[k].name for k in lr.keys() - hr.keys())
    hr_only = sorted(hr[k].name for k in hr.keys() - lr.keys())
    if lr_only or hr_only:
        raise DatasetError(
            f"HR/LR names do not match ({len(hr)} HR in {hr_dir}, {len(lr)} LR in {lr_dir}): "
            f"{len(lr_only)} LR without HR [{_listing(lr_only)}], {len(hr_only)} HR without LR [{_listing(hr_only)}]; "
            "pairs are matched by name after removing tags such as _HR, _LR4, _x4, x4"
        )
    bad = []
    samples = []
    for key in sorted(lr):
        (lw, lh), (hw, hh) = image_size(lr[key]), image_size(hr[key])
        # Classic sets store LR = floor(HR / s): the HR may exceed s*LR by up to s-1 pixels (cropped later).
        if not (0 <= hw - lw * scale < scale and 0 <= hh - lh * scale < scale):
            bad.append(f"{hr[key].name} {hw}x{hh} vs {lr[key].name} {lw}x{lh} (x{scale} = {lw * scale}x{lh * scale})")
        samples.append(Sample(lr[key].relative_to(lr_dir).with_suffix("").as_posix(), lr[key], hr[key]))
    if bad:
        raise DatasetError(
            f"{len(bad)} of {len(samples)} HR/LR pairs are not x{scale} apart: {_listing(bad)}; "
            "check --scale or the folders"
        )
    return Dataset(name or hr_dir.parent.name or hr_dir.name, "paired", lr_dir, hr_dir, scale, samples)


def lr_only_dataset(lr_dir: Path, scale: int, name: str | None = None) -> Dataset:
    """LR images with no reference: only the no-reference metrics apply."""
    lr_dir = Path(lr_dir)
    samples = [Sample(p.relative_to(lr_dir).with_suffix("").as_posix(), p) for p in list_images(lr_dir, "LR")]
    return Dataset(name or lr_dir.name, "lr-only", lr_dir, None, scale, samples)


def find_layout(root: Path) -> tuple[Path, Path]:
    """(HR, LR) sub-folders of a dataset root in one of KNOWN_LAYOUTS, or DatasetError listing what was tried."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    for hr, lr in KNOWN_LAYOUTS:
        if (root / hr).is_dir() and (root / lr).is_dir():
            return root / hr, root / lr
    tried = ", ".join(f"{hr}/+{lr}/" for hr, lr in KNOWN_LAYOUTS)
    raise DatasetError(f"{root} has none of the known HR/LR sub-folder pairs ({tried}); pass --hr and --lr instead")
