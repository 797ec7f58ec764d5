"""`sana-sr pretrain-tiny --recipe sr`: the shipped `tiny-sr` model, trained from random weights by one command.

The recipe of `sana_sr/assets/tiny-sr` (its card has the numbers), stage by stage, each resuming where it stopped:

1. `tiles`: every photo, and a half-size copy of each whose short side is at least 2 tiles, cut into 256² tiles
   (stride 192), kept in memory for the DC-AE and written as webdataset shards (`sana-sr shards`) for the SR stage;
2. `dc-ae`: the `AutoencoderDC` of `TINY_SR_VAE` learns to reconstruct 64² crops of the tiles, L1 for the first
   `--ae-l1-steps` steps then L2 (PSNR is what the SR stage needs); then `scaling_factor` = 1 / std of the latents;
3. `start`: the `SanaTransformer2DModel` of `TINY_SR_TRANSFORMER` with its output projection set to zero, so that
   the untrained model returns its input latent (bicubic through the DC-AE) and training learns only the
   correction; saved with the DC-AE as a `SanaSRPipeline` folder;
4. `sr1`, `sr2`, ...: the project's trainer (`sana_sr.train.Trainer`, bundled `tiny.yaml`) fine-tunes every DiT
   weight with pixel L2, EMA 0.999, each stage from the previous one's EMA weights (`SR_STAGES`): plain bicubic LQ
   first, then a growing share of tiny.yaml's light Real-ESRGAN degradation;
5. OUT = the trained pipeline (EMA weights), with `report.json`: the command, seconds, the DC-AE's reconstruction
   PSNR and each stage's gain over bicubic on its training batches. The held-out scores (Set5, Urban100, under
   each LQ protocol) come from `python benchmarks/default_model.py --model OUT --no-card`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sana_sr import bundled
from sana_sr.atomic import atomic_directory, remove_owned
from sana_sr.data.calibration_pairs import load_photos
from sana_sr.train.config import load_config
from sana_sr.train.pretrain_tiny import (
    OWNER,
    WORK_OWNER,
    AutoencoderStage,
    PhotoCrops,
    StageSettings,
    reconstruction_psnr,
    set_scaling_factor,
)
from sana_sr.train.tracking import REQUEUE_EXIT_CODE, read_metrics
from sana_sr.train.trainer import Trainer

TILE, STRIDE = 256, 192


def tile_photos(paths: list[Path]) -> list[np.ndarray]:
    """(256, 256, 3) uint8 tiles of each photo at full size and, when it holds two tiles a side, at half size."""
    from sana_sr.images import load_image

    def cut(rgb: np.ndarray) -> list[np.ndarray]:
        def starts(length: int) -> list[int]:
            if length < TILE:
                return []
            return sorted(set(range(0, length - TILE + 1, STRIDE)) | {length - TILE})

        return [rgb[y: y + TILE, x: x + TILE] for y in starts(rgb.shape[0]) for x in starts(rgb.shape[1])]

    tiles = []
    for path in paths:
        rgb = (load_image(path).rgb * 255).round().astype(np.uint8)
        tiles += cut(rgb)
        if min(rgb.shape[:2]) >= 2 * TILE:
            half = Image.fromarray(rgb).resize((rgb.shape[1] // 2, rgb.shape[0] // 2), Image.Resampling.BICUBIC)
            tiles += cut(np.array(half))
    if not tiles:
        raise ValueError(f"none of the {len(paths)} photos is {TILE} px on its short side: nothing to train on")
    return tiles


def write_shards(tiles: list[np.ndarray], work: Path, seed: int, processes: int) -> None:
    """The tiles as PNG files, then as webdataset shards (once: a rerun finds them), at least two per process (each
    rank reads shards of its own)."""
    from sana_sr.data.shards import main as shards_main

    shards = work / "shards"
    if not any(shards.glob("*.tar")):
        folder = work / "tiles"
        folder.mkdir(parents=True, exist_ok=True)
        for i, tile in enumerate(tiles):
            Image.fromarray(tile).save(folder / f"tile_{i:05d}.png")
        per_shard = max(1, min(64, len(tiles) // (2 * processes)))
        if shards_main([str(folder), "-o", str(shards), "--max-count", str(per_shard), "--min-size", str(TILE),
                        "--no-progress", "--seed", str(seed)]):
            raise RuntimeError("sana-sr shards failed (message above)")
        shutil.rmtree(folder)


def zero_output(pipe):
    """The DiT's output projection set to zero: the untrained model is bicubic through the DC-AE."""
    torch.nn.init.zeros_(pipe.transformer.proj_out.weight)
    torch.nn.init.zeros_(pipe.transformer.proj_out.bias)
    return pipe


@dataclass(frozen=True)
class SRStage:
    """One full fine-tune of the DiT by the project's trainer (bundled tiny.yaml), from the previous stage's EMA."""

    steps: int
    """Optimizer steps (cosine schedule)."""
    lr: float
    """Peak learning rate."""
    bicubic_prob: float
    """Rows whose LQ is plain bicubic x4 of the GT; the rest get tiny.yaml's light Real-ESRGAN degradation."""
    degrade_crop: int = 64
    """HQ crop the degradation runs on; a 64² training pair is then cut from it (a 64² crop degraded as a whole
    is a harsher distribution than a photo's: docs/tiny_model.md)."""
    warmup: int = 50
    """Warm-up steps."""


# tiny-sr's schedule: plain bicubic first (the clean-input skill), then ever more of the light degradation.
SR_STAGES = (SRStage(1000, 1e-3, 1.0, warmup=200), SRStage(1000, 5e-4, 0.5, 128), SRStage(2000, 5e-4, 0.25, 128))


class StageTrainer(Trainer):
    """The project's Trainer, leaving the process group open for the next stage (`run` closes it at the end)."""

    def end(self) -> None:
        pass


def sr_stage_args(stage: SRStage, start: Path, output: Path, shards: Path, seed: int, batch: int,
                  processes: int) -> list[str]:
    """The trainer's overrides of bundled tiny.yaml for one SR stage."""
    crop = ["data.crop=64"] if stage.degrade_crop == 64 else [f"data.crop={stage.degrade_crop}",
                                                              "data.degradation.gt_size=64"]
    return [f"model.path={start}", "model.finetune=full", f"output_dir={output}", f"data.shards={shards}", *crop,
            "data.shuffle_buffer=256", f"data.degradation.bicubic_prob={stage.bicubic_prob}", f"seed={seed}",
            f"optim.lr={stage.lr}", f"optim.warmup_steps={min(stage.warmup, stage.steps // 4)}",
            f"optim.max_steps={stage.steps}", f"optim.micro_batch_size={batch // processes}",
            f"optim.global_batch_size={batch}", "optim.ema_decay=0.999", "loss.pixel_l2=1.0",
            "checkpoint.every_steps=250", "checkpoint.keep_last=1", "checkpoint.resume=latest",
            "log.every_steps=50", "log.samples_every_steps=0"]


def stage_steps(text: str | None) -> list[int]:
    """--sr-steps: one count per stage, or one for every stage; None: the recipe's."""
    if text is None:
        return [stage.steps for stage in SR_STAGES]
    counts = [int(x) for x in str(text).split(",")]
    if len(counts) == 1:
        counts *= len(SR_STAGES)
    if len(counts) != len(SR_STAGES) or min(counts) < 1:
        raise ValueError(f"--sr-steps {text}: give {len(SR_STAGES)} positive counts (one per stage) or one")
    return counts


def in_batch_gains(work: Path) -> dict[str, float]:
    """Each SR stage's gain over bicubic on its own training batches (dB, mean of the last 4 logged losses)."""
    gains = {}
    for i in range(len(SR_STAGES)):
        rows = [r for r in read_metrics(work / f"sr{i + 1}") if "loss/pixel_l2" in r][-4:]
        ratio = np.mean([r["loss/bicubic_l2"] for r in rows]) / np.mean([r["loss/pixel_l2"] for r in rows])
        gains[f"sr{i + 1}"] = round(float(10 * np.log10(ratio)), 2)
    return gains


def run(args: argparse.Namespace, paths: list[Path], work: Path, command: str) -> int:
    """The recipe (module docstring); `paths` are the training photos, `work` the resumable work folder."""
    from sana_sr.model.loading import build_pipeline
    from sana_sr.model.presets import TINY_SR_TRANSFORMER, TINY_SR_VAE, get_preset

    start = time.perf_counter()
    tiles = tile_photos(paths)
    crops = PhotoCrops([torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1) for t in tiles], args.crop,
                       args.seed)
    preset = dataclasses.replace(get_preset("tiny"), vae=TINY_SR_VAE, transformer=TINY_SR_TRANSFORMER,
                                 vae_id=None, base_id=None)
    pipe = build_pipeline(preset, weights="random", seed=args.seed, text_encoder=False)
    stage = AutoencoderStage(pipe.vae, crops, StageSettings(args.ae_steps, args.ae_lr, batch=args.batch,
                                                            work_dir=work / "dc-ae", seed=args.seed,
                                                            warmup=min(200, args.ae_steps // 4), betas=(0.9, 0.99)),
                             l1_steps=args.ae_l1_steps)
    stage.run()
    accelerator, processes = stage.accelerator, stage.accelerator.num_processes
    set_scaling_factor(pipe.vae, crops)
    if accelerator.is_main_process:
        write_shards(tiles, work, args.seed, processes)
        if not (work / "start" / "model_index.json").is_file():
            with atomic_directory(work / "start", WORK_OWNER) as tmp:
                zero_output(pipe).save_pretrained(tmp)
    accelerator.wait_for_everyone()
    trained = work / "start"
    for i, (sr_stage, steps) in enumerate(zip(SR_STAGES, stage_steps(args.sr_steps))):
        output = work / f"sr{i + 1}"
        if not (output / "final" / "pipeline" / "model_index.json").is_file():
            overrides = sr_stage_args(dataclasses.replace(sr_stage, steps=steps), trained, output, work / "shards",
                                      args.seed, args.sr_batch, processes)
            if StageTrainer(load_config(str(bundled.config_file("tiny.yaml")), overrides)).train() == REQUEUE_EXIT_CODE:
                raise SystemExit(REQUEUE_EXIT_CODE)
        accelerator.wait_for_everyone()
        trained = output / "final" / "pipeline"
    if accelerator.is_main_process:
        report = {"seconds": round(time.perf_counter() - start, 1), "processes": processes, "command": command,
                  "photos": len(paths), "tiles": len(tiles), "scaling_factor": pipe.vae.config.scaling_factor,
                  "dc-ae reconstruction PSNR": _reconstruction(pipe.vae),
                  "in-batch gain over bicubic (dB, RGB)": in_batch_gains(work),
                  "held-out scores": f"python benchmarks/default_model.py --model {args.out} --no-card"}
        with atomic_directory(args.out, OWNER, overwrite=args.overwrite) as tmp:
            shutil.copytree(trained, tmp, dirs_exist_ok=True)
            for name in ["dc-ae"] + [f"sr{i + 1}" for i in range(len(SR_STAGES))]:
                shutil.copy(work / name / "metrics.jsonl", tmp / f"metrics-{name}.jsonl")
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        remove_owned(work, WORK_OWNER)
        print(json.dumps(report["in-batch gain over bicubic (dB, RGB)"]), f"\nwrote {args.out}; score it on the "
              f"held-out photos with: {report['held-out scores']}", flush=True)
    accelerator.end_training()
    return 0


def _reconstruction(vae) -> dict[str, float]:
    return reconstruction_psnr(vae.cpu(), {p.name: photo for p, photo in load_photos(bundled.held_out_photos(), 64)},
                               size=224)
