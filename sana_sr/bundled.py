"""What ships inside the package: the bundled photos with their captions and their train / held-back split, the
real low-quality photos, the held-out evaluation crops, the tiny preset's base weights, the shipped tiny SR model
and the config files (training YAMLs, DeepSpeed JSONs).

Everything is found through the installed package (`importlib.resources`), never through a source checkout, so a
regular `pip install` works from any working directory. Where the files come from: `sana_sr/assets/SOURCE.md`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGE = Path(str(resources.files("sana_sr")))
ASSETS = PACKAGE / "assets"
CONFIGS = PACKAGE / "configs"
PHOTOS = ASSETS / "photos"
REAL_LQ = ASSETS / "real_lq"
TINY_BASE = ASSETS / "tiny-base"
TINY_SR = ASSETS / "tiny-sr"
"""The shipped trained tiny SR model (a SanaSRPipeline folder): the model name `tiny-sr`, the default of
`sana-sr upscale` and `sana-sr evaluate`. Its card, with training command and numbers: `tiny-sr/README.md`."""
HELD_OUT = ASSETS / "held_out"

CAPTIONS: dict[str, str] = {
    "astronaut.png": "a photo of an astronaut, portrait, person, face",
    "coffee.png": "a photo of a coffee cup on a table, food",
    "rocket.jpg": "a photo of a rocket launch, smoke, sky",
}
"""The training photos of the main job and of the tiny base, with their prompts."""
HELD_BACK: tuple[str, ...] = ("chelsea.png",)
"""Bundled photos that nothing trains on: the main job evaluates on them."""
SKIMAGE_TRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "ihc.png",
    "retina.jpg", "brick.png", "grass.png", "gravel.png", "camera.png", "text.png", "page.png", "moon.png",
    "coins.png", "cell.png")
"""The photographs among scikit-image's data files that `tiny-sr` trained on (`pretrain-tiny --skimage-photos`).
Left out: chelsea (held back), synthetic images (chessboard, logo, phantom, ...), the motion-blurred clock, tiny
files, and motorcycle_right (a near-duplicate of motorcycle_left)."""


def train_photos() -> list[Path]:
    return [PHOTOS / name for name in CAPTIONS]


def held_back_photos() -> list[Path]:
    return [PHOTOS / name for name in HELD_BACK]


def held_out_photos() -> list[Path]:
    """Crops of Set5 and Urban100 that nothing trains on (provenance: `assets/held_out/SOURCE.md`): the evaluation
    set of the shipped model. Not the main job's held-back photo, which is a bundled training-domain photo."""
    return sorted(HELD_OUT.glob("*.png"))


def real_lq_photos() -> list[Path]:
    """Real low-quality photographs with no ground truth (RealSRSet)."""
    return sorted(REAL_LQ.glob("*.png"))


def config_file(name: str) -> Path:
    """A bundled config (`tiny.yaml`, `sana_0.6b.yaml`, `deepspeed_zero2.json`, ...); an error lists the known ones."""
    path = CONFIGS / name
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in CONFIGS.iterdir() if p.is_file()))
        raise FileNotFoundError(f"no bundled config {name!r}; bundled: {known}")
    return path
