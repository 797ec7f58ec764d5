"""Degradation throughput against Real-ESRGAN's own code, side by side in one run (not a test).

    PYTHONPATH=. python benchmarks/degradation_speed.py [--reps 6] [--threads 2] [--out r.json]

Both sides get the same HQ batch (the anchor's: 16 fixed 512² crops of scikit-image photos, `load_hq_batch`), the
same seeds (rep r uses seed r for both), the same torch thread count, and run round-robin (one batch of each variant
in turn), so that the machine's load hits them alike. Upstream is `degrade()` from ../shared/anchors/
realesrgan_degrade/bench.py (BasicSR's kernels + Real-ESRGAN's `feed_data`, x4plus); ours is
`RealESRGANDegradation` with its per-sample kernel draws counted in (upstream's `degrade` draws its kernels too).
Our training-pair queue is off (the anchor has none). Variants: no USM; USM (upstream: two dense 51x51 convolutions;
ours: separable, and, for the record, dense). Also compared: the LQ output statistics (the anchor's own
`per_image_stats`, averaged over the timed batches). The last line is the ratio, ours over upstream.
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
from machine import loadavg, machine_info  # noqa: E402

from sana_sr.data.degradation import DegradationConfig, RealESRGANDegradation  # noqa: E402
from sana_sr.data.kernels import draw_kernels  # noqa: E402

ANCHOR_DIR = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "realesrgan_degrade"


def import_anchor():
    if not (ANCHOR_DIR / "bench.py").is_file():
        raise SystemExit(f"{ANCHOR_DIR / 'bench.py'} not found: the upstream anchor lives in ../shared/anchors")
    sys.path.insert(0, str(ANCHOR_DIR))
    import bench

    return bench


def ours(config: DegradationConfig, device: str):
    degrade = RealESRGANDegradation(config, device)

    def run(hq: torch.Tensor, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        draws = [draw_kernels(rng, config) for _ in range(hq.shape[0])]
        batch = {"hq": hq, **{k: torch.from_numpy(np.stack([d[k] for d in draws])) for k in draws[0]}}
        lq, _ = degrade(batch, torch.Generator().manual_seed(seed))
        return lq  # in [0, 1], rounded to 8-bit levels, as upstream

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=6, help="timed batches per variant (seeds 1..reps)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, both sides")
    parser.add_argument("--no-dense", action="store_true", help="skip our dense-USM variant")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = import_anchor()
    load_before = loadavg()
    hq = bench.load_hq_batch()
    base = replace(DegradationConfig(), queue_size=0)
    variants = {
        "upstream, no USM": lambda h, s: bench.degrade(h, s, use_usm=False),
        "ours, no USM": ours(base, "cpu"),
        "upstream, USM": lambda h, s: bench.degrade(h, s, use_usm=True),
        "ours, USM (separable)": ours(replace(base, usm=True), "cpu"),
    }
    if not args.no_dense:
        variants["ours, USM (dense 51x51)"] = ours(replace(base, usm=True, usm_separable=False), "cpu")
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    stats = {name: [] for name in variants}
    for rep in range(args.reps + 1):  # rep 0 warms up (seed 0), untimed
        for name, run in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            lq = run(hq.clone(), rep)
            if rep:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                stats[name].append({k: float(np.mean(v)) for k, v in bench.per_image_stats(lq.float()).items()})
        print(f"rep {rep}/{args.reps} (load {loadavg().split()[0]})", flush=True)
    assert lq.shape == (hq.shape[0], 3, hq.shape[2] // 4, hq.shape[3] // 4)
    batch = hq.shape[0]
    results = {}
    for name, ts in times.items():
        results[name] = {"images_per_s": batch * len(ts) / sum(ts), "median_batch_s": statistics.median(ts),
                         "batch_s": [round(t, 3) for t in ts], "cpu_s_per_batch": sum(cpu[name]) / len(ts),
                         "lq_stats": {k: round(float(np.mean([s[k] for s in stats[name]])), 4)
                                      for k in stats[name][0]}}  # fmt: skip
    rate = {name: r["images_per_s"] for name, r in results.items()}
    ratios = {"no USM": rate["ours, no USM"] / rate["upstream, no USM"],
              "USM": rate["ours, USM (separable)"] / rate["upstream, USM"]}
    report = {"benchmark": "degradation vs Real-ESRGAN upstream, same run", "batch": batch,
              "hq": list(hq.shape[2:]), "reps": args.reps, "threads": args.threads, "machine": machine_info(),
              "loadavg_before": load_before, "loadavg_after": loadavg(), "results": results,
              "ratio_ours_over_upstream": ratios}  # fmt: skip
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, {args.threads} threads; "
          f"load before {load_before}, after {report['loadavg_after']}")  # fmt: skip
    print(f"{'variant':<26} {'images/s':>9} {'median s/batch':>15} {'CPU s/batch':>12}  LQ mean/std/lap_abs")
    for name, r in results.items():
        s = r["lq_stats"]
        print(f"{name:<26} {r['images_per_s']:9.2f} {r['median_batch_s']:15.3f} {r['cpu_s_per_batch']:12.2f}  "
              f"{s['mean']:.3f}/{s['std']:.3f}/{s['lap_abs']:.4f}")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"ratio ours/upstream (images/s): no USM {ratios['no USM']:.2f}x, USM {ratios['USM']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
