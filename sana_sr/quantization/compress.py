"""`sana-sr compress --method compsrt|spr2q|minmax|2dquant --wbits N --abits N MODEL_DIR -o OUT_DIR`.

Quantizes the DiT's one step and the DC-AE decoder of a SANA-SR pipeline (LoRA merged first; the encoder stays full
precision), calibrating on LQ images made from a calibration set, and writes a compressed pipeline folder with a
real packed export per quantized component (see sana_sr/quantization/folder.py) that loads like any pipeline
folder (`sana-sr upscale --model OUT_DIR`, `SanaSRPipeline.from_pretrained`).

The fine-tunes run on the training loop (sana_sr/train/quant.py): one process as is, or several with
`accelerate launch -m sana_sr.cli compress ...` (DDP; calibration batches shared out). Their checkpoints live in
the work folder (default OUT_DIR.work, removed after a successful export), so a rerun resumes a stopped run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from compress import METHODS, QuantizeConfig, fp16_reference_bytes, quantize
from compress.methods import snap_floats
from sana_sr.atomic import atomic_file, check_apart, check_output, claim_folder, remove_owned, written_by
from sana_sr.data.calibration_pairs import CalibrationBatch, calibration_batches
from sana_sr.quantization.components import as_quantized
from sana_sr.quantization.sana import LatentRestorer, fold_timestep, install_matmul_sites, sana_rule


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sana-sr compress", description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL_DIR",
                   help="pipeline folder, hub id, tiny-sr (the shipped model) or PRESET-random (random weights)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT_DIR", help="compressed pipeline folder")
    p.add_argument("--method", choices=METHODS, default="compsrt")
    p.add_argument("--wbits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    p.add_argument("--abits", type=int, default=4, help="activation bits, 2..8; 0 = weights only (default 4)")
    p.add_argument("--calib", nargs="+", default=None, metavar="PATH",
                   help="calibration images: files and/or folders (default: the bundled training photos); LQ made "
                        "by the training degradation")
    p.add_argument("--calib-count", type=int, default=16, help="calibration crops (default 16)")
    p.add_argument("--calib-size", type=int, default=128, help="HQ crop side in pixels (default 128)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="fine-tune steps (default: QuantizeConfig's)")
    p.add_argument("--routing-steps", type=int, default=None, help="SPR²Q static-routing steps")
    p.add_argument("--lr", type=float, default=None, help="bound learning rate (relative units)")
    p.add_argument("--prune", type=float, default=None, help="CompSRT pruning ratio (default 0.4 at 3-4 bits)")
    p.add_argument("--act-granularity", choices=("tensor", "token"), default="tensor")
    p.add_argument("--boundary-bits", choices=("8", "fp"), default="8",
                   help="weights of the first and last layer: 8-bit or full precision (default 8)")
    p.add_argument("--no-fold-timestep", action="store_true", help="keep the timestep MLP (full precision)")
    p.add_argument("--keep-text-encoder", action="store_true", help="store the text encoder (full precision)")
    p.add_argument("--float-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=None,
                   help="fine-tune checkpoints and logs, kept until the export is written (default: OUT_DIR.work); "
                        "a rerun with the same folder resumes")
    p.add_argument("--checkpoint-every", type=int, default=50, help="fine-tune checkpoint interval in steps")
    p.add_argument("--log-every", type=int, default=10, help="fine-tune loss logging interval in steps")
    p.add_argument("--keep-work-dir", action="store_true", help="keep the work folder after the export")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR even if it was not written by sana-sr compress (it is deleted)")
    return p


OWNER = "sana-sr compress"
WORK_OWNER = "sana-sr compress --work-dir"  # not OWNER: a work folder is deleted after the export, an output never


# -- calibration data ------------------------------------------------------------------------------------------------
def latent_batches(pipe, pairs: list[CalibrationBatch]) -> list[dict]:
    """LatentRestorer inputs: LQ -> bicubic up -> DC-AE encode (full precision) -> z_L, with the stored prompt."""
    from sana_sr.data.calibration_pairs import prepare_batches

    return [dict(latents=b.latents, prompt_embeds=b.embeds, prompt_mask=b.mask)
            for b in prepare_batches(pipe, pairs, stored_prompt=True)]


# -- the command -----------------------------------------------------------------------------------------------------
def compress_pipeline(pipe, config: QuantizeConfig, batches: list[dict], *, fold: bool = True,
                      boundary_wbits: int | None = 8, progress=None):
    """Quantize `pipe`'s DiT step + DC-AE decoder in place; returns (restorer, result, fp16 reference bytes).

    Afterwards `pipe` is the compressed pipeline: its DiT and DC-AE are the quantized classes that save and load
    their packed exports, and model_index.json names them."""
    pipe.merge_lora()
    restorer = LatentRestorer.from_pipeline(pipe)
    params = sum(p.numel() for p in restorer.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        reference = fp16_reference_bytes(restorer, tmp)
        install_matmul_sites(restorer.transformer, restorer.decoder)
        if fold:
            fold_timestep(restorer.transformer, restorer.timestep)
        folded_reference = fp16_reference_bytes(restorer, tmp)
    result = quantize(restorer, batches, config, rule=sana_rule(boundary_wbits), progress=progress,
                      feature_modules=restorer.feature_modules())
    # The encoder is stored in the float dtype too: round it now, so the in-memory pipeline is the saved one.
    snap_floats(pipe.vae.encoder, config.storage_dtype)
    pipe.register_modules(transformer=as_quantized(pipe.transformer, config.float_dtype),
                          vae=as_quantized(pipe.vae, config.float_dtype))
    return restorer, result, dict(params=params, fp16_bytes=reference, fp16_folded_bytes=folded_reference)


def claim_work_dir(work_dir: Path, identity: dict, create: bool) -> None:
    """Check that a work folder already there belongs to this run (resume); else create it (`create`: rank 0).

    A folder that the user or another command filled is refused: it is deleted after the export."""
    marker = work_dir / "run.json"
    try:
        found = json.loads(marker.read_text()) if marker.is_file() else None
    except ValueError:
        found = None
    # Ours: marked so, or (a work folder from before the marker) a run.json with exactly our keys.
    if isinstance(found, dict) and (written_by(work_dir) == WORK_OWNER or found.keys() == identity.keys()):
        if found != identity:
            changed = sorted(k for k in identity.keys() | found.keys() if identity.get(k) != found.get(k))
            raise ValueError(f"work folder {work_dir} holds a run with other settings ({', '.join(changed)}): "
                             "delete it or pass another --work-dir")
        return
    check_output(work_dir, WORK_OWNER)
    if not create:
        return
    claim_folder(work_dir, WORK_OWNER)
    with atomic_file(marker) as tmp:
        tmp.write_text(json.dumps(identity, indent=1) + "\n")


def finetune_logs(work_dir: Path) -> dict:
    """Per fine-tune: the replica check of its last checkpoint and its logged losses."""
    from sana_sr.train.tracking import read_metrics

    logs = {}
    for folder in sorted(p for p in work_dir.iterdir() if p.is_dir()) if work_dir.is_dir() else []:
        entry = {}
        if (folder / "replicas.json").is_file():
            entry["replicas"] = json.loads((folder / "replicas.json").read_text())
        if (folder / "metrics.jsonl").is_file():
            entry["logged_loss"] = [[m["step"], round(m["loss/loss"], 6)] for m in read_metrics(folder)
                                    if "loss/loss" in m]
        logs[folder.name] = entry
    return logs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sana_sr.distributed import process_group_released

    with process_group_released():
        return compress(args, argv)


def compress(args: argparse.Namespace, argv: list[str] | None) -> int:
    from tqdm import tqdm

    from sana_sr.model.loading import load_pipeline, random_preset
    from sana_sr.quantization.finetune import FinetuneStopped, QuantLoopSettings, finetune_on_loop
    from sana_sr.quantization.folder import save_quantized_pipeline

    main_process = os.environ.get("RANK", "0") == "0"
    progress = partial(tqdm, disable=None if main_process else True, leave=False)
    if not main_process:  # one set of loading bars per run
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    overrides = {k: v for k, v in dict(steps=args.steps, routing_steps=args.routing_steps, lr=args.lr,
                                       prune=args.prune).items() if v is not None}
    work_dir = args.work_dir or args.output.with_name(args.output.name + ".work")
    settings = QuantLoopSettings(work_dir, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                                 seed=args.seed)
    try:
        inputs = [args.model, *(args.calib or [])]
        check_output(args.output, OWNER, overwrite=args.overwrite, inputs=inputs)
        check_apart(work_dir, [*inputs, args.output])
        identity = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("work_dir", "checkpoint_every", "log_every", "keep_work_dir", "overwrite")}
        claim_work_dir(work_dir, identity, create=False)  # refused now, not after loading and calibrating
        config = QuantizeConfig(method=args.method, wbits=args.wbits, abits=args.abits or None,
                                act_granularity=args.act_granularity, float_dtype=args.float_dtype,
                                seed=args.seed, trainer=partial(finetune_on_loop, settings=settings), **overrides)
        preset_kwargs = dict(text_encoder=args.keep_text_encoder) if random_preset(args.model) else {}
        pipe = load_pipeline(args.model, **preset_kwargs)
        if not args.keep_text_encoder and pipe.text_encoder is not None:
            pipe.drop_text_encoder()  # the stored default prompt conditions calibration and the compressed pipeline
        pairs = calibration_batches(args.calib, args.calib_count, args.batch_size, args.calib_size,
                                    pipe.config.upscale, args.seed)
        claim_work_dir(work_dir, identity, create=main_process)
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    batches = latent_batches(pipe, pairs)
    boundary = None if args.boundary_bits == "fp" else int(args.boundary_bits)
    try:
        _, result, reference = compress_pipeline(pipe, config, batches, fold=not args.no_fold_timestep,
                                                 boundary_wbits=boundary, progress=progress)
    except FinetuneStopped as e:
        if main_process:
            print(f"sana-sr compress: {e}; rerun the same command to resume", file=sys.stderr)
        return 75
    except (ValueError, FloatingPointError) as e:
        if main_process:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if not main_process:
        return 0
    report = dict(
        command="sana-sr compress " + " ".join(argv if argv is not None else sys.argv[1:]),
        model=str(args.model), config={k: v for k, v in dataclasses.asdict(config).items() if k != "trainer"},
        folded_timestep=not args.no_fold_timestep, boundary_bits=args.boundary_bits,
        calibration=dict(images=args.calib or ["<bundled training photos>"], crops=args.calib_count,
                         size=args.calib_size, degradation="realesrgan"),
        reference=reference, seconds=round(time.time() - start, 1),
        losses={k: [round(v[0], 6), round(v[-1], 6)] if v else [] for k, v in result.losses.items()},
        finetune=finetune_logs(work_dir),
        plan=[dataclasses.asdict(d) for d in result.decisions],
        versions=dict(python=platform.python_version(), torch=torch.__version__),
    )
    export = save_quantized_pipeline(pipe, args.output, report=report, overwrite=args.overwrite)
    size = export["bytes"]
    print(f"{args.method} W{args.wbits}A{args.abits or 'fp'}: quantized DiT+decoder {size / 1024:.1f} KiB on disk, "
          f"{reference['fp16_bytes'] / size:.2f}x smaller than fp16 ({reference['fp16_bytes'] / 1024:.1f} KiB; "
          f"{reference['fp16_folded_bytes'] / size:.2f}x vs fp16 with the same timestep folding), "
          f"{export['summary']['bits_per_weight']:.2f} bits/weight (paper formula) -> {args.output}")
    if not args.keep_work_dir:
        remove_owned(work_dir, WORK_OWNER)
    return 0
