"""Benchmark: FP vs min-max vs 2DQuant-style vs CompSRT vs SPR²Q on a SwinIR-light-sized x4 SR network.

    PYTHONPATH=. python benchmarks/quant_sr.py                 # ~30-40 min the first time on 1 CPU thread
    PYTHONPATH=. python benchmarks/quant_sr.py --methods 2dquant spr2q --bits 2 --steps 20   # a quick subset

1. Train the network (benchmarks/swinir_light.py) for a bounded time on real photos — Urban100_dev HR and
   scikit-image's photographs, never Set5 — with bicubic x4 LR; cached in benchmarks/.cache, so re-runs skip it.
2. Evaluate it and every quantized copy on Set5 x4 (HR + MATLAB-bicubic LR from ../shared/data): PSNR and SSIM on the
   Y channel (BT.601, border cropped by the scale), as the papers do.
3. Quantize at W4A4, W3A3, W2A2 with each method on LR calibration patches from the training photos; export each
   packed and report the export's size on disk and bits/parameter.
Writes benchmarks/results/quant_sr.json and prints a markdown table; machine, versions, load and command are recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swinir_light import SwinIRLight  # noqa: E402

from compress import (  # noqa: E402  # noqa: E402
    METHODS,
    QuantizeConfig,
    export_quantized,
    export_size,
    fp16_reference_bytes,
    load_quantized,
    quantize,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SANA_SR_SHARED_DATA", ROOT.parent / "shared" / "data"))
SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "camera.png",
                  "coins.png", "brick.png", "grass.png", "gravel.png", "moon.png", "page.png")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--train-minutes", type=float, default=12.0, help="training time bound (cached afterwards)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-patch", type=int, default=32, help="LR patch side for training")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2], help="W=A bits to test")
    p.add_argument("--steps", type=int, default=60, help="fine-tune steps (2dquant, compsrt; spr2q group training)")
    p.add_argument("--routing-steps", type=int, default=20, help="SPR²Q static routing steps")
    p.add_argument("--calib", type=int, default=32, help="calibration LR patches")
    p.add_argument("--calib-patch", type=int, default=32)
    p.add_argument("--calib-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quant_sr.json")
    return p.parse_args(argv)


# -- data ------------------------------------------------------------------------------------------------------------
def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def training_images() -> tuple[list[np.ndarray], list[str]]:
    import skimage

    skdata = Path(skimage.__file__).parent / "data"
    paths = sorted((DATA / "Urban100_dev" / "HR").glob("*.png")) + [skdata / n for n in SKIMAGE_PHOTOS]
    return [_rgb(p) for p in paths], [str(p) for p in paths]


def patches(images: list[np.ndarray], count: int, lr_size: int, scale: int, rng: np.random.Generator):
    """(lr, hr) patch tensors: random HR crops (with flips) and their antialiased bicubic downscaling."""
    hr_size = lr_size * scale
    crops = []
    for _ in range(count):
        im = images[int(rng.integers(len(images)))]
        top, left = rng.integers(im.shape[0] - hr_size + 1), rng.integers(im.shape[1] - hr_size + 1)
        crop = im[top:top + hr_size, left:left + hr_size]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    hr = torch.from_numpy(np.ascontiguousarray(np.stack(crops))).permute(0, 3, 1, 2)
    lr = F.interpolate(hr, size=(lr_size, lr_size), mode="bicubic", antialias=True, align_corners=False)
    return lr.clamp(0, 1), hr


def set5(scale: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    out = []
    for hr_path in sorted((DATA / "Set5" / "HR").glob("*.png")):
        lr = _rgb(DATA / "Set5" / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png")
        hr = _rgb(hr_path)[: lr.shape[0] * scale, : lr.shape[1] * scale]
        out.append((hr_path.stem, torch.from_numpy(lr).permute(2, 0, 1)[None], torch.from_numpy(hr)))
    return out


# -- metrics (Y channel, as the SR papers) -----------------------------------------------------------------------------
def to_y(rgb: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr's Y of an RGB image in [0, 255] (8-bit rounded), as float64."""
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def psnr_ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    sr8 = np.round(np.clip(sr, 0, 1) * 255.0)
    hr8 = np.round(np.clip(hr, 0, 1) * 255.0)
    ys, yh = to_y(sr8)[border:-border, border:-border], to_y(hr8)[border:-border, border:-border]
    mse = np.mean((ys - yh) ** 2)
    psnr = 10 * np.log10(255.0**2 / mse)
    ssim = structural_similarity(ys, yh, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    return float(psnr), float(ssim)


@torch.no_grad()
def evaluate(model, images, scale: int) -> tuple[float, float]:
    scores = []
    for _, lr, hr in images:
        sr = model(lr)[0].permute(1, 2, 0).numpy() if model is not None else \
            F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
        scores.append(psnr_ssim_y(sr, hr.numpy(), scale))
    return float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))


# -- training (cached) -------------------------------------------------------------------------------------------------
def trained_model(args, images, log) -> tuple[SwinIRLight, dict]:
    key = f"swinir_light_x{args.scale}_{args.train_minutes:g}min_b{args.train_batch}_p{args.train_patch}_s{args.seed}"
    weights, meta_path = args.cache / f"{key}.safetensors", args.cache / f"{key}.json"
    model = SwinIRLight(scale=args.scale)
    if weights.is_file() and meta_path.is_file():
        model.load_state_dict(safetensors.torch.load_file(str(weights)))
        log(f"loaded the cached FP network {weights}")
        return model.eval(), json.loads(meta_path.read_text())
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start, step, losses = time.time(), 0, []
    budget = args.train_minutes * 60
    model.train()
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        for group in optimizer.param_groups:  # linear warm-up over 5%, then cosine to 2% of the peak
            group["lr"] = args.lr * (min(1.0, frac / 0.05) if frac < 0.05 else 0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * frac)))
        lr, hr = patches(images, args.train_batch, args.train_patch, args.scale, rng)
        loss = F.l1_loss(model(lr), hr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 25 == 0:
            log(f"train step {step}: L1 {np.mean(losses[-25:]):.4f} ({time.time() - start:.0f}s)")
    model.eval()
    meta = dict(steps=step, seconds=round(time.time() - start, 1), final_l1=float(np.mean(losses[-25:])),
                batch=args.train_batch, lr_patch=args.train_patch, peak_lr=args.lr)
    args.cache.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    meta_path.write_text(json.dumps(meta, indent=1))
    return model, meta


# -- quantization runs -----------------------------------------------------------------------------------------------
def quantize_and_measure(fp_model, method: str, bits: int, calib, args, images, log) -> dict:
    config = QuantizeConfig(method=method, wbits=bits, abits=bits, steps=args.steps, routing_steps=args.routing_steps,
                            seed=args.seed)
    start = time.time()
    result = quantize(copy.deepcopy(fp_model), calib, config, feature_modules=[f"layers.{i}" for i in range(4)])
    seconds = time.time() - start
    with tempfile.TemporaryDirectory() as tmp:
        layout = export_quantized(result.model, tmp)
        size = export_size(tmp)
        reloaded = load_quantized(SwinIRLight(scale=args.scale), tmp).eval()
    psnr, ssim = evaluate(reloaded, images, args.scale)  # the model read back from the packed file
    params = sum(p.numel() for p in fp_model.parameters())
    row = dict(method=method, bits=bits, psnr=round(psnr, 3), ssim=round(ssim, 4), bytes=size,
               bits_per_weight=layout["summary"]["bits_per_weight"], file_bits_per_param=round(8 * size / params, 3),
               quantize_seconds=round(seconds, 1),
               losses={k: [round(v[0], 5), round(v[-1], 5)] if v else [] for k, v in result.losses.items()})
    log(f"{method:8s} W{bits}A{bits}: {psnr:.2f} dB / {ssim:.4f}, {size / 1024:.1f} KiB, "
        f"{row['bits_per_weight']:.2f} b/w, {seconds:.0f}s, losses {row['losses']}")
    return row


def environment(argv) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return dict(command="PYTHONPATH=. python benchmarks/quant_sr.py " + " ".join(argv), cpu=cpu,
                cores=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                torch=torch.__version__, threads=torch.get_num_threads(), commit=commit.strip(),
                loadavg_start=Path("/proc/loadavg").read_text().strip())


def table(report: dict) -> str:
    lines = ["| method | W/A bits | Set5 x{s} PSNR (Y) | SSIM (Y) | file size | bits/weight (paper) | file bits/param |"
             .format(s=report["scale"]), "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        bits = f"{r['bits']}/{r['bits']}" if isinstance(r["bits"], int) else r["bits"]
        lines.append(f"| {r['method']} | {bits} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['bytes'] / 1024:.1f} KiB | "
                     f"{r['bits_per_weight']} | {r['file_bits_per_param']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(argv)
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    images, sources = training_images()
    model, train_meta = trained_model(args, images, log)
    test = set5(args.scale)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        fp16_bytes = fp16_reference_bytes(model, tmp)
    bic, fp = evaluate(None, test, args.scale), evaluate(model, test, args.scale)
    rows = [dict(method="bicubic", bits="-", psnr=round(bic[0], 3), ssim=round(bic[1], 4), bytes=0,
                 bits_per_weight="-", file_bits_per_param="-"),
            dict(method="FP (fp16 file)", bits="16/32", psnr=round(fp[0], 3), ssim=round(fp[1], 4), bytes=fp16_bytes,
                 bits_per_weight=16, file_bits_per_param=round(8 * fp16_bytes / params, 3))]
    log(f"bicubic {bic[0]:.2f} dB, FP {fp[0]:.2f} dB / {fp[1]:.4f}; {params} parameters")
    rng = np.random.default_rng(args.seed + 1)
    lr_patches, _ = patches(images, args.calib, args.calib_patch, args.scale, rng)
    calib = list(lr_patches.split(args.calib_batch))
    for bits in args.bits:
        for method in args.methods:
            rows.append(quantize_and_measure(model, method, bits, calib, args, test, log))
    report = dict(env, scale=args.scale, params=params, train=train_meta, train_images=sources,
                  test="Set5 HR + LR_bicubic/X%d from %s" % (args.scale, DATA / "Set5"),
                  settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  rows=rows, seconds=round(time.time() - start, 1), loadavg_end=Path("/proc/loadavg").read_text().strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(table(report))
    print(f"load average: start {report['loadavg_start']} / end {report['loadavg_end']}; {report['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
