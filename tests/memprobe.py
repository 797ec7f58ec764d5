"""Peak-memory probe: restore one random LQ image in a fresh process and print its peak RSS.

`python -m tests.memprobe --lq 512 --tile 1024` restores a 512x512 input to 2048x2048 with the tiny preset and
prints one JSON line: output shape, seconds, peak resident memory (MiB) before and after the restoration.
A fresh process is the honest way to measure a peak on the CPU: ru_maxrss only ever grows.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--lq", type=int, default=512, help="side of the square LQ input")
    parser.add_argument("--tile", type=int, default=1024, help="DiT tile in output px; 0: untiled DiT and AE")
    parser.add_argument("--ae-tile", type=int, default=512)
    args = parser.parse_args(argv)

    from sana_sr.model.loading import load_pipeline
    from sana_sr.model.tiling import TileSettings

    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, args.lq, args.lq, generator=torch.Generator().manual_seed(0))
    tiling = TileSettings(args.tile, args.tile // 4, args.ae_tile, args.ae_tile // 8) if args.tile else None
    before = _peak_mib()
    start = time.perf_counter()
    out = pipe(image, tiling=tiling)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "output": list(out.shape), "seconds": round(seconds, 2),
        "peak_rss_mib_before": round(before, 1), "peak_rss_mib": round(_peak_mib(), 1),
        "tiling": None if tiling is None else vars(tiling), "torch": torch.__version__,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
