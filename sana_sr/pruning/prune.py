"""`sana-sr prune`: prompt-aware structured pruning of a SANA-SR pipeline's DiT -> a pruned pipeline folder.

    sana-sr prune runs/sana-sr-tiny --out runs/pruned --target-params 0.5 --importance taylor --calib photos/
    sana-sr prune sana-0.6b --out runs/sana-0.6b-344m --target-params 344M     # meta device: shapes only

The recovery fine-tune (distillation from the unpruned model) runs through the training loop afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sana_sr.atomic import atomic_directory, check_output

OWNER = "sana-sr prune"

_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


def parse_target(text: str) -> float:
    """"0.5" or "50%" -> 0.5 (a fraction); "344M", "3.4e8", "408G" -> an absolute count."""
    t = text.strip().lower()
    try:
        if t.endswith("%"):
            return float(t[:-1]) / 100
        if t and t[-1] in _SUFFIXES:
            return float(t[:-1]) * _SUFFIXES[t[-1]]
        return float(t)
    except ValueError:
        raise ValueError(f"target must be a fraction (0.5, 50%) or a count (344M, 3.4e8), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sana-sr prune", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a saved SanaSRPipeline folder, tiny-sr (the shipped model), PRESET-random (random "
                                 "weights), or a bare preset (tiny, sana-0.6b, sana-1.6b): an architecture, see --weights")
    p.add_argument("--out", type=Path, required=True, help="the pruned pipeline folder to write")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-params", help="DiT parameters to keep: fraction (0.5, 50%%) or count (344M)")
    target.add_argument("--target-macs", help="DiT MACs at --size to keep: fraction or count (e.g. 60G)")
    p.add_argument("--importance", choices=("taylor", "taylor-null", "magnitude", "none"),
                   help="default: taylor (SR loss with prompts); 'none' on the meta device")
    p.add_argument("--plan", choices=("greedy", "uniform"), help="default: greedy; uniform on the meta device")
    p.add_argument("--structures", default="heads,cross_heads,channels",
                   help="comma-separated: heads, cross_heads, channels, depth (default: the first three)")
    p.add_argument("--weights", choices=("random", "meta", "pretrained"),
                   help="for a bare preset: meta (shapes only, the default), pretrained, or random (the same as "
                        "PRESET-random)")
    p.add_argument("--calib", nargs="*", default=None, help="calibration images or folders (default: bundled photos)")
    p.add_argument("--text-encoder", metavar="PRESET_OR_PATH",
                   help="where to load Gemma-2 from when the model has none (a trained pipeline usually has none): "
                        "a preset (tiny, sana-0.6b) or a folder / hub id with text_encoder/ and tokenizer/")
    p.add_argument("--pairs", type=int, default=16, help="calibration LQ/HQ pairs (default 16)")
    p.add_argument("--batch", type=int, default=4, help="pairs per calibration batch (default 4)")
    p.add_argument("--crop", type=int, default=128, help="HQ crop side in pixels (default 128)")
    p.add_argument("--size", type=int, default=512, help="output side at which MACs are counted (default 512)")
    p.add_argument("--channel-multiple", type=int, default=1, help="keep GLU channels in multiples of this")
    p.add_argument("--min-heads", type=int, default=1, help="heads each attention keeps at least (default 1)")
    p.add_argument("--min-keep", type=float, default=0.1, help="greedy: fraction of each layer kept at least")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it was not written by sana-sr prune (it is deleted)")
    return p


def _load(model: str, weights: str | None, device: str):
    from sana_sr.model.loading import build_pipeline, load_pipeline, random_preset
    from sana_sr.model.presets import PRESETS

    # A bare preset is an architecture here: a structural plan on the meta device needs no weights. Random values
    # are built only when asked for by name (PRESET-random) or by --weights random, never by default.
    preset = random_preset(model)
    if preset is not None:
        if weights not in (None, "random"):
            raise ValueError(f"{model} names random weights; --weights {weights} contradicts it")
        pipe = build_pipeline(preset, weights="random")
    elif model in PRESETS:
        pipe = build_pipeline(model, weights=weights or "meta")
    else:
        if weights is not None:
            raise ValueError(f"--weights applies to presets only; {model} is loaded as saved")
        pipe = load_pipeline(model)
    if pipe.transformer.device.type != "meta":
        pipe.to(device)
    return pipe


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm

    from sana_sr.data.calibration_pairs import calibration_batches
    from sana_sr.pruning.prompt_aware import PruneSettings, prune_pipeline, save_shapes_only

    try:
        check_output(args.out, OWNER, overwrite=args.overwrite, inputs=[args.model, args.text_encoder, *(args.calib or [])])
        target = parse_target(args.target_params or args.target_macs)
        pipe = _load(args.model, args.weights, args.device)
        meta = pipe.transformer.device.type == "meta"
        importance = args.importance or ("none" if meta else "taylor")
        plan = args.plan or ("uniform" if meta else "greedy")
        if meta and (importance != "none" or plan != "uniform"):
            raise ValueError("the meta device has shapes but no weight values: only --importance none --plan uniform "
                             "(a structural plan) works there")
        settings = PruneSettings(
            target_params=target if args.target_params else None, target_macs=target if args.target_macs else None,
            importance=importance, plan=plan, structures=tuple(s.strip() for s in args.structures.split(",")),
            output_size=args.size, min_heads=args.min_heads, channel_multiple=args.channel_multiple,
            min_keep_fraction=args.min_keep,
        )
        batches = None
        if importance == "taylor" and pipe.text_encoder is None:
            if args.text_encoder is None:
                raise ValueError(f"{args.model} has no text encoder to embed the calibration prompts: pass "
                                 "--text-encoder (e.g. the preset it was trained from) or use --importance taylor-null")
            from sana_sr.model.loading import load_text_encoder

            encoder, tokenizer = load_text_encoder(args.text_encoder)
            pipe.register_modules(text_encoder=encoder.to(pipe.device), tokenizer=tokenizer)
        if importance.startswith("taylor"):
            scale = pipe.config.upscale
            batches = calibration_batches(args.calib, args.pairs, args.batch, args.crop, scale, args.seed)
    except (ValueError, OSError) as e:
        print(f"sana-sr prune: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2

    report = prune_pipeline(pipe, settings, batches, progress=lambda it: tqdm(it, desc=f"importance ({importance})"))
    report["source"] = args.model
    report["command"] = " ".join(["sana-sr", "prune", *argv])
    text = json.dumps(report, indent=2) + "\n"
    if meta:
        save_shapes_only(pipe, args.out, text, owner=OWNER, overwrite=args.overwrite)
    else:
        with atomic_directory(args.out, OWNER, overwrite=args.overwrite) as tmp:
            pipe.save_pretrained(tmp)
            (tmp / "pruning.json").write_text(text)
    b, a = report["before"], report["after"]
    print(f"DiT params {b['params'] / 1e6:,.2f}M -> {a['params'] / 1e6:,.2f}M, MACs at {args.size}px "
          f"{b['macs'] / 1e9:,.2f}G -> {a['macs'] / 1e9:,.2f}G ({report['metric']} target "
          f"{report['target']:,.0f}, off by {100 * report['relative_error']:+.2f}%)")
    if not report["within_tolerance"]:
        print(f"warning: the result is {100 * abs(report['relative_error']):.1f}% from the target "
              "(coarse structures such as depth alone cannot land closer)", file=sys.stderr)
    print(f"wrote {args.out}{' (shapes only: pruned on the meta device)' if meta else ''}")
    return 0
