"""Score a SANA-SR pipeline (default: the shipped `tiny-sr`) against bicubic on photos that nothing trains on.

    python benchmarks/default_model.py                                   # score the shipped model, refresh its card
    python benchmarks/default_model.py --install RUN/final/pipeline      # ship other weights first, then the same
    python benchmarks/default_model.py --model runs/x --json /tmp/x.json --no-card   # any other pipeline

Protocols, PSNR-Y in dB (sana_sr.evaluation.metrics.psnr_y, 4-pixel border, both images rounded to 8 bit):
- `bicubic`: the held-out crops (`sana_sr.bundled.held_out_photos()`: Set5 and Urban100) downsampled x4 by torch's
  antialiased bicubic, rounded to 8 bit;
- `x4plus`: the same crops through the Real-ESRGAN x4plus degradation (`sana_sr.data.degradation.degrade_images`,
  `DegradationConfig()` defaults), seed 15000 + crc32(name) per image, so every run scores the very same pixels;
- `set5-lr`: Set5's own LR_bicubic/X4 files (MATLAB imresize) restored and compared with the full HR images
  (`tests/data/set5_x4/`).
Bicubic is `bicubic_upsample` of the same LQ: the very input the model starts from. Writes every number to
benchmarks/results/default_model.json and prints the Markdown table that the model card
(`sana_sr/assets/tiny-sr/README.md`, between its `numbers` markers) embeds; with the default model the card's table
is rewritten. Swapping the shipped weights is therefore: `--install FOLDER`, then edit the card's prose (data,
degradation, command), nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout: the package beside this script, not an installed one

from sana_sr import bundled  # noqa: E402
from sana_sr.evaluation.metrics.fidelity import psnr_y, to_8bit_levels  # noqa: E402

SET5_X4 = REPO / "tests" / "data" / "set5_x4"
RESULTS = REPO / "benchmarks" / "results" / "default_model.json"
SCALE = 4
CROP_BORDER = 4
X4PLUS_SEED = 15_000
CARD_BEGIN, CARD_END = "<!-- numbers:begin -->", "<!-- numbers:end -->"
PROTOCOLS = {
    "bicubic": "held-out crops, plain bicubic x4 (antialiased, 8 bit)",
    "x4plus": "held-out crops, Real-ESRGAN x4plus degradation (fixed seeds)",
    "set5-lr": "Set5 LR_bicubic/X4 files vs full HR",
}
# Module paths an earlier layout of this project wrote into model_index.json, and where those classes live now.
LEGACY_MODULES = {"sana_sr.text": "sana_sr.model.text"}


def load_rgb(path: Path) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1]."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def bicubic_down(hr: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """Plain x`scale` downsampling: torch's antialiased bicubic (PIL's kernel, a = -0.5), rounded to 8-bit levels."""
    h, w = hr.shape[-2:]
    lq = F.interpolate(hr, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return (lq.clamp(0, 1) * 255).round() / 255


def x4plus_seed(name: str) -> int:
    """A fixed seed per image, by name, so that adding an image leaves the others' LQ unchanged."""
    return X4PLUS_SEED + zlib.crc32(name.encode())


def x4plus_down(hr: torch.Tensor, name: str) -> torch.Tensor:
    from sana_sr.data.degradation import degrade_images
    from sana_sr.data.degradation_config import DegradationConfig

    return degrade_images(hr, x4plus_seed(name), DegradationConfig())


def as_image(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) float64 on 8-bit levels, as a saved PNG would hold it."""
    return to_8bit_levels(x[0].permute(1, 2, 0).detach().float().cpu().numpy())


def pairs(protocol: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, LQ, HR) of one protocol."""
    if protocol == "set5-lr":
        out = []
        for hr_path in sorted((SET5_X4 / "HR").glob("*.png")):
            out.append((hr_path.stem, load_rgb(SET5_X4 / "LR" / f"{hr_path.stem}x{SCALE}.png"), load_rgb(hr_path)))
        if not out:
            raise FileNotFoundError(f"no Set5 x4 pairs under {SET5_X4}")
        return out
    photos = bundled.held_out_photos()
    if not photos:
        raise FileNotFoundError(f"no held-out crops under {bundled.HELD_OUT}")
    down = bicubic_down if protocol == "bicubic" else None
    out = []
    for path in photos:
        hr = load_rgb(path)
        out.append((path.stem, down(hr) if down else x4plus_down(hr, path.stem), hr))
    return out


@torch.no_grad()
def score(pipe, protocol: str) -> dict:
    from sana_sr.model.pipeline import bicubic_upsample

    images = {}
    for name, lq, hr in pairs(protocol):
        sr = pipe(lq, upscale=SCALE)
        bicubic = bicubic_upsample(lq, hr.shape[2], hr.shape[3])
        reference = as_image(hr)
        row = {"bicubic": psnr_y(as_image(bicubic), reference, CROP_BORDER),
               "model": psnr_y(as_image(sr), reference, CROP_BORDER)}
        images[name] = {**row, "gain": row["model"] - row["bicubic"]}
    gains = [r["gain"] for r in images.values()]
    return {"description": PROTOCOLS[protocol], "images": images,
            "bicubic": float(np.mean([r["bicubic"] for r in images.values()])),
            "model": float(np.mean([r["model"] for r in images.values()])),
            "gain": float(np.mean(gains)), "min_gain": float(min(gains)),
            "improved": sum(g > 0 for g in gains), "count": len(gains)}


def weight_digests(folder: Path) -> dict[str, str]:
    """sha256 of every safetensors file of a local pipeline folder: which weights these numbers belong to."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def markdown(result: dict) -> str:
    lines = ["| protocol | images | bicubic PSNR-Y | model PSNR-Y | gain (mean) | gain (worst image) | images improved |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in result["protocols"].items():
        lines.append(f"| {name}: {p['description']} | {p['count']} | {p['bicubic']:.2f} | {p['model']:.2f} | "
                     f"**{p['gain']:+.2f}** | {p['min_gain']:+.2f} | {p['improved']} of {p['count']} |")
    names = list(result["protocols"]["bicubic"]["images"])
    lines += ["", "Gain over bicubic per held-out crop (dB):", "",
              "| crop | plain bicubic x4 | x4plus |", "| --- | ---: | ---: |"]
    for name in names:
        cells = [f"{result['protocols'][p]['images'][name]['gain']:+.2f}" for p in ("bicubic", "x4plus")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def update_card(card: Path, table: str, command: str) -> None:
    text = card.read_text()
    if CARD_BEGIN not in text or CARD_END not in text:
        raise ValueError(f"{card} has no {CARD_BEGIN} ... {CARD_END} section for the numbers")
    head, rest = text.split(CARD_BEGIN, 1)
    _, tail = rest.split(CARD_END, 1)
    body = f"\n_Written by `{command}`; raw numbers: `benchmarks/results/default_model.json`._\n\n{table}\n"
    card.write_text(head + CARD_BEGIN + body + CARD_END + tail)


def install(source: Path, target: Path = bundled.TINY_SR) -> None:
    """Replace the shipped pipeline's files by those of `source` (configs and safetensors; the card stays), with
    legacy module paths in model_index.json brought up to date. The new files are assembled and checked (as any
    loaded folder is) beside the target first, so a bad source leaves the shipped model as it was."""
    from sana_sr.model.components import check_pipeline_folder

    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} is not a pipeline folder (no model_index.json)")
    staging = target.with_name(f".{target.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors"):
            dest = staging / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    index = json.loads((staging / "model_index.json").read_text())
    for key, value in index.items():
        if isinstance(value, list) and value and value[0] in LEGACY_MODULES:
            index[key] = [LEGACY_MODULES[value[0]], value[1]]
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    try:
        check_pipeline_folder(staging)
    except Exception:
        shutil.rmtree(staging)
        raise
    for old in target.iterdir():
        if old.name != "README.md":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for new in staging.iterdir():
        new.rename(target / new.name)
    staging.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sr", help="model name, pipeline folder or hub id (default tiny-sr)")
    parser.add_argument("--install", type=Path, metavar="FOLDER",
                        help="first copy this pipeline folder's weights into sana_sr/assets/tiny-sr/")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where the numbers go (default {RESULTS})")
    parser.add_argument("--no-card", dest="card", action="store_false", help="leave the model card as it is")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the numbers do not depend "
                                                               "on it, the load on a shared machine does)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sana_sr.model.loading import load_pipeline, resolve_model

    try:
        if args.install:
            if args.model != "tiny-sr":
                raise ValueError("--install replaces the shipped tiny-sr: leave --model at its default")
            install(args.install)
        pipe = load_pipeline(args.model)
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    started = time.time()
    folder = Path(resolve_model(args.model))
    command = " ".join(["python benchmarks/default_model.py", *(argv if argv is not None else sys.argv[1:])]).strip()
    result = {
        "model": args.model, "command": command,
        "weights_sha256": weight_digests(folder) if folder.is_dir() else None,
        "protocols": {p: score(pipe, p) for p in PROTOCOLS},
        "x4plus_seeds": {path.stem: x4plus_seed(path.stem) for path in bundled.held_out_photos()},
        "psnr": f"PSNR-Y, crop border {CROP_BORDER}, 8-bit images; bicubic = bicubic_upsample of the same LQ",
        "versions": {"torch": torch.__version__}, "seconds": round(time.time() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if args.card and args.model == "tiny-sr" and args.json == RESULTS:  # the card cites that file
        update_card(bundled.TINY_SR / "README.md", table, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
