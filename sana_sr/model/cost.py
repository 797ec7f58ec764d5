"""`sana-sr cost`: parameters and MACs per component, and the latency and peak memory of a real forward.

MACs are counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device (shapes only: the 0.6B and
1.6B stacks need no weights and no memory) and halved (one multiply-accumulate = 2 FLOPs). What is counted is
every matrix product and convolution (aten mm / addmm / bmm / baddbmm / convolution, and scaled-dot-product
attention, which on the meta device runs as bmm): the linear layers, SANA's ReLU linear attention (its two
matmuls with the padded value row), the softmax cross-attention to the text tokens, the DC-AE's convolutions and its
multi-scale linear attention. Not counted: element-wise ops, normalisations, activations, softmax, resampling and
the embedding lookup, the usual MAC convention (and why counts here and in papers agree).

Latency is the median of N synchronised runs after a warm-up, on the current device, with random weights for a
preset (the cost does not depend on the values) or the saved weights of a model folder.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sana_sr.atomic import atomic_file
from sana_sr.dtypes import DTYPES

COMPONENTS = ("dc-ae encoder", "dit", "dc-ae decoder", "text encoder")


@dataclass
class MetaModel:
    """The shapes of a SANA-SR stack, built on the meta device."""

    vae: torch.nn.Module
    transformer: torch.nn.Module
    text_encoder: torch.nn.Module | None
    prompt_tokens: int
    """Text tokens fed to the cross-attention (SANA: 300)."""
    upscale: int


@dataclass
class ComponentCost:
    name: str
    params: int
    macs: int
    ops: dict[str, int] = field(default_factory=dict)
    """MACs per counted aten op."""


def meta_model(model: str) -> MetaModel:
    """A preset name or a saved pipeline folder (or hub id) as meta-device modules built from its configs.

    A saved model is rebuilt from its `vae/`, `transformer/` and `text_encoder/` configs; its LoRA adapter is left
    out (deployment merges it into the weights, which leaves the cost unchanged).
    """
    from sana_sr.model.loading import build_pipeline
    from sana_sr.model.presets import PRESETS

    if model in PRESETS:
        pipe = build_pipeline(model, weights="meta")
        return MetaModel(pipe.vae, pipe.transformer, pipe.text_encoder, PRESETS[model].max_sequence_length, 4)
    from diffusers import AutoencoderDC, DiffusionPipeline, SanaTransformer2DModel

    from sana_sr.model.components import check_pipeline_folder, component_class

    if Path(model).is_dir():
        check_pipeline_folder(model)
    index = DiffusionPipeline.load_config(model)
    transformer_config = SanaTransformer2DModel.load_config(model, subfolder="transformer")
    # The class the config names (unpruned, pruned or compressed: the same architecture in full precision).
    dit_class = component_class("transformer", str(transformer_config.get("_class_name")))
    with torch.device("meta"):
        vae = AutoencoderDC.from_config(AutoencoderDC.load_config(model, subfolder="vae"))
        transformer = dit_class.from_config(transformer_config)
        text_encoder = None
        if index.get("text_encoder", [None])[0] is not None:
            from transformers import AutoConfig, AutoModel

            text_encoder = AutoModel.from_config(AutoConfig.from_pretrained(model, subfolder="text_encoder"))
    return MetaModel(vae, transformer, text_encoder, int(index.get("max_sequence_length", 300)),
                     int(index.get("upscale", 4)))


def count_macs(fn) -> tuple[int, dict[str, int]]:
    """(total MACs, MACs per aten op) of running `fn()`."""
    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() // 2, per_op


def _params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def padded_size(model: MetaModel, height: int, width: int) -> tuple[int, int]:
    """The output size the pipeline actually runs at (padded up to the AE ratio x DiT patch)."""
    m = model.vae.spatial_compression_ratio * model.transformer.config.patch_size
    return -(-height // m) * m, -(-width // m) * m


def dit_cost(transformer: torch.nn.Module, latent_hw: tuple[int, int], prompt_tokens: int) -> ComponentCost:
    """Params and MACs of one DiT call (batch 1) on latents of `latent_hw` with `prompt_tokens` text tokens.

    Runs on the transformer's own device (meta: no memory); `sana_sr.pruning` costs its pruning plans with it.
    """
    device = next(transformer.parameters()).device
    latents = torch.empty(1, transformer.config.in_channels, *latent_hw, device=device)
    prompt = torch.empty(1, prompt_tokens, transformer.config.caption_channels, device=device)
    mask = torch.ones(1, prompt_tokens, device=device)
    timestep = torch.ones(1, device=device)
    with torch.no_grad():
        macs, ops = count_macs(lambda: transformer(
            latents, encoder_hidden_states=prompt, encoder_attention_mask=mask, timestep=timestep, return_dict=False))
    return ComponentCost("dit", _params(transformer), macs, ops)


def component_costs(model: MetaModel, height: int, width: int, text: bool = True) -> list[ComponentCost]:
    """Cost of each component for one image restored to `height` x `width` (batch 1); `text`: count the text
    encoder too (its cost does not depend on the image size)."""
    height, width = padded_size(model, height, width)
    ratio = model.vae.spatial_compression_ratio
    meta = torch.device("meta")
    image = torch.empty(1, 3, height, width, device=meta)
    latents = torch.empty(1, model.vae.config.latent_channels, height // ratio, width // ratio, device=meta)
    costs = []
    with torch.no_grad():
        macs, ops = count_macs(lambda: model.vae.encoder(image))
        costs.append(ComponentCost("dc-ae encoder", _params(model.vae.encoder), macs, ops))
        costs.append(dit_cost(model.transformer, latents.shape[2:], model.prompt_tokens))
        macs, ops = count_macs(lambda: model.vae.decoder(latents))
        costs.append(ComponentCost("dc-ae decoder", _params(model.vae.decoder), macs, ops))
        if model.text_encoder is not None and text:
            encoder = model.text_encoder
            if hasattr(encoder, "config"):
                encoder.config._attn_implementation = "eager"  # Gemma-2's soft-capping has no SDPA path
            tokens = torch.zeros(1, model.prompt_tokens, dtype=torch.long, device=meta)
            # No attention mask: the count does not depend on it, and a mask would need data on the meta device.
            macs, ops = count_macs(lambda: encoder(tokens))
            costs.append(ComponentCost("text encoder", _params(encoder), macs, ops))
    return costs


def parse_size(text: str) -> tuple[int, int]:
    """"512" -> (512, 512); "768x512" (width x height) -> (512, 768) as (height, width)."""
    try:
        if "x" in text.lower():
            w, h = (int(v) for v in text.lower().split("x"))
        else:
            w = h = int(text)
    except ValueError:
        raise ValueError(f"size must be N or WxH in pixels, got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return h, w


def cost_rows(model: MetaModel, sizes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    text: ComponentCost | None = None
    for i, (height, width) in enumerate(sizes):
        costs = {c.name: c for c in component_costs(model, height, width, text=i == 0)}
        if i == 0:
            text = costs.get("text encoder")
        elif text is not None:  # the same prompt tokens at every size: counted once
            costs["text encoder"] = text
        ph, pw = padded_size(model, height, width)
        ratio = model.vae.spatial_compression_ratio
        sr = sum(costs[n].macs for n in ("dc-ae encoder", "dit", "dc-ae decoder"))
        rows.append({
            "output": f"{width}x{height}", "lq": f"{width // model.upscale}x{height // model.upscale}",
            "tokens": (ph // ratio) * (pw // ratio) // model.transformer.config.patch_size ** 2,
            "components": {n: asdict(c) for n, c in costs.items()}, "sr_macs": sr,
        })
    return rows


def _g(macs: int) -> str:
    g = macs / 1e9
    return f"{g:,.2f}" if g >= 1 else f"{g:.4f}"


def markdown_table(model_name: str, model: MetaModel, rows: list[dict]) -> str:
    first = rows[0]["components"]
    params = " · ".join(f"{n} {first[n]['params'] / 1e6:,.1f}M" for n in COMPONENTS if n in first)
    lines = [
        f"Parameters of `{model_name}`: {params}.",
        "",
        "| output | LQ (x{0}) | DiT tokens | DC-AE encoder | DiT | DC-AE decoder | SR total | text encoder (once per prompt) |"
        .format(model.upscale),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        c = row["components"]
        text = _g(c["text encoder"]["macs"]) if "text encoder" in c else "–"
        lines.append(
            f"| {row['output']} | {row['lq']} | {row['tokens']:,} | {_g(c['dc-ae encoder']['macs'])} | "
            f"{_g(c['dit']['macs'])} | {_g(c['dc-ae decoder']['macs'])} | **{_g(row['sr_macs'])}** | {text} |"
        )
    lines += ["", "GMACs per image (batch 1); SR total = encoder + DiT + decoder."]
    return "\n".join(lines)


# -- latency and memory of the real forward ------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency(model: str, lq_hw: tuple[int, int], device: str, dtype: str, ae_dtype: str,
                    warmup: int = 3, repeats: int = 10) -> dict:
    """Median seconds of the whole restoration and of each stage, and peak memory, on `device`."""
    from sana_sr.model.loading import build_pipeline, load_pipeline
    from sana_sr.model.presets import PRESETS

    dev = torch.device(device)
    torch.manual_seed(0)
    # The null prompt's values do not change the latency: a one-layer encoder at the real width makes it cheaply.
    pipe = (build_pipeline(model, text_encoder=False, text_encoder_layers=1) if model in PRESETS
            else load_pipeline(model))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    if ae_dtype != "fp32":
        pipe.vae.to(DTYPES[ae_dtype])
    if dtype != "fp32":
        pipe.transformer.to(DTYPES[dtype])
    lq = torch.rand(1, 3, *lq_hw, device=dev)
    scale = pipe.config.upscale
    m = pipe.size_multiple
    h, w = -(-lq_hw[0] * scale // m) * m, -(-lq_hw[1] * scale // m) * m
    image = torch.rand(1, 3, h, w, device=dev) * 2 - 1
    with torch.no_grad():
        latents = pipe.encode(image)
        embeds, mask = pipe.encode_prompt(None, 1)
        stages = {
            "dc-ae encoder": lambda: pipe.encode(image),
            "dit": lambda: pipe.restore_latents(latents, embeds, mask),
            "dc-ae decoder": lambda: pipe.decode(latents),
        }
        result = {name: _median_seconds(fn, dev, warmup, repeats) for name, fn in stages.items()}
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        result["end to end"] = _median_seconds(lambda: pipe(lq), dev, warmup, repeats)
        finite = bool(torch.isfinite(pipe(lq)).all())
    if dev.type == "cuda":
        peak = {"peak_cuda_allocated_mib": torch.cuda.max_memory_allocated(dev) / 2**20}
    else:
        peak = {"peak_process_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return {"seconds": result, "output_finite": finite, "lq": f"{lq_hw[1]}x{lq_hw[0]}", "output": f"{w}x{h}",
            "device": device, "dit_dtype": dtype, "ae_dtype": ae_dtype, "warmup": warmup, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), **peak}


def latency_markdown(result: dict) -> str:
    s = result["seconds"]
    memory = (f"peak CUDA memory allocated {result['peak_cuda_allocated_mib']:,.0f} MiB"
              if "peak_cuda_allocated_mib" in result
              else f"peak process RSS {result['peak_process_rss_mib']:,.0f} MiB (weights included)")
    return "\n".join([
        f"Latency on {result['device']} ({result['lq']} -> {result['output']}, DiT {result['dit_dtype']}, "
        f"DC-AE {result['ae_dtype']}, median of {result['repeats']} after {result['warmup']} warm-up runs, "
        f"{result['torch_threads']} torch threads):",
        "",
        "| DC-AE encoder | DiT | DC-AE decoder | end to end |",
        "| ---: | ---: | ---: | ---: |",
        f"| {s['dc-ae encoder']:.4f} s | {s['dit']:.4f} s | {s['dc-ae decoder']:.4f} s | **{s['end to end']:.4f} s** |",
        "",
        memory + ("" if result["output_finite"] else "; **the output had NaN/inf values at this precision**") + ".",
    ])


def architecture(model: str) -> str:
    """What `--model` names, as meta_model reads it: a preset (bare, or `PRESET-random`: the cost does not depend on
    the weight values, so a bare preset is fine here) or a folder (`tiny-sr` is the shipped one's)."""
    from sana_sr.model.loading import random_preset, shipped_models

    return random_preset(model) or str(shipped_models().get(model, model))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sana-sr cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sana-0.6b", help="preset (an architecture: no weights needed), saved pipeline folder, hub id or tiny-sr "
                             "(default sana-0.6b)")
    parser.add_argument("--size", nargs="+", default=["512"], help="output sizes, N or WxH (default 512)")
    parser.add_argument("--output", type=Path, help="also write the Markdown here (atomically)")
    parser.add_argument("--json", type=Path, help="also write every number, per aten op, as JSON")
    parser.add_argument("--latency", action="store_true", help="time the real forward at the first size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="DiT precision for --latency")
    parser.add_argument("--ae-dtype", choices=tuple(DTYPES), help="DC-AE precision (default: --dtype)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.size]
        source = architecture(args.model)
        model = meta_model(source)
    except (ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    rows = cost_rows(model, sizes)
    import diffusers

    command = " ".join(["sana-sr", "cost", *argv])
    parts = [
        f"# Cost of `{args.model}`",
        "",
        f"Generated by `{command}` (torch {torch.__version__}, diffusers {diffusers.__version__}); MACs counted on "
        "the meta device by `torch.utils.flop_counter` (matmuls, convolutions and attention; element-wise ops "
        "not counted). See docs/evaluation.md for what is counted and how it compares with the papers.",
        "",
        markdown_table(args.model, model, rows),
    ]
    latency = None
    if args.latency:
        h, w = sizes[0]
        latency = measure_latency(source, (h // model.upscale, w // model.upscale), args.device, args.dtype,
                                  args.ae_dtype or args.dtype, args.warmup, args.repeats)
        parts += ["", latency_markdown(latency)]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.output:
        with atomic_file(args.output) as tmp:
            tmp.write_text(text)
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps({"model": args.model, "command": command, "sizes": rows,
                                       "latency": latency}, indent=2) + "\n")
    return 0
