"""`sana-sr upscale INPUT... -o OUT_DIR`: restore image files and folders.

One bad input never stops the others: each failure (unreadable, corrupt, too large, an output the format cannot
hold, a name the filesystem refuses, a failed write) is one line on stderr naming the file, the exit code is 1 when
any failed, outputs are written atomically, and an output path never equals an input path. A file already in
OUT_DIR is replaced only when OUT_DIR is an upscale output folder (its marker file says so) or with --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sana_sr.atomic import MARKER, mark, written_by
from sana_sr.dtypes import DTYPES
from sana_sr.images import (
    EXTENSIONS,
    FORMATS,
    ImageError,
    LoadedImage,
    check_output_size,
    find_images,
    load_image,
    printable,
    save_image,
)
from sana_sr.model.tiling import TileSettings

DEFAULT_MAX_PIXELS = 16_000_000
OWNER = "sana-sr upscale"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="sana-sr upscale", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT_DIR", help="output folder")
    parser.add_argument("--model", default="tiny-sr",
                        help="pipeline folder, hub id, tiny-sr (the shipped trained model, default) or PRESET-random "
                             "(random weights, e.g. tiny-random)")
    parser.add_argument("--scale", type=int, default=None, help="upscaling factor (default: the model's)")
    parser.add_argument("--prompt", default=None, help="text prompt (default: the model's stored default prompt)")
    parser.add_argument("--tile", type=int, default=1024, help="DiT tile side in output pixels; 0 disables tiling")
    parser.add_argument("--tile-overlap", type=int, default=256, help="overlap of DiT tiles in output pixels")
    parser.add_argument("--ae-tile", type=int, default=512, help="DC-AE tile side in output pixels")
    parser.add_argument("--ae-tile-overlap", type=int, default=64, help="overlap of DC-AE tiles in output pixels")
    parser.add_argument("--color-fix", choices=("none", "adain", "wavelet"), default="none")
    parser.add_argument("--format", choices=("same",) + tuple(f.lower() for f in FORMATS), default="same",
                        help="output format (default: that of each input)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse inputs with more pixels than this (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="DiT precision")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files already in OUT_DIR even if it is not an upscale output folder")
    parser.add_argument("--execution", choices=("fake-quant", "int"), default="fake-quant",
                        help="a compressed model's layers: dequantized on the fly (the reference, default) or on "
                             "integer CPU kernels where one exists (see docs/compression.md)")
    return parser


def check_arguments(args: argparse.Namespace) -> TileSettings | None:
    """The tiling, or ValueError naming the bad option (argparse checks only types and choices)."""
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}")
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    for name in ("tile", "tile_overlap", "ae_tile", "ae_tile_overlap"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.ae_tile < 1:
        raise ValueError(f"--ae-tile must be >= 1, got {args.ae_tile}")
    return None if args.tile == 0 else TileSettings(args.tile, args.tile_overlap, args.ae_tile, args.ae_tile_overlap)


def claim_output(out_dir: Path) -> bool:
    """Create OUT_DIR if needed; True when it is ours (new, empty, or marked by an earlier upscale): files there
    may be replaced. A folder of the user's gets new files but keeps every file it had."""
    if out_dir.is_dir() and written_by(out_dir) == OWNER:
        return True
    if out_dir.is_dir() and any(p.name != MARKER for p in out_dir.iterdir()):
        return False
    out_dir.mkdir(parents=True, exist_ok=True)
    mark(out_dir, OWNER)
    return True


def output_path(out_dir: Path, relative: Path, fmt: str) -> Path:
    ext = relative.suffix if fmt == "same" and relative.suffix.lower() in EXTENSIONS else FORMATS.get(fmt.upper(), ".png")
    return out_dir / relative.with_suffix(ext)


def restore_image(pipe, image: LoadedImage, scale: int, prompt: str | None, tiling: TileSettings | None,
                  color_fix: str) -> LoadedImage:
    """Restore the RGB of `image`; its alpha channel is upscaled on its own (bicubic), never dropped."""
    rgb = torch.from_numpy(image.rgb).permute(2, 0, 1)[None]
    restored = pipe(rgb, prompt=prompt, upscale=scale, tiling=tiling, color_fix=color_fix)
    alpha = None
    if image.alpha is not None:
        a = torch.from_numpy(image.alpha)[None, None]
        alpha = F.interpolate(a, size=restored.shape[2:], mode="bicubic", align_corners=False).clamp(0, 1)[0, 0]
        alpha = alpha.numpy()
    return LoadedImage(
        rgb=restored[0].permute(1, 2, 0).cpu().numpy().astype(np.float32),
        alpha=alpha, bit_depth=image.bit_depth, grayscale=image.grayscale, format=image.format,
    )


def _load_quietly(model: str, execution: str):
    """load_pipeline with diffusers' loading bars only on a terminal, like the per-image bar: stderr in a log or a
    pipe then holds nothing but the one-line errors."""
    from diffusers.utils import logging as diffusers_logging

    from sana_sr.model.loading import load_pipeline

    shown = diffusers_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        diffusers_logging.disable_progress_bar()
    try:
        return load_pipeline(model, execution=execution)
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from sana_sr.model.loading import resolve_model

    try:
        tiling = check_arguments(args)
        resolve_model(args.model)  # a bare preset name is refused before the output folder is made
        ours = claim_output(args.output)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(printable(f"error: cannot write into {args.output}: {e.strerror or e}"), file=sys.stderr)
        return 2
    try:
        pipe = _load_quietly(args.model, args.execution)
    except (OSError, ValueError) as e:
        print(f"error: cannot load model {args.model!r}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    if args.dtype != "fp32":
        pipe.transformer.to(DTYPES[args.dtype])
    scale = args.scale or pipe.config.upscale

    jobs = find_images(args.inputs)
    input_paths = {p.resolve() for p, _ in jobs if p.exists()}
    claimed: set[Path] = set()
    failures = 0
    for path, relative in tqdm(jobs, desc="upscaling", unit="img", disable=None):
        out = output_path(args.output, relative, args.format)
        try:
            if out.resolve() in input_paths:
                raise ImageError(f"output {out} would overwrite an input")
            if out.resolve() in claimed:
                raise ImageError(f"output {out} is also the output of an earlier input")
            if (out.exists() or out.is_symlink()) and not (ours or args.overwrite):
                raise ImageError(f"output {out} exists and {args.output} is not an upscale output folder: pass "
                                 "--overwrite to replace it")
            image = load_image(path, max_pixels=args.max_pixels)
            height, width = image.rgb.shape[:2]
            check_output_size(out, width * scale, height * scale)  # before the model runs, not after
            save_image(out, restore_image(pipe, image, scale, args.prompt, tiling, args.color_fix))
            claimed.add(out.resolve())
        except (ImageError, torch.OutOfMemoryError) as e:
            failures += 1
            tqdm.write(printable(f"error: {path}: {e}"), file=sys.stderr)
        except OSError as e:  # checking the output path itself failed (a name too long, a link loop)
            failures += 1
            where = f": {e.filename}" if e.filename else ""
            tqdm.write(printable(f"error: {path}: cannot write the output: {e.strerror or e}{where}"), file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - one input must never stop the others; the line says what it was
            failures += 1
            tqdm.write(printable(f"error: {path}: {type(e).__name__}: {e}"), file=sys.stderr)
    print(printable(f"{len(jobs) - failures} of {len(jobs)} images written to {args.output}"))
    return 1 if failures else 0
