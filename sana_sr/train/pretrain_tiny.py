"""`sana-sr pretrain-tiny`: the tiny preset's "published" base weights, trained here from the bundled photos.

The real presets start from pretrained hub weights (a DC-AE trained to reconstruct, a SANA DiT trained by flow
matching). A random tiny model has neither property: its frozen decoder cannot produce a good image, and its
DiT is no prior. This command trains both, tiny, on CPU, once:

1. the DC-AE to reconstruct random crops (L1), then its `scaling_factor` set to 1/std of the latents;
2. the DiT by flow matching on those latents (x_sigma = (1 - sigma) x_0 + sigma eps, target eps - x_0), with
   captions and 10% null prompts, the text encoder being the tiny random Gemma-2.

The result is written in the hub layout (`dc-ae/`, `sana/{transformer,text_encoder,tokenizer}/`) and ships in
`sana_sr/assets/tiny-base`, where the `tiny` preset's `vae_id` / `base_id` point. `chelsea.png` is held back.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sana_sr.atomic import atomic_directory
from sana_sr.model.presets import TINY_BASE

TRAIN_PHOTOS = {
    "astronaut.png": "a photo of an astronaut, portrait, person, face",
    "coffee.png": "a photo of a coffee cup on a table, food",
    "rocket.jpg": "a photo of a rocket launch, smoke, sky",
}
HELD_BACK = "chelsea.png"


def load_photos(names) -> list[np.ndarray]:
    from sana_sr.main_job.quickstart import bundled

    return [np.asarray(Image.open(bundled("photos") / n).convert("RGB"), dtype=np.float32) / 255 for n in names]


def random_crops(photos: list[np.ndarray], count: int, size: int, rng: np.random.Generator):
    """(count, 3, size, size) crops in [-1, 1] with horizontal flips, and the index of each crop's photo."""
    crops, sources = [], []
    for _ in range(count):
        i = int(rng.integers(len(photos)))
        im = photos[i]
        top, left = rng.integers(im.shape[0] - size + 1), rng.integers(im.shape[1] - size + 1)
        crop = im[top : top + size, left : left + size]
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
        sources.append(i)
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(crops))).permute(0, 3, 1, 2)
    return batch * 2 - 1, sources


def _cosine(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1]."""
    return float(10 * torch.log10(4 / ((a.clamp(-1, 1) - b) ** 2).mean()))


def train_autoencoder(vae, photos, steps: int, batch: int, size: int, lr: float, seed: int, log) -> None:
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train().requires_grad_(True)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, steps, lr)
        x, _ = random_crops(photos, batch, size, rng)
        loss = (vae.decode(vae.encode(x).latent).sample - x).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"dc-ae step {step}/{steps} L1 {loss.item():.4f}")
    vae.eval().requires_grad_(False)


def train_flow_matching(pipe, photos, captions, steps: int, batch: int, size: int, lr: float, seed: int, log) -> None:
    from sana_sr.model.text import encode_prompts

    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    transformer = pipe.transformer.train().requires_grad_(True)
    with torch.no_grad():
        embeds, masks = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions + [""], pipe.config.max_sequence_length)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, steps, lr)
        x, sources = random_crops(photos, batch, size, rng)
        with torch.no_grad():
            x0 = pipe.encode(x)
        prompt = [s if rng.random() > 0.1 else len(captions) for s in sources]
        sigma = torch.rand(batch, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1)
        velocity = transformer(
            (1 - s) * x0 + s * noise, encoder_hidden_states=embeds[prompt], encoder_attention_mask=masks[prompt],
            timestep=sigma * pipe.scheduler.config.num_train_timesteps, return_dict=False,
        )[0]
        loss = ((velocity - (noise - x0)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"dit step {step}/{steps} flow-matching MSE {loss.item():.4f}")
    transformer.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sana-sr pretrain-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TINY_BASE, help="output folder (default: the bundled one)")
    parser.add_argument("--ae-steps", type=int, default=4000)
    parser.add_argument("--dit-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from sana_sr.model.loading import build_pipeline

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    log_lines: list[str] = []

    def log(line: str) -> None:
        line = f"[{time.perf_counter() - start:7.1f}s] {line}"
        print(line, flush=True)
        log_lines.append(line)

    pipe = build_pipeline("tiny", weights="random", seed=args.seed)
    photos = load_photos(TRAIN_PHOTOS)
    train_autoencoder(pipe.vae, photos, args.ae_steps, args.batch, args.crop, 2e-3, args.seed, log)

    rng = np.random.default_rng(args.seed + 1)
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(random_crops(photos, 16, args.crop, rng)[0]).latent for _ in range(8)])
    pipe.vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
    log(f"dc-ae scaling_factor {pipe.vae.config.scaling_factor}")

    train_flow_matching(pipe, photos, list(TRAIN_PHOTOS.values()), args.dit_steps, args.batch, args.crop, 1e-3,
                        args.seed, log)

    report = {"seconds": round(time.perf_counter() - start, 1), "args": {k: str(v) for k, v in vars(args).items()}}
    with torch.no_grad():
        for name, image in zip([*TRAIN_PHOTOS, HELD_BACK], photos + load_photos([HELD_BACK])):
            x = torch.from_numpy(image[:256, :256].copy()).permute(2, 0, 1)[None] * 2 - 1
            report[f"dc-ae reconstruction PSNR {name}"] = round(psnr(pipe.decode(pipe.encode(x)), x), 2)
    log(json.dumps(report))

    with atomic_directory(args.out) as tmp:
        pipe.vae.save_pretrained(tmp / "dc-ae")
        pipe.transformer.save_pretrained(tmp / "sana" / "transformer")
        pipe.text_encoder.save_pretrained(tmp / "sana" / "text_encoder")
        pipe.tokenizer.save_pretrained(tmp / "sana" / "tokenizer")
        (tmp / "training_log.txt").write_text("\n".join(log_lines) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0
