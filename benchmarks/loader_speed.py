"""Loader throughput next to the raw JPEG-decode throughput of the same shards (not a test).

    PYTHONPATH=. python benchmarks/loader_speed.py [--copies 8] [--samples 320] [--workers 0 1 2] [--rounds 3]

Both sides run in one process, round-robin (`--rounds` times: the raw decode, then each loader), on the same shards,
so that the machine's load hits them alike; the last line is the loader's rate (0 workers: the same single
process as the raw decode) over the raw decode rate, the limit the loader can reach. Shards are written with `sana-sr shards --reencode jpg` from real photos (each photo `--copies` times). "raw decode"
is one process reading the shards and decoding every JPEG in full (Pillow, as the loader); the loader, configured
as the trainer configures it (uint8 pixels out: the degradation makes the floats on the training device), adds the
random 512 crop, flips, per-sample kernel draws, batching (16) and the transfer from its worker processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import loadavg, machine_info, photo_paths  # noqa: E402

from sana_sr.data import DegradationConfig, make_loader  # noqa: E402
from sana_sr.data.samples import SkipCounter, read_shard  # noqa: E402
from sana_sr.data.shards import ShardOptions, write_shards  # noqa: E402
from sana_sr.data.streaming import LoaderConfig  # noqa: E402


def build_shards(folder: Path, copies: int) -> Path:
    src = folder / "src"
    for k in range(copies):
        (src / f"copy{k}").mkdir(parents=True)
        for path in photo_paths(512):
            os.symlink(path, src / f"copy{k}" / path.name)
    out = folder / "shards"
    write_shards([src], out, ShardOptions(max_count=10, min_size=512, reencode="jpg", quality=95, workers=2,
                                          progress=False))  # fmt: skip
    return out


def raw_decode(shards: Path, images: int) -> dict:
    """Read the shards in order (again from the first when they run out) and decode `images` JPEGs in full."""
    from io import BytesIO

    from PIL import Image

    urls = [str(shards / name) for name in json.loads((shards / "sizes.json").read_text())]
    counter = SkipCounter()

    def jpegs():
        while True:
            for url in urls:
                yield from (sample["jpg"] for sample in read_shard(url, counter))

    count, pixels = 0, 0
    start, start_cpu = time.perf_counter(), time.process_time()
    for data in itertools.islice(jpegs(), images):
        with Image.open(BytesIO(data)) as im:
            rgb = im.convert("RGB")
            pixels += rgb.width * rgb.height
        count += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"images": count, "images_per_s": count / wall, "cpu_s_per_image": cpu / count,
            "mean_megapixels": pixels / count / 1e6}  # fmt: skip


def loader_rate(shards: Path, workers: int, samples: int) -> dict:
    config = LoaderConfig(batch_size=16, num_workers=workers, crop_size=512, epoch_samples=samples, seed=0,
                          hq_uint8=True)  # fmt: skip
    loader = make_loader(shards, config, degradation=DegradationConfig(), rank=0, world_size=1)
    start = time.perf_counter()
    count = 0
    first = None
    for batch in loader:
        count += batch["hq"].shape[0]
        if first is None:
            first = time.perf_counter() - start
    wall = time.perf_counter() - start
    return {"workers": workers, "images": count, "images_per_s": count / wall, "first_batch_s": first,
            "steady_images_per_s": (count - 16) / (wall - first) if count > 16 else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=8, help="times each photo goes into the shards")
    parser.add_argument("--samples", type=int, default=320, help="images per run, raw decode and each loader alike")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (medians are reported)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_shards(Path(tmp), args.copies)
        rounds = []
        for _ in range(args.rounds):
            rounds.append({"raw": raw_decode(shards, args.samples), "loaders": [loader_rate(shards, w, args.samples)
                                                                  for w in args.workers]})
            print(f"round {len(rounds)}/{args.rounds} (load {loadavg().split()[0]})", flush=True)

    def median_run(runs: list[dict]) -> dict:
        return sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2]

    raw = median_run([r["raw"] for r in rounds])
    loaders = [median_run([r["loaders"][i] for r in rounds]) for i in range(len(args.workers))]
    report = {"benchmark": "loader", "machine": machine_info(), "loadavg_before": load_before,
              "loadavg_after": loadavg(), "raw_decode": raw, "loader": loaders, "rounds": rounds}  # fmt: skip
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; load before {load_before}, "
          f"after {report['loadavg_after']}")  # fmt: skip
    print(f"raw JPEG decode, 1 process: {raw['images_per_s']:.1f} images/s ({raw['images']} images, "
          f"{raw['mean_megapixels']:.2f} MP mean, {raw['cpu_s_per_image'] * 1e3:.1f} CPU ms each)")  # fmt: skip
    for r in loaders:
        steady = f"{r['steady_images_per_s']:.1f}" if r["steady_images_per_s"] else "n/a"
        ratio = r["images_per_s"] / raw["images_per_s"]
        print(f"loader, {r['workers']} workers: {r['images_per_s']:.1f} images/s overall, {steady} after the first "
              f"batch ({r['first_batch_s']:.2f} s); {ratio:.2f}x raw decode")  # fmt: skip
    ratio = loaders[0]["images_per_s"] / raw["images_per_s"]
    report["ratio_loader_over_raw_decode"] = ratio
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"loader ({loaders[0]['workers']} workers) / raw JPEG decode of the same shards: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
