"""A compressed SANA-SR pipeline on disk: a diffusers pipeline folder whose DiT and DC-AE are the quantized classes
of `sana_sr.quantization.components`, plus the report of what was done.

    OUT_DIR/
      model_index.json            names every component's class, e.g. transformer =
                                  ["sana_sr.quantization.components", "QuantizedSanaTransformer2DModel"]
      transformer/                config.json, layout.json + weights.safetensors (the DiT's packed export)
      vae/                        config.json, layout.json + weights.safetensors (the decoder's packed export),
                                  encoder.safetensors (full precision)
      scheduler/  default_prompt/ as in any pipeline folder
      text_encoder/ tokenizer/    only with --keep-text-encoder
      compression.json            what was done: method, bits, plan with reasons, sizes, bits/param, command

It loads through `SanaSRPipeline.from_pretrained` (or `load_pipeline`) like any pipeline folder.
"""

from __future__ import annotations

import json
import os

from compress import export_size, read_layout
from sana_sr.atomic import atomic_directory
from sana_sr.model.pipeline import SanaSRPipeline
from sana_sr.quantization.components import QuantizedComponent

REPORT_FILE = "compression.json"
QUANTIZED_COMPONENTS = ("transformer", "vae")


def save_quantized_pipeline(pipe: SanaSRPipeline, out_dir: str | os.PathLike, *, report: dict,
                            overwrite: bool = False) -> dict:
    """Write `pipe` (its DiT and DC-AE made quantized classes by `compress_pipeline`) and `report` atomically
    (an existing `out_dir` only if `sana-sr compress` wrote it, or with `overwrite`).

    Returns the report's `export` entry: bytes on disk of the packed exports (layout.json + weights.safetensors of
    each quantized component; the full-precision encoder is not part of it), per component, and their summary."""
    for name in QUANTIZED_COMPONENTS:
        if not isinstance(getattr(pipe, name), QuantizedComponent):
            raise TypeError(f"pipe.{name} is a {type(getattr(pipe, name)).__name__}, not a quantized component: "
                            "compress it with compress_pipeline first")
    with atomic_directory(out_dir, "sana-sr compress", overwrite=overwrite) as tmp:
        pipe.write_folder(tmp)
        sizes = {name: export_size(tmp / name) for name in QUANTIZED_COMPONENTS}
        summaries = [read_layout(tmp / name)["summary"] for name in QUANTIZED_COMPONENTS]
        weights = sum(s["quantized_weights"] for s in summaries)
        # Weighted by each export's quantized weights: the bits/weight of the two exports together.
        bits = sum(s["bits_per_weight"] * s["quantized_weights"] for s in summaries) / weights if weights else 0.0
        export = dict(bytes=sum(sizes.values()), components=sizes,
                      summary=dict(quantized_weights=weights, bits_per_weight=round(bits, 4)))
        (tmp / REPORT_FILE).write_text(json.dumps(dict(report, export=export), indent=1) + "\n")
    return export
