"""Degradation throughput: HQ 512 -> LQ 128, batch 16, on real photos (not a test; numbers go in docs/data.md).

    PYTHONPATH=. python benchmarks/degradation_speed.py [--reps 10] [--threads 2] [--device cpu] [--out r.json]

Variants run round-robin (one batch of each in turn, the same seeds for each) so that a change in the machine's
load hits them alike: the chain without USM, with the separable USM, with Real-ESRGAN's dense 51x51 USM, and
(--kornia) with kornia's JPEG. Reported against DESIGN.md §6's anchor, Real-ESRGAN's own code on a 2-core machine:
8.7 images/s without USM, 0.7 with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import loadavg, machine_info, photos  # noqa: E402

from sana_sr.data.degradation import DegradationConfig, RealESRGANDegradation  # noqa: E402
from sana_sr.data.kernels import draw_kernels  # noqa: E402

ANCHOR = {"no_usm": 8.7, "usm": 0.7}  # images/s, Real-ESRGAN's feed_data + BasicSR kernels, 2 cores, torch 2.13


def hq_batch(batch: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = photos(size)
    crops = []
    for i in range(batch):
        a = images[i % len(images)]
        top, left = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
        crops.append(torch.from_numpy(a[top : top + size, left : left + size].copy()).permute(2, 0, 1))
    return torch.stack(crops).float() / 255.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=10, help="timed batches per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kornia", action="store_true", help="also time kornia's JPEG")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = loadavg()

    base = DegradationConfig()
    variants = {
        "no USM": base,
        "USM separable": replace(base, usm=True),
        "USM dense 51x51": replace(base, usm=True, usm_separable=False),
    }
    if args.kornia:
        variants["no USM, kornia JPEG"] = replace(base, jpeg_backend="kornia")
    hq = hq_batch(args.batch, args.size, seed=0).to(args.device)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    draws = [draw_kernels(rng, base) for _ in range(args.batch * 20)]
    draw_ms = (time.perf_counter() - t0) / len(draws) * 1e3
    kernels = {k: torch.stack([torch.from_numpy(d[k]) for d in draws[: args.batch]]) for k in draws[0]}
    degraders = {name: RealESRGANDegradation(cfg, args.device) for name, cfg in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(-1, args.reps):  # rep -1 warms up
        for name, degrade in degraders.items():
            batch = {"hq": hq, **kernels}
            gen = torch.Generator().manual_seed(rep)
            if args.device != "cpu":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            lq, gt = degrade(batch, gen)
            if args.device != "cpu":
                torch.cuda.synchronize()
            if rep >= 0:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    assert lq.shape == (args.batch, 3, args.size // 4, args.size // 4)

    results = {}
    for name, ts in times.items():
        rate = args.batch * len(ts) / sum(ts)
        # What the same work would take with `threads` cores to itself: CPU seconds over threads (an estimate that
        # assumes perfect thread scaling; wall clock is the measurement, this shows how much load distorted it).
        cpu_rate = args.batch * len(ts) * args.threads / sum(cpu[name])
        anchor = ANCHOR["usm" if name.startswith("USM") else "no_usm"]
        results[name] = {"images_per_s": rate, "median_batch_s": statistics.median(ts), "vs_anchor": rate / anchor,
                         "cpu_s_per_batch": sum(cpu[name]) / len(ts), "unloaded_estimate_images_per_s": cpu_rate,
                         "unloaded_estimate_vs_anchor": cpu_rate / anchor}  # fmt: skip
    report = {
        "benchmark": "degradation",
        "batch": args.batch,
        "hq": args.size,
        "lq": args.size // 4,
        "reps": args.reps,
        "device": args.device,
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "kernel_draw_ms_per_sample": draw_ms,
        "anchor_images_per_s": ANCHOR,
        "results": results,
        "usm_separable_over_dense": (
            results["USM separable"]["images_per_s"] / results["USM dense 51x51"]["images_per_s"]
        ),
    }
    print(f"degradation, batch {args.batch}, HQ {args.size} -> LQ {args.size // 4}, {args.reps} batches each, "
          f"{args.device}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; load before {load_before}, "
          f"after {report['loadavg_after']}")  # fmt: skip
    print(f"{'variant':<22} {'images/s':>9} {'median s/batch':>15} {'vs anchor':>10} {'CPU s/batch':>12} "
          f"{'CPU-time img/s':>15} {'vs anchor':>10}")  # fmt: skip
    for name, r in results.items():
        print(f"{name:<22} {r['images_per_s']:9.2f} {r['median_batch_s']:15.3f} {r['vs_anchor']:9.2f}x "
              f"{r['cpu_s_per_batch']:12.2f} {r['unloaded_estimate_images_per_s']:15.2f} "
              f"{r['unloaded_estimate_vs_anchor']:9.2f}x")  # fmt: skip
    print(f"separable USM over dense USM in this run: {report['usm_separable_over_dense']:.2f}x; kernel draws "
          f"(loader workers): {draw_ms:.2f} ms per sample")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
