"""`sana-sr quickstart`: the main job on the embedded default (tiny preset, bundled photos, CPU).

For now it restores the bundled photos end to end: the clean photos are downscaled x4 (the LQ inputs), the
real low-quality ones are used as they are, and both are restored by the tiny preset.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from PIL import Image

from . import upscale
from .atomic import atomic_file


def bundled(folder: str) -> Path:
    """Path of a bundled asset folder (`photos` or `real_lq`)."""
    return Path(str(resources.files("sana_sr") / "assets" / folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sana-sr quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder")
    parser.add_argument("--model", default="tiny", help="preset, pipeline folder or hub id")
    args = parser.parse_args(argv)

    lq_dir = args.out / "lq"
    for photo in sorted(bundled("photos").iterdir()):
        if photo.suffix.lower() not in (".png", ".jpg"):
            continue
        with Image.open(photo) as im:
            small = im.convert("RGB").resize((im.width // 4, im.height // 4), Image.Resampling.BICUBIC)
        with atomic_file(lq_dir / f"{photo.stem}.png") as tmp:
            small.save(tmp, format="PNG")
    code = upscale.main([str(lq_dir), str(bundled("real_lq")), "-o", str(args.out / "sr"), "--model", args.model])
    print(f"quickstart results: {args.out.resolve()}")
    return code
