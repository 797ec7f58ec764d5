"""`sana-sr pretrain-tiny`: the tiny models' "published" weights, trained here from real photos.

Two recipes. `--recipe base` (the default, below) makes the `tiny` preset's base; `--recipe sr` makes the shipped
`tiny-sr` SR model from random weights (sana_sr/train/pretrain_tiny_sr.py).

The real presets start from pretrained hub weights (a DC-AE trained to reconstruct, a SANA DiT trained by flow
matching). A random tiny model has neither property: its frozen decoder cannot produce a good image, and its DiT is
no prior. This command trains both, tiny, on the CPU, on the training loop (sana_sr/train/loop.py: checkpoints,
resume, stop signals, one process or several under `accelerate launch`):

1. `dc-ae`: the DC-AE reconstructs random crops (L1); then its `scaling_factor` is set to 1/std of the latents;
2. `dit`: the DiT learns flow matching on those latents (x_sigma = (1 - sigma) x_0 + sigma eps, target eps - x_0),
   with each photo's caption and 10% null prompts; the text encoder is the tiny random Gemma-2.

Each stage keeps its checkpoints and metrics.jsonl in OUT.work/STAGE/, so a stopped run resumes where it was. The
result is written in the hub layout (`dc-ae/`, `sana/{transformer,text_encoder,tokenizer}/`) with `report.json`;
the bundled copy is `sana_sr/assets/tiny-base`, where the `tiny` preset's `vae_id` / `base_id` point.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sana_sr.atomic import atomic_directory, check_apart, check_output, claim_folder, remove_owned
from sana_sr.bundled import SKIMAGE_TRAIN_PHOTOS, TINY_BASE, held_back_photos, train_photos
from sana_sr.distributed import DistConfig
from sana_sr.train.config import CheckpointConfig, LogConfig, OptimConfig
from sana_sr.train.loop import TrainLoop
from sana_sr.train.tracking import REQUEUE_EXIT_CODE, read_metrics


class PhotoCrops:
    """Random square crops (with horizontal flips) of a set of photos, a pure function of (seed, step, rank):
    a resumed run draws exactly the crops the uninterrupted one would have."""

    def __init__(self, photos: list[torch.Tensor], size: int, seed: int):
        self.photos, self.size, self.seed = photos, size, seed

    def batch(self, count: int, step: int, rank: int) -> tuple[torch.Tensor, list[int]]:
        """(count, 3, size, size) in [-1, 1], and the index of each crop's photo."""
        rng = np.random.default_rng([self.seed, step, rank])
        crops, sources = [], []
        for _ in range(count):
            i = int(rng.integers(len(self.photos)))
            _, h, w = self.photos[i].shape
            top, left = int(rng.integers(h - self.size + 1)), int(rng.integers(w - self.size + 1))
            crop = self.photos[i][:, top: top + self.size, left: left + self.size]
            crop = crop.float() / 255 if crop.dtype == torch.uint8 else crop  # uint8 tiles: a quarter the memory
            crops.append(crop.flip(-1) if rng.random() < 0.5 else crop)
            sources.append(i)
        return torch.stack(crops) * 2 - 1, sources


@dataclass
class StageSettings:
    """One pretraining stage on the loop."""

    steps: int
    """Optimizer steps."""
    lr: float
    """Peak learning rate (linear warm-up, then cosine to 0)."""
    batch: int
    """Global batch (over all processes)."""
    work_dir: Path
    """Checkpoints and metrics.jsonl of this stage."""
    seed: int = 0
    """Seed of the crops and the noise."""
    warmup: int = 100
    """Warm-up steps."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    log_every: int = 250
    """Log the loss every this many steps."""
    checkpoint_every: int = 500
    """Checkpoint every this many steps."""


class _Stage(TrainLoop):
    """A pretraining stage: every parameter of `module` trains on crops drawn per step."""

    def __init__(self, module: nn.Module, crops: PhotoCrops, settings: StageSettings):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if settings.batch % world:
            raise ValueError(f"batch {settings.batch} does not split over {world} processes")
        optim = OptimConfig(lr=settings.lr, weight_decay=0.0, schedule="cosine", warmup_steps=settings.warmup,
                            max_steps=settings.steps, micro_batch_size=settings.batch // world,
                            global_batch_size=settings.batch, grad_clip=1.0, ema_decay=0.0, betas=settings.betas)
        # fp32 on every device: the bundled base must not depend on where it was made.
        super().__init__(settings.work_dir, optim, DistConfig(mixed_precision="no"),
                         CheckpointConfig(every_steps=settings.checkpoint_every, keep_last=1, resume="latest"),
                         LogConfig(tracker="none", every_steps=settings.log_every, samples_every_steps=0),
                         settings.seed)
        self.crops = crops
        module.train().requires_grad_(True)
        module.to(self.accelerator.device)
        self.prepare(module, [{"params": [p for p in module.parameters() if p.requires_grad]}])
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.resume()

    def batches(self):
        rank = self.accelerator.process_index
        while True:  # one micro-batch per optimizer step: the step is the data position
            x, sources = self.crops.batch(self.optim.micro_batch_size, self.state["step"], rank)
            yield {"key": [f"{self.state['step']}/{rank}/{i}" for i in range(len(sources))],
                   "x": x.to(self.accelerator.device), "sources": sources}

    def end(self) -> None:
        """The process group outlives a stage (the next one uses it); `main` closes it."""

    def run(self) -> None:
        if self.train() == REQUEUE_EXIT_CODE:
            raise SystemExit(REQUEUE_EXIT_CODE)
        self.accelerator.free_memory()
        self.module.eval().requires_grad_(False)


class AutoencoderStage(_Stage):
    """The DC-AE learns to reconstruct: L1 between decode(encode(x)) and x, then L2 from step `l1_steps` if given."""

    def __init__(self, module: nn.Module, crops: PhotoCrops, settings: StageSettings, l1_steps: int | None = None):
        self.l1_steps = l1_steps
        super().__init__(module, crops, settings)

    def compute_loss(self, batch: dict):
        x = batch["x"]
        error = self.model(x).sample - x
        if self.l1_steps is None or self.state["step"] < self.l1_steps:
            loss = error.abs().mean()
            return loss, {"l1": loss.detach()}, None
        loss = error.square().mean()
        return loss, {"l2": loss.detach()}, None


class FlowMatchingStage(_Stage):
    """The DiT learns flow matching on the frozen DC-AE's latents, with each photo's caption (10% null)."""

    def __init__(self, pipe, crops: PhotoCrops, captions: list[str], settings: StageSettings):
        from sana_sr.model.text import encode_prompts

        self.pipe = pipe
        with torch.no_grad():
            self.embeds, self.masks = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions + [""],
                                                     pipe.config.max_sequence_length)
        super().__init__(pipe.transformer, crops, settings)
        pipe.vae.to(self.accelerator.device)
        self.embeds, self.masks = self.embeds.to(self.accelerator.device), self.masks.to(self.accelerator.device)

    def compute_loss(self, batch: dict):
        from sana_sr.model.pipeline import predict_velocity

        x, count = batch["x"], len(batch["sources"])
        step, rank = self.state["step"], self.accelerator.process_index
        generator = torch.Generator().manual_seed(self.crops.seed * 1_000_003 + step * 1009 + rank)
        null = len(self.embeds) - 1
        prompt = [s if torch.rand((), generator=generator) > 0.1 else null for s in batch["sources"]]
        sigma = torch.rand(count, generator=generator)
        with torch.no_grad():
            x0 = self.pipe.encode(x)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        s = sigma.view(-1, 1, 1, 1).to(x0.device)
        timesteps = (sigma * self.pipe.scheduler.config.num_train_timesteps).to(x0.device)
        velocity = predict_velocity(self.model, (1 - s) * x0 + s * noise, timesteps, self.embeds[prompt],
                                    self.masks[prompt])
        loss = ((velocity - (noise - x0)) ** 2).mean()
        return loss, {"flow_matching_mse": loss.detach()}, None


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1]."""
    return float(10 * torch.log10(4 / ((a.clamp(-1, 1) - b) ** 2).mean()))


@torch.no_grad()
def set_scaling_factor(vae, crops: PhotoCrops) -> float:
    """scaling_factor = 1 / std of the latents of 128 fixed crops (SANA's latents are scaled to unit variance)."""
    x, _ = PhotoCrops(crops.photos, crops.size, crops.seed + 1).batch(128, step=0, rank=0)
    latents = torch.cat([vae.encode(chunk).latent for chunk in x.split(16)])
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
    return vae.config.scaling_factor


@torch.no_grad()
def reconstruction_psnr(vae, photos: dict[str, torch.Tensor], size: int = 256) -> dict[str, float]:
    """DC-AE reconstruction PSNR of each photo's top-left `size` crop."""
    out = {}
    for name, photo in photos.items():
        x = photo[:, :size, :size][None] * 2 - 1
        out[name] = round(psnr(vae.decode(vae.encode(x).latent).sample, x), 2)
    return out


def photo_paths(photos: list[str] | None, with_skimage: bool) -> list[Path]:
    """The training photos: the given files/folders (default: the bundled ones), plus scikit-image's photographs."""
    from sana_sr.images import find_images

    # The bundled training photos are copies of three of scikit-image's: not twice.
    paths = [p for p, _ in find_images(photos)] if photos else [] if with_skimage else train_photos()
    if with_skimage:
        try:
            import skimage
        except ImportError:
            print("sana-sr pretrain-tiny: error: --skimage-photos needs scikit-image (pip install scikit-image)",
                  file=sys.stderr)
            raise SystemExit(2) from None
        data = Path(skimage.__file__).parent / "data"
        missing = [name for name in SKIMAGE_TRAIN_PHOTOS if not (data / name).is_file()]
        if missing:
            print(f"warning: scikit-image {skimage.__version__} lacks {', '.join(missing)}: training without them",
                  file=sys.stderr)
        paths += [data / name for name in SKIMAGE_TRAIN_PHOTOS if name not in missing]
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sana-sr pretrain-tiny", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=TINY_BASE, help="output folder (default: the bundled one)")
    p.add_argument("--photos", nargs="+", default=None, metavar="PATH",
                   help="training photos, files and/or folders (default: the bundled training photos); captions "
                        "from a .txt beside each image")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="base",
                   help="base: the `tiny` preset's base (dc-ae/ + sana/); sr: the shipped tiny-sr model, trained "
                        "from random weights (sana_sr/train/pretrain_tiny_sr.py)")
    p.add_argument("--skimage-photos", action="store_true",
                   help="add the photographs scikit-image ships (bundled.SKIMAGE_TRAIN_PHOTOS) to the training photos")
    for name, help_ in (("ae-steps", "DC-AE steps"), ("ae-lr", "DC-AE peak learning rate"),
                        ("ae-l1-steps", "DC-AE steps on L1 before L2 (sr recipe)"),
                        ("dit-steps", "DiT flow-matching steps (base recipe)"), ("dit-lr", "DiT learning rate (base)"),
                        ("sr-batch", "SR global batch (sr recipe)"),
                        ("batch", "global batch of the pretraining stages"), ("crop", "crop side")):
        kind = float if name.endswith("lr") else int
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{help_} (default: the recipe's, RECIPES)")
    p.add_argument("--sr-steps", default=None, metavar="N[,N...]",
                   help="steps of each SR stage, or one count for all (default: pretrain_tiny_sr.SR_STAGES)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=None,
                   help="checkpoints (default OUT.work; a rerun resumes; removed once OUT is written)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it was not written by sana-sr pretrain-tiny (it is deleted)")
    return p


RECIPES: dict[str, dict[str, float | int | None]] = {
    "base": dict(ae_steps=3000, ae_lr=2e-3, ae_l1_steps=None, dit_steps=1200, dit_lr=1e-3, batch=16, crop=64,
                 sr_batch=None),
    # tiny-sr's DC-AE trained 2000 steps (L1 then L2, lr 2e-3) and then 4000 more (L2, lr 1e-3, betas 0.9/0.99):
    # one schedule here, at the lr and betas of the run that reached 41.5 dB (6000 steps at 2e-3 reached 34.4).
    "sr": dict(ae_steps=6000, ae_lr=1e-3, ae_l1_steps=1000, dit_steps=None, dit_lr=None, batch=16, crop=64,
               sr_batch=8),
}
"""Defaults of each recipe; a flag given on the command line wins."""

OWNER = "sana-sr pretrain-tiny"
WORK_OWNER = "sana-sr pretrain-tiny --work-dir"  # not OWNER: the work folder is deleted at the end, --out never


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    from sana_sr.data.calibration_pairs import load_photos, prompt_for
    from sana_sr.model.loading import build_pipeline

    start = time.perf_counter()
    work = args.work_dir or args.out.with_name(args.out.name + ".work")
    try:  # before any work: nothing the user owns is replaced, and the work folder (deleted at the end) is ours
        check_output(args.out, OWNER, overwrite=args.overwrite, inputs=args.photos or [])
        check_apart(work, [*(args.photos or []), args.out])
        check_output(work, WORK_OWNER)
        if os.environ.get("RANK", "0") == "0":
            claim_folder(work, WORK_OWNER)
    except ValueError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"sana-sr pretrain-tiny: error: {e}", file=sys.stderr)
        return 2
    paths = photo_paths(args.photos, args.skimage_photos)
    if args.recipe == "sr":
        from sana_sr.train.pretrain_tiny_sr import run

        return run(args, paths, work, "sana-sr pretrain-tiny " + " ".join(sys.argv[2:] if argv is None else argv))
    loaded = load_photos(paths, args.crop)
    crops = PhotoCrops([photo for _, photo in loaded], args.crop, args.seed)
    pipe = build_pipeline("tiny", weights="random", seed=args.seed)
    stage = dict(batch=args.batch, seed=args.seed)
    AutoencoderStage(pipe.vae, crops, StageSettings(args.ae_steps, args.ae_lr, work_dir=work / "dc-ae", **stage)).run()
    set_scaling_factor(pipe.vae, crops)
    captions = [prompt_for(path) for path, _ in loaded]
    dit = FlowMatchingStage(pipe, crops, captions, StageSettings(args.dit_steps, args.dit_lr, work_dir=work / "dit",
                                                                 **stage))
    dit.run()
    accelerator = dit.accelerator
    if accelerator.is_main_process:
        checked = {p.name: photo for p, photo in load_photos(held_back_photos() + paths[:3], 256)}
        report = {
            "seconds": round(time.perf_counter() - start, 1), "processes": accelerator.num_processes,
            "command": "sana-sr pretrain-tiny " + " ".join(sys.argv[2:] if argv is None else argv),
            "photos": [str(p) for p, _ in loaded], "scaling_factor": pipe.vae.config.scaling_factor,
            "dc-ae reconstruction PSNR": reconstruction_psnr(pipe.vae.cpu(), checked),
            "final loss": {name: {k: v for k, v in read_metrics(work / name)[-1].items() if k.startswith("loss/")}
                           for name in ("dc-ae", "dit")},
        }
        with atomic_directory(args.out, OWNER, overwrite=args.overwrite) as tmp:
            pipe.vae.save_pretrained(tmp / "dc-ae")
            pipe.transformer.save_pretrained(tmp / "sana" / "transformer")
            pipe.text_encoder.save_pretrained(tmp / "sana" / "text_encoder")
            pipe.tokenizer.save_pretrained(tmp / "sana" / "tokenizer")
            for name in ("dc-ae", "dit"):
                shutil.copy(work / name / "metrics.jsonl", tmp / f"metrics-{name}.jsonl")
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        remove_owned(work, WORK_OWNER)
        print(json.dumps(report["dc-ae reconstruction PSNR"]), f"\nwrote {args.out}", flush=True)
    accelerator.end_training()
    return 0
