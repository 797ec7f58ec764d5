"""The GPU check for a lent device: the `sana-0.6b` stack at real width with random weights in bf16, on one GPU, in
under 8 minutes; one JSON.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json      # one CUDA GPU
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check_smoke.json      # the tiny preset, CPU: it executes

1. Training: the shipped `sana_sr/configs/sana_0.6b.yaml` (DeepSpeed ZeRO-2, bf16, LoRA r64, gradient
   checkpointing, both regularisers, 512 px crops, micro batch 4) in one process through the real entry point, from a
   local mirror of the hub repos with random weights (sana_sr.model.hub_mirror; Gemma-2 at 2 of its 26 layers: the
   run conditions on the stored null prompt, not on caption embeddings). Steps/s over the steps after warm-up, peak
   GPU memory, and an MFU estimate: model FLOPs per sample from the meta-device MAC count (sana_sr.model.cost) over
   the passes one step makes (a pass with gradients counted as forward + an input-gradient backward, 2x; the frozen
   base gets no weight gradients; checkpointing's recompute not counted, as MFU conventions do), divided by the
   GPU's dense bf16 peak.
2. Latency of one restoration, batch 1, DiT and DC-AE in bf16: 128 -> 512 untiled, 512 -> 2048 tiled (DiT tiles of
   1024 px with 256 overlap, DC-AE tiles of 512 with 64); median of synchronised runs after warm-up.
3. The CPU-vs-GPU degradation agreement test (tests/test_degradation.py::test_cpu_and_gpu_agree).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info  # noqa: E402

# Dense bf16 tensor-core peaks (vendor datasheets, FLOP/s, no sparsity); MFU is null on a GPU not listed.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def write_shards(root: Path, crop: int, count: int) -> Path:
    """`count` shards of one random crop each, cut from the bundled photos resized to exceed the crop."""
    from sana_sr.data.shards import ShardOptions
    from sana_sr.data.shards import write_shards as shard

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    photos = sorted((REPO / "sana_sr" / "assets" / "photos").iterdir())
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            scale = (crop + 64) / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
            left, top = rng.integers(im.width - crop + 1), rng.integers(im.height - crop + 1)
            im.crop((left, top, left + crop, top + crop)).save(images / f"crop{i:03d}.png")
    shard([images], root / "shards", ShardOptions(max_count=1, min_size=crop, workers=1, progress=False))
    return root / "shards"


def model_flops_per_sample(preset: str, crop: int, regularisers: bool) -> float:
    from sana_sr.model.cost import component_costs, meta_model

    costs = {c.name: c.macs for c in component_costs(meta_model(preset), crop, crop, text=False)}
    encoder, dit, decoder = costs["dc-ae encoder"], costs["dit"], costs["dc-ae decoder"]
    # encode LQ (no grad), LoRA DiT (grad), decode (grad)
    macs = encoder + 2 * dit + 2 * decoder
    if regularisers:  # frozen DiT on noised z_hat (grad), encode HQ and frozen DiT on it (no grad), adapted (grad)
        macs += 2 * dit + encoder + dit + 2 * dit
    return 2.0 * macs


def train_check(args, work: Path, device: torch.device) -> dict:
    config = REPO / "sana_sr" / "configs" / "sana_0.6b.yaml"
    shards = write_shards(work / "data", args.crop, count=max(4, args.workers))
    overrides = [f"output_dir={work / 'run'}", f"data.shards={shards}", f"data.crop={args.crop}",
                 f"data.workers={args.workers}", "data.shuffle_buffer=8", "data.prompt_embeds=false",
                 f"optim.max_steps={args.steps}", f"optim.micro_batch_size={args.batch}",
                 f"optim.global_batch_size={args.batch}", "loss.lpips=0", "log.tracker=none", "log.every_steps=1",
                 "log.samples_every_steps=0", f"checkpoint.every_steps={args.steps}", "checkpoint.resume=null",
                 "dist.mixed_precision=bf16"]
    if args.smoke:
        overrides += ["model.preset=tiny", "model.lora_rank=8", "dist.cpu=true"]
    else:
        from sana_sr.model.hub_mirror import write_hub_mirror

        vae_dir, base_dir = write_hub_mirror("sana-0.6b", work / "hub", text_encoder_layers=2)
        overrides += [f"model.vae_id={vae_dir}", f"model.base_id={base_dir}"]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "sana_sr.train", str(config), *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        return {"ok": False, "error": (result.stdout + result.stderr)[-3000:]}
    from sana_sr.train.tracking import read_metrics

    rows = read_metrics(work / "run")
    timed = rows[min(args.warmup, len(rows) - 1):]
    seconds = [args.batch / r["throughput/samples_per_s"] for r in timed]
    step_s = statistics.median(seconds)
    preset = "tiny" if args.smoke else "sana-0.6b"
    flops = model_flops_per_sample(preset, args.crop, regularisers=True) * args.batch
    peak = peak_flops(device)
    return {
        "ok": True, "preset": preset, "crop": args.crop, "micro_batch": args.batch, "steps": len(rows),
        "timed_steps": len(timed), "step_s_median": round(step_s, 4), "steps_per_s": round(1 / step_s, 3),
        "samples_per_s": round(args.batch / step_s, 2),
        "peak_gpu_gib": rows[-1].get("memory/peak_gpu_gib"), "peak_rss_gib": rows[-1].get("memory/peak_rss_gib"),
        "model_tflop_per_step": round(flops / 1e12, 3),
        "mfu": None if peak is None else round(flops / step_s / peak, 4), "peak_bf16_flops": peak,
        "final_loss": rows[-1]["loss/loss"], "wall_s": round(time.perf_counter() - start, 1),
    }


def latency_check(args, work: Path, device: torch.device) -> dict:
    from sana_sr.model.loading import build_pipeline
    from sana_sr.model.tiling import TileSettings

    if args.smoke:
        pipe = build_pipeline("tiny", weights="pretrained", text_encoder=False)
        cases = {"32->128": (32, None), "128->512 tiled": (128, TileSettings(256, 64, 128, 16))}
    else:
        hub = work / "hub"
        pipe = build_pipeline("sana-0.6b", weights="pretrained", text_encoder=False,
                              vae_id=str(hub / "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"),
                              base_id=str(hub / "Efficient-Large-Model/Sana_600M_1024px_diffusers"))
        cases = {"128->512": (128, None), "512->2048 tiled": (512, TileSettings(1024, 256, 512, 64))}
    dtype = torch.bfloat16 if device.type == "cuda" or args.smoke else torch.float32
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    pipe.transformer.to(dtype)
    pipe.vae.to(dtype)
    out = {"dtype": str(dtype).removeprefix("torch.")}
    for name, (side, tiling) in cases.items():
        lq = torch.rand(1, 3, side, side, device=device)
        times = []
        for i in range(args.latency_warmup + args.latency_repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            with torch.no_grad():
                pipe(lq, tiling=tiling)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.latency_warmup:
                times.append(time.perf_counter() - start)
        out[name] = {"median_s": round(statistics.median(times), 4), "runs": len(times),
                     "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                     if device.type == "cuda" else None}
    return out


def degradation_check() -> dict:
    if not torch.cuda.is_available():
        return {"ok": None, "skipped": "no CUDA device"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_degradation.py::test_cpu_and_gpu_agree"], cwd=REPO, capture_output=True,
                            text=True)
    return {"ok": result.returncode == 0, "output": result.stdout[-1500:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny preset, CPU allowed: shows the script runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 30; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps not timed (default 5; smoke 1)")
    parser.add_argument("--crop", type=int, default=None, help="HQ crop (default 512; smoke 64)")
    parser.add_argument("--batch", type=int, default=None, help="micro batch (default 4, the config's; smoke 2)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default 4; smoke 1)")
    parser.add_argument("--latency-warmup", type=int, default=None, help="untimed runs (default 2; smoke 1)")
    parser.add_argument("--latency-repeats", type=int, default=None, help="timed runs (default 5; smoke 2)")
    args = parser.parse_args(argv)
    defaults = dict(steps=(3, 30), warmup=(1, 5), crop=(64, 512), batch=(2, 4), workers=(1, 4),
                    latency_warmup=(1, 2), latency_repeats=(2, 5))
    for name, (smoke, real) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else real)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("gpu_check: no CUDA device; --smoke runs the tiny preset on the CPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report = {"date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "machine": machine_info(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        report["train"] = train_check(args, work, device)
        report["latency"] = latency_check(args, work, device)
    report["degradation_cpu_vs_gpu"] = degradation_check()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("device", "train", "latency", "degradation_cpu_vs_gpu", "wall_s")},
                     indent=1))
    return 0 if report["train"].get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
