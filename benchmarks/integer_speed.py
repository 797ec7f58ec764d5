"""Integer execution vs fp32 and bf16, per component (encoder, DiT, decoder), side by side in one run (not a test).

    PYTHONPATH=. python benchmarks/integer_speed.py --out benchmarks/results/integer_speed.json
    PYTHONPATH=. python benchmarks/integer_speed.py --speed-preset tiny --sizes 32 --reps 1 --tiny-sizes  # smoke

Compressing the 0.6B model twice takes minutes; `--work-dir DIR` keeps the folders for the next run (seeded).

1. Kernels: the candidate CPU kernels at the DiT's and the decoder's shapes (the reasons for the choice).
2. Speed at real width: `--speed-preset` (sana-0.6b) with random weights, min-max W8A8 and W4A8 with no fine-tune,
   compressed, written as a pipeline folder and loaded back with execution="int"; then for each LQ side (128 -> 512,
   256 -> 1024 with upscale's default tiling) every component runs in turn for each variant, round-robin over
   `--reps` (same inputs, same threads), in a process with glibc's default allocator: what a user's process has.
   Memory, in a second process of this script (`--memory-pass`, one call each): the bytes each variant's component
   holds, and the peak resident memory a call adds, sampled every 2 ms with glibc's pooling off (the mmap threshold
   fixed at 128 KiB, so that the resident set follows what is alive). Timing under that setting would charge every
   intermediate tensor its page faults: it measured W8A8's DiT at 1.40x fp32 where the default allocator gives
   2.50x (same folders, same inputs), and the sampling thread takes CPU from the two cores.
3. The same speed table at the tiny preset's widths (where int8 kernels do not pay).
Quality (the integer path against its fake-quant reference) is benchmarks/integer_quality.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import PeakRSS, ensure_unpooled_malloc, module_bytes  # noqa: E402

if "--memory-pass" in sys.argv:
    ensure_unpooled_malloc()

import subprocess  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import loadavg, machine_info, photos  # noqa: E402

from compress import QuantizeConfig  # noqa: E402
from sana_sr import SanaSRPipeline, build_pipeline  # noqa: E402
from sana_sr.model.pipeline import bicubic_upsample  # noqa: E402
from sana_sr.model.tiling import TileSettings  # noqa: E402
from sana_sr.quantization.compress import compress_pipeline  # noqa: E402
from sana_sr.quantization.folder import save_quantized_pipeline  # noqa: E402

SPEED_CONFIGS = {"int W8A8": (8, 8), "int W4A8": (4, 8)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# -- 1. kernels ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def kernel_table() -> dict:
    """ms per call of each candidate kernel at the sana-0.6b shapes, and its ratio to fp32."""
    torch.manual_seed(0)
    onednn, out = torch.ops.onednn, {}
    for tokens, k, n in ((256, 1152, 5760), (1024, 2880, 1152)):
        x, w = torch.randn(tokens, k), torch.randn(n, k) * 0.05
        xu, w8, ws = torch.randint(0, 256, (tokens, k), dtype=torch.uint8), torch.randint(-127, 128, (n, k),
                                                                                          dtype=torch.int8), torch.rand(n)
        packed, zeros = onednn.qlinear_prepack(w8, None), torch.zeros(n, dtype=torch.long)
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        sz = torch.rand(k // 32, n, 2).bfloat16()
        xi, wi = torch.randint(-128, 128, (tokens, k), dtype=torch.int8), torch.randint(-128, 128, (k, n),
                                                                                         dtype=torch.int8)
        row = {"fp32 F.linear": timed(lambda: F.linear(x, w)),
               "bf16 F.linear": timed(lambda: F.linear(x.bfloat16(), w.bfloat16())),
               "oneDNN qlinear u8xs8 (chosen)": timed(lambda: onednn.qlinear_pointwise(
                   xu, 0.01, 0, packed, ws, zeros, None, 1.0, 0, torch.float32, "none", [], "")),
               "torch._int_mm s8xs8": timed(lambda: torch._int_mm(xi, wi)),
               "int4 weight-only (_weight_int4pack_mm_for_cpu, bf16 act, g32)": timed(
                   lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), w4, 32, sz)),
               "int8 weight-only (_weight_int8pack_mm, bf16 act)": timed(
                   lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w8, ws.bfloat16()))}
        out[f"linear {tokens}x{k} -> {n}"] = row
    for name, cin, cout, ksize, groups, side in (("3x3 conv 128->128 @128x128", 128, 128, 3, 1, 128),
                                                ("1x1 conv 1024->4096 @32x32", 1024, 4096, 1, 1, 32),
                                                ("3x3 depthwise 5760 @16x16", 5760, 5760, 3, 5760, 16)):
        x, w = torch.randn(1, cin, side, side), torch.randn(cout, cin // groups, ksize, ksize) * 0.05
        pad = ksize // 2
        xu = torch.randint(0, 256, x.shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        ws, zeros = torch.rand(cout), torch.zeros(cout, dtype=torch.long)
        packed = onednn.qconv_prepack(torch.randint(-127, 128, w.shape, dtype=torch.int8), ws, 0.02, 0, [1, 1],
                                      [pad, pad], [1, 1], groups, [1, cin, 32, 32])  # as IntegerLayer packs
        xcl = x.contiguous(memory_format=torch.channels_last)
        out[name] = {"fp32 F.conv2d": timed(lambda: F.conv2d(x, w, None, 1, pad, 1, groups)),
                     "bf16 F.conv2d (channels-last)": timed(
                         lambda: F.conv2d(xcl.bfloat16(), w.bfloat16(), None, 1, pad, 1, groups)),
                     "oneDNN qconv u8xs8 (chosen)": timed(lambda: onednn.qconv_pointwise(
                         xu, 0.02, 0, packed, ws, zeros, None, [1, 1], [pad, pad], [1, 1], groups, 1.0, 0,
                         torch.float32, "none", [], ""))}
    for row in out.values():
        fp32 = next(iter(row.values()))
        for key in list(row):
            row[key] = {"ms": round(row[key], 3), "speedup_vs_fp32": round(fp32 / row[key], 2)}
    return out


# -- 2./3. speed per component ---------------------------------------------------------------------------------------
def lq_image(side: int) -> torch.Tensor:
    """A real photo, centre crop of 4·side, area-downscaled to side x side (values in [0, 1])."""
    a = torch.from_numpy(photos(512)[0].copy()).permute(2, 0, 1).float()[None] / 255
    h, w = a.shape[2:]
    crop = min(4 * side, h, w)
    a = a[:, :, (h - crop) // 2:(h - crop) // 2 + crop, (w - crop) // 2:(w - crop) // 2 + crop]
    return F.interpolate(a, size=(side, side), mode="area")


@torch.no_grad()
def speed_section(preset: str, sizes: list[int], reps: list[int], work: Path, prepare_only: bool = False,
                  calib_side: int = 32, encoder_sizes: tuple[int, ...] | None = None, memory: bool = False) -> dict:
    """Seconds per call of every component and variant (`memory`: instead, one call each under PeakRSS, and the
    bytes each component holds)."""
    log(f"{preset}: building (random weights), compressing {list(SPEED_CONFIGS)} with min-max, no fine-tune")
    fp32 = build_pipeline(preset, weights="random", text_encoder=False)
    fp32.set_progress_bar_config(disable=True)
    tiling = TileSettings()  # `sana-sr upscale`'s defaults
    embeds, mask = fp32.encode_prompt(None, 1)
    # Calibration (min-max ranges) on a small LQ: random weights, and its passes are the slow part of compressing.
    with torch.no_grad():
        calib_latents = fp32.encode(bicubic_upsample(lq_image(calib_side), 4 * calib_side, 4 * calib_side) * 2 - 1)
    calib = [dict(latents=calib_latents, prompt_embeds=embeds, prompt_mask=mask)]
    variants = {"fp32": fp32}
    loads = {}
    for name, (wbits, abits) in SPEED_CONFIGS.items():
        folder = work / f"{preset}-{name.replace(' ', '_')}"
        reused = (folder / "compression.json").is_file()  # a complete folder of an earlier run: same seed, same data
        if not reused:
            pipe = copy.deepcopy(fp32)
            compress_pipeline(pipe, QuantizeConfig(method="minmax", wbits=wbits, abits=abits), calib)
            save_quantized_pipeline(pipe, folder, report=dict(benchmark="integer_speed", preset=preset, seed=0))
            del pipe
        if prepare_only:
            continue
        with PeakRSS() as p:
            loaded = SanaSRPipeline.from_pretrained(folder, execution="int")
        loaded.set_progress_bar_config(disable=True)
        loads[name] = {"summary": loaded.integer_summary.line(), "folder_from_earlier_run": reused}
        if memory:
            loads[name]["load_extra_rss_bytes"] = p.extra
        variants[name] = loaded
        log(f"  {name}: {loads[name]['summary']}")
    if prepare_only:
        return {}
    inputs = {}
    for side in sizes:
        up = bicubic_upsample(lq_image(side), 4 * side, 4 * side) * 2 - 1
        with fp32.ae_tiling(tiling):
            latents = fp32.encode(up)
        inputs[side] = (up, latents)
    bf16 = copy.deepcopy(fp32)
    bf16.transformer.to(torch.bfloat16)
    bf16.vae.to(torch.bfloat16)
    variants = {"fp32": fp32, "bf16": bf16, **{k: v for k, v in variants.items() if k != "fp32"}}

    def run(pipe, component: str, side: int):
        up, latents = inputs[side]
        if component == "encoder":
            with pipe.ae_tiling(tiling):
                return pipe.encode(up)
        if component == "dit":
            return pipe.restore_latents(latents, embeds, mask, tiling)
        with pipe.ae_tiling(tiling):
            return pipe.decode(latents)

    components = {"encoder": ("fp32", "bf16"), "dit": tuple(variants), "decoder": tuple(variants)}
    results = {}
    # Warm-up of the integer variants, untimed: their layers build oneDNN primitives and edge strips on the first
    # call of each shape (the larger sizes' AE tiles have the smallest size's shape).
    for component in ("dit", "decoder"):
        for name in SPEED_CONFIGS:
            run(variants[name], component, sizes[0])
    for side, side_reps in zip(sizes, [1] * len(sizes) if memory else reps):
        key = f"{side}->{4 * side}"
        timed = {c: vs for c, vs in components.items() if c != "encoder" or encoder_sizes is None
                 or side in encoder_sizes}
        results[key] = {c: {v: {"s": [], "extra_rss_bytes": []} for v in vs} for c, vs in timed.items()}
        for rep in range(side_reps):
            for component, names in timed.items():
                for name in names:
                    cell = results[key][component][name]
                    if memory:
                        with PeakRSS() as p:
                            run(variants[name], component, side)
                        cell["extra_rss_bytes"].append(p.extra)
                        continue
                    start = time.perf_counter()
                    run(variants[name], component, side)
                    cell["s"].append(round(time.perf_counter() - start, 4))
            log(f"  {key} rep {rep + 1}/{side_reps} done (load {loadavg().split()[0]})")
    weights = {}
    for name, pipe in variants.items():
        weights[name] = {"encoder": module_bytes(pipe.vae.encoder), "dit": module_bytes(pipe.transformer),
                         "decoder": module_bytes(pipe.vae.decoder)}
    for key, table in results.items():
        for component, cells in table.items():
            for name, cell in cells.items():
                if memory:
                    cell.pop("s")
                    cell["peak_extra_rss_mib"] = round(max(cell.pop("extra_rss_bytes")) / 2**20, 1)
                    cell["weights_mib"] = round(weights[name][component] / 2**20, 1)
                else:
                    cell.pop("extra_rss_bytes")
                    cell["median_s"] = statistics.median(cell["s"])
            if not memory:
                fp32_s = cells["fp32"]["median_s"]
                for cell in cells.values():
                    cell["speedup_vs_fp32"] = round(fp32_s / cell["median_s"], 2)
    return {"preset": preset, "tiling": vars(tiling), "loads": loads, "results": results}


def merge_memory(timed: dict, memory: dict) -> None:
    """The memory pass's numbers into the timed section's cells (and the load's peak growth into its loads)."""
    for name, load in memory["loads"].items():
        timed["loads"][name]["load_extra_rss_bytes"] = load["load_extra_rss_bytes"]
    for key, table in memory["results"].items():
        for component, cells in table.items():
            for name, cell in cells.items():
                timed["results"][key][component][name].update(cell)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed-preset", default="sana-0.6b")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="LQ sides (output x4)")
    parser.add_argument("--reps", type=int, nargs="+", default=[2, 1],
                        help="timed round-robin reps per size (the last value repeats)")
    parser.add_argument("--prepare-only", action="store_true", help="write the compressed folders to --work-dir, "
                        "then stop (compressing the 0.6B model twice takes minutes on two cores)")
    parser.add_argument("--encoder-sizes", type=int, nargs="*", help="LQ sides at which the encoder is timed "
                        "(default: all; it is the same module in every variant but bf16)")
    parser.add_argument("--calib-side", type=int, default=32, help="LQ side of the calibration image")
    parser.add_argument("--tiny-sizes", type=int, nargs="*", default=[128], help="LQ sides of the tiny speed table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, help="keep the compressed folders here and reuse them in later "
                        "runs (the random weights and the calibration are seeded: the same folders); default: temp")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--memory-pass", action="store_true", help="(run by this script in a second process) "
                        "measure memory only, with glibc's pooling off, and write the sections to --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"benchmark": "integer execution", "machine": machine_info(), "loadavg_before": loadavg(),
              "threads": args.threads}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        reps = (args.reps + args.reps[-1:] * len(args.sizes))[:len(args.sizes)]
        if args.prepare_only:
            speed_section(args.speed_preset, args.sizes, reps, work, True, args.calib_side)
            log(f"compressed folders written to {work}")
            return 0
        encoder_sizes = tuple(args.encoder_sizes) if args.encoder_sizes else None
        sections = {"speed": (args.speed_preset, args.sizes, args.calib_side, encoder_sizes)}
        if args.tiny_sizes:
            sections["speed_tiny"] = ("tiny", args.tiny_sizes, min(args.calib_side, 32), None)
        if args.memory_pass:
            Path(args.out).write_text(json.dumps({
                key: speed_section(preset, sizes, reps, work, False, calib, enc, memory=True)
                for key, (preset, sizes, calib, enc) in sections.items()}))
            return 0
        log("kernels")
        report["kernels"] = kernel_table()
        for key, (preset, sizes, calib, enc) in sections.items():
            report[key] = speed_section(preset, sizes, reps, work, False, calib, enc)
        log("memory: a second process of this script, glibc's pooling off")
        memory_json = Path(tmp) / "memory.json"
        subprocess.run([sys.executable, __file__, "--memory-pass", "--work-dir", str(work), "--out", str(memory_json),
                        "--speed-preset", args.speed_preset, "--sizes", *map(str, args.sizes), "--calib-side",
                        str(args.calib_side), "--threads", str(args.threads),
                        "--tiny-sizes", *map(str, args.tiny_sizes)]
                       + (["--encoder-sizes", *map(str, encoder_sizes)] if encoder_sizes else []), check=True)
        for key, section in json.loads(memory_json.read_text()).items():
            merge_memory(report[key], section)
    report["loadavg_after"] = loadavg()
    report["seconds"] = round(time.perf_counter() - start, 1)
    for section in ("speed", "speed_tiny"):
        for key, table in report.get(section, {}).get("results", {}).items():
            print(f"{report[section]['preset']} {key}:")
            for component, cells in table.items():
                print("  " + f"{component:<8}" + "  ".join(
                    f"{n} {c['median_s']:.3f}s ({c['speedup_vs_fp32']:.2f}x, {c['weights_mib']:.0f}+"
                    f"{c['peak_extra_rss_mib']:.0f} MiB)" for n, c in cells.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    table = report["speed"]["results"][f"{args.sizes[0]}->{4 * args.sizes[0]}"]
    print(f"load {report['loadavg_before']} -> {report['loadavg_after']}; {report['seconds']} s")
    print("W8A8 speed-up over fp32 at {}: DiT {:.2f}x, decoder {:.2f}x".format(
        f"{args.sizes[0]}->{4 * args.sizes[0]}", table["dit"]["int W8A8"]["speedup_vs_fp32"],
        table["decoder"]["int W8A8"]["speedup_vs_fp32"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
