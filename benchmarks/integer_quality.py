"""The integer path against its fake-quant reference on the trained tiny model, per method and bits (not a test).

    PYTHONPATH=. python benchmarks/integer_quality.py --out benchmarks/results/integer_quality.json

The bundled tiny SANA-SR base is compressed by each method (calibrated on the bundled training photos, short
fine-tunes), written as a pipeline folder and loaded twice: fake-quant (the reference) and execution="int". Both
restore the held-back photos (chelsea.png, Set5's HR images) degraded by the training's Real-ESRGAN model; reported:
PSNR-Y (border 4, 8-bit levels) of the integer output against the fake-quant one, and of each against HQ.
The last line is the lowest integer-vs-fake-quant PSNR-Y over all images and configurations.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import loadavg, machine_info  # noqa: E402

from compress import QuantizeConfig  # noqa: E402
from sana_sr import SanaSRPipeline, build_pipeline  # noqa: E402
from sana_sr.quantization.compress import compress_pipeline  # noqa: E402
from sana_sr.quantization.folder import save_quantized_pipeline  # noqa: E402

QUALITY_CONFIGS = [("minmax", 8, 8), ("minmax", 4, 8), ("minmax", 4, 4), ("2dquant", 4, 4), ("compsrt", 4, 4),
                   ("spr2q", 4, 4), ("spr2q", 2, 4)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- ----------------------------------------------------------------------------
@torch.no_grad()
def held_back_images(size: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    from PIL import Image

    from sana_sr import bundled
    from sana_sr.data.calibration_pairs import realesrgan_degradation

    set5 = Path(__file__).resolve().parents[2] / "shared" / "data" / "Set5" / "HR"
    out = []
    for i, path in enumerate(bundled.held_back_photos() + sorted(set5.glob("*.png"))):
        with Image.open(path) as im:
            a = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        h, w = (min(s, size) // 16 * 16 for s in a.shape[2:])
        top, left = (a.shape[2] - h) // 2, (a.shape[3] - w) // 2
        hq = a[:, :, top:top + h, left:left + w]
        out.append((path.name, realesrgan_degradation(hq, 4, torch.Generator().manual_seed(i)), hq))
    return out


def psnr_y_of(a: torch.Tensor, b: torch.Tensor) -> float:
    from sana_sr.evaluation.metrics.fidelity import psnr_y, to_8bit_levels

    to_np = lambda t: to_8bit_levels(t[0].permute(1, 2, 0).cpu().numpy())  # noqa: E731
    return psnr_y(to_np(a), to_np(b), crop_border=4)


def quality_section(steps: int, size: int, work: Path) -> dict:
    from sana_sr import bundled
    from sana_sr.data.calibration_pairs import calibration_batches
    from sana_sr.quantization.compress import latent_batches

    base = build_pipeline("tiny", weights="pretrained", text_encoder=False)
    base.set_progress_bar_config(disable=True)
    calib = latent_batches(base, calibration_batches(bundled.train_photos(), pairs=4, batch_size=2, crop=32, seed=0))
    images = held_back_images(size)
    out = {}
    for method, wbits, abits in QUALITY_CONFIGS:
        pipe = copy.deepcopy(base)
        config = QuantizeConfig(method=method, wbits=wbits, abits=abits, steps=steps, routing_steps=max(1, steps // 2))
        compress_pipeline(pipe, config, calib)
        folder = work / f"tiny-{method}-w{wbits}a{abits}"
        save_quantized_pipeline(pipe, folder, report={})
        ref, fast = SanaSRPipeline.from_pretrained(folder), SanaSRPipeline.from_pretrained(folder, execution="int")
        rows = {}
        with torch.no_grad():
            for name, lq, hq in images:
                a, b = ref(lq), fast(lq)
                rows[name] = {"int_vs_fakequant_db": round(psnr_y_of(b, a), 2), "fakequant_vs_hq_db":
                              round(psnr_y_of(a, hq), 3), "int_vs_hq_db": round(psnr_y_of(b, hq), 3),
                              "max_abs_diff": float((a - b).abs().max())}
        finite = [r["int_vs_fakequant_db"] for r in rows.values() if math.isfinite(r["int_vs_fakequant_db"])]
        out[f"{method} W{wbits}A{abits}"] = {
            "per_image": rows, "summary": fast.integer_summary.line(),
            "min_int_vs_fakequant_db": min(finite) if finite else float("inf"),
            "mean_hq_db_fakequant": round(float(np.mean([r["fakequant_vs_hq_db"] for r in rows.values()])), 3),
            "mean_hq_db_int": round(float(np.mean([r["int_vs_hq_db"] for r in rows.values()])), 3)}
        log(f"  quality {method} W{wbits}A{abits}: int vs fake-quant >= {out[f'{method} W{wbits}A{abits}']['min_int_vs_fakequant_db']} dB")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="fine-tune steps of the trained methods")
    parser.add_argument("--size", type=int, default=256, help="HQ centre crop side (LQ is a quarter)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"benchmark": "integer vs fake-quant quality", "machine": machine_info(), "loadavg_before": loadavg(),
              "steps": args.steps, "hq_crop": args.size}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report["results"] = quality_section(args.steps, args.size, Path(tmp))
    report["loadavg_after"], report["seconds"] = loadavg(), round(time.perf_counter() - start, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    for name, r in report["results"].items():
        print(f"{name:<16} int vs fake-quant >= {r['min_int_vs_fakequant_db']:.2f} dB; vs HQ: fake-quant "
              f"{r['mean_hq_db_fakequant']:.3f}, int {r['mean_hq_db_int']:.3f} dB")
    worst = min(r["min_int_vs_fakequant_db"] for r in report["results"].values())
    print(f"load {report['loadavg_before']} -> {report['loadavg_after']}; {report['seconds']} s")
    print(f"lowest PSNR-Y of the integer path against its fake-quant reference: {worst:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
