"""What the benchmarks report about the machine they ran on, and the real photos they run on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
from PIL import Image

# Real photos with both sides >= 512: the project's shared evaluation images, scikit-image's sample photos, and
# the package's bundled ones (whichever exist here).
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def photo_paths(min_side: int = 512) -> list[Path]:
    candidates = sorted((_SHARED / "Urban100_dev" / "HR").glob("*.png")) + [_SHARED / "Set5" / "HR" / "baby.png"]
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        candidates += [data / n for n in ("astronaut.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")]
    except ImportError:
        pass
    candidates += sorted((Path(__file__).resolve().parents[1] / "sana_sr" / "assets" / "photos").iterdir())
    found = []
    for path in candidates:
        if path.is_file():
            with Image.open(path) as im:
                if im.mode == "RGB" and min(im.size) >= min_side and path.name not in {p.name for p in found}:
                    found.append(path)
    if not found:
        raise SystemExit(f"no RGB photo with both sides >= {min_side} found")
    return found


def photos(min_side: int = 512) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in photo_paths(min_side)]


def machine_info() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("kornia", "webdataset", "PIL"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions,
        "loadavg": loadavg(),
    }


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unavailable"
