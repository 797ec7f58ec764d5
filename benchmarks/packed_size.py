"""Packed size of the compressed DiT at the real width: `sana-0.6b`'s DiT (random weights) packed at W4 and W2,
bytes on disk against the fp16 file of the same DiT, both written in one run (not a test).

    PYTHONPATH=. python benchmarks/packed_size.py [--bits 4 2] [--out r.json]

The DiT is compressed the way `sana-sr compress` does it (min-max: 2DQuant and SPR²Q export the same bytes at equal
bits; timestep MLP folded, first and last layer at 8 bits), with the tiny preset's DC-AE as the decoder half (same
32 latent channels; its bytes are not counted). Reported: `transformer/` export (weights.safetensors +
layout.json) against (a) the DiT as it was, saved as plain fp16 safetensors, and (b) the same after folding the
timestep MLP (so the ratio of quantization alone shows). Limits are 4x (W4) and 8x (W2): 16 bits over b.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import loadavg, machine_info  # noqa: E402

from compress import QuantizeConfig, export_size, fp16_reference_bytes, read_layout  # noqa: E402
from sana_sr import build_pipeline, get_preset  # noqa: E402
from sana_sr.quantization.compress import compress_pipeline  # noqa: E402
from sana_sr.quantization.folder import save_quantized_pipeline  # noqa: E402
from sana_sr.quantization.sana import fold_timestep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--preset", default="sana-0.6b", help="whose DiT")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    load_before, start = loadavg(), time.perf_counter()
    preset = dataclasses.replace(get_preset("tiny"), name=f"{args.preset}-dit", vae_id=None, base_id=None,
                                 transformer=get_preset(args.preset).transformer)
    base = build_pipeline(preset, text_encoder=False)
    base.set_progress_bar_config(disable=True)
    dit = base.transformer
    params = sum(p.numel() for p in dit.parameters())
    g = torch.Generator().manual_seed(0)
    calib = [dict(latents=torch.randn(1, 32, 8, 8, generator=g),
                  prompt_embeds=torch.randn(1, 32, dit.config.caption_channels, generator=g),
                  prompt_mask=torch.ones(1, 32))]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp16 = fp16_reference_bytes(dit, tmp)
        folded = copy.deepcopy(dit)
        fold_timestep(folded, base.timestep)
        fp16_folded = fp16_reference_bytes(folded, tmp)
        del folded
        for bits in args.bits:
            pipe = copy.deepcopy(base)
            compress_pipeline(pipe, QuantizeConfig(method="minmax", wbits=bits, abits=bits), calib)
            save_quantized_pipeline(pipe, tmp / f"w{bits}", report={})
            size = export_size(tmp / f"w{bits}" / "transformer")
            summary = read_layout(tmp / f"w{bits}" / "transformer")["summary"]
            results[f"W{bits}"] = {"export_bytes": size, "vs_fp16": fp16 / size, "vs_fp16_folded": fp16_folded / size,
                                   "limit": 16 / bits, "bits_per_weight": summary["bits_per_weight"],
                                   "file_bits_per_param": 8 * size / params}
            del pipe
            print(f"W{bits}: {size:,} B, {fp16 / size:.3f}x vs fp16 ({fp16_folded / size:.3f}x vs the folded fp16 "
                  f"DiT), limit {16 / bits:.0f}x", flush=True)
    report = {"benchmark": "packed size at real width", "preset": args.preset, "dit_params": params,
              "fp16_bytes": fp16, "fp16_folded_bytes": fp16_folded, "method": "minmax (= 2dquant, spr2q sizes)",
              "machine": machine_info(), "loadavg_before": load_before, "loadavg_after": loadavg(),
              "seconds": round(time.perf_counter() - start, 1), "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{args.preset} DiT, {params:,} parameters, fp16 file {fp16:,} B")
    print("ratio vs fp16: " + ", ".join(f"{k} {v['vs_fp16']:.2f}x (limit {v['limit']:.0f}x)" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
