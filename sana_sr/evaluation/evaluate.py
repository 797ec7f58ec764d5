"""`sana-sr evaluate` (= `eval/realsr.py`): Real-ISR evaluation of a SANA-SR model on RealSR / DRealSR / DIV2K-Val /
LR-only folders.

    accelerate launch --multi_gpu --num_processes 8 eval/realsr.py --model PIPELINE --root RealSR -o runs/eval/realsr
    accelerate launch --multi_gpu --num_processes 8 -m sana_sr.cli evaluate --model PIPELINE --root RealSR -o ...
    sana-sr evaluate --lr my_lq_photos/ -o runs/eval/mine --device cpu

Writes per_image.csv, summary.json, results.md, grids/ (LQ | SR | HQ) and sr/ under the output folder.
See docs/evaluation.md for the data layouts, the metrics and their conventions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sana-sr evaluate", description=__doc__.splitlines()[0])
    data = parser.add_argument_group("dataset (one of)")
    data.add_argument("--root", type=Path, help="folder with test_HR/+test_LR/ (or HR/+LR/, GT/+LQ/) inside")
    data.add_argument("--hr", type=Path, help="HR folder (with --lr)")
    data.add_argument("--lr", type=Path, help="LR folder; alone: no-reference metrics only")
    data.add_argument("--div2k-gt", type=Path, help="DIV2K-Val GT crops; LQ generated once (Real-ESRGAN) and cached")
    data.add_argument("--cache", type=Path, default=Path("runs/eval-cache"), help="cache for generated LQ sets")
    data.add_argument("--seed", type=int, default=0, help="seed of the DIV2K-Val degradation")
    data.add_argument("--name", help="dataset name in the reports")
    data.add_argument("--max-images", type=int, help="only the first N images (smoke runs)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument("--model", default="tiny-sr",
                        help="pipeline folder, hub id, tiny-sr (the shipped trained model, default) or PRESET-random "
                             "(random weights, e.g. tiny-random for smoke runs)")
    parser.add_argument("--scale", type=int, help="upscaling factor (default: the model's)")
    parser.add_argument("--crop-border", type=int, help="PSNR/SSIM border crop (default: the scale)")
    parser.add_argument("--metrics", default="all",
                        help="comma-separated: psnr,ssim,lpips,dists,niqe,niqe_gray,musiq,maniqa,clipiqa,fid (default all; niqe is on Y, niqe_gray on grey)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="DiT precision")
    parser.add_argument("--prompt", help="prompt for every image (default: the model's stored prompt)")
    parser.add_argument("--color-fix", choices=("none", "adain", "wavelet"), default="none")
    parser.add_argument("--tile", type=int, default=0, help="tile side in output px for big images; 0: whole")
    parser.add_argument("--grids", type=int, default=4, help="number of LQ | SR | HQ grids to write")
    parser.add_argument("--no-save-images", dest="save_images", action="store_false",
                        help="do not write sr/ (FID then cannot be computed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace -o even if it was not written by sana-sr evaluate (its sr/ and grids/ are deleted)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sana_sr.distributed import process_group_released
    from sana_sr.evaluation.datasets import DatasetError
    from sana_sr.evaluation.runner import EvalConfig, run

    with process_group_released():
        try:
            config = EvalConfig(**{k: v for k, v in vars(args).items()})
            return run(config)
        except (DatasetError, ValueError, RuntimeError) as e:
            if os.environ.get("RANK", "0") == "0":  # one line, not one per process
                print(f"error: {e}", file=sys.stderr)
            return 2

