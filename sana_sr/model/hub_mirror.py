"""A local mirror of the hub repos a preset names, with random weights from the real configs.

Nothing can be downloaded on our machines, yet `weights=pretrained` must be exercised at the real sizes: this writes
`ROOT/<owner>/<name>/` for the preset's DC-AE repo (config.json + diffusion_pytorch_model.safetensors at the top, as
`mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers`) and its SANA repo (model_index.json of diffusers' `SanaPipeline`, and
one folder per component: transformer/, vae/, text_encoder/, tokenizer/, scheduler/), both written by diffusers'
and transformers' own `save_pretrained`. Loading then takes the hub path with only the id changed
(`build_pipeline(..., vae_id=, base_id=)`, or `model.vae_id=` / `model.base_id=` in a training config).

Stand-ins, said here once: Gemma's tokenizer comes from the hub, so the mirror carries one built locally with
`tokenizers` (sana_sr.model.text.build_tiny_tokenizer; its vocabulary sizes the embedding table), and
`text_encoder_layers` can cut Gemma-2-2B's 26 layers (8 GiB in fp32) to a few at the real width.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from sana_sr.model.presets import get_preset


def write_hub_mirror(preset: str, root: str | Path, *, text_encoder_layers: int | None = None,
                     seed: int = 0) -> tuple[Path, Path]:
    """Write the mirror under `root`; returns (vae folder, SANA folder): the values for vae_id and base_id."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    from sana_sr.model.text import build_text_encoder, build_tiny_tokenizer

    p = get_preset(preset)
    if p.vae_id is None or p.base_id is None or Path(p.vae_id).is_absolute():
        raise ValueError(f"preset {preset!r} names no hub repos to mirror")
    vae_dir, base_dir = Path(root) / p.vae_id, Path(root) / p.base_id  # owner/name, as the hub lays them out
    torch.manual_seed(seed)
    vae = AutoencoderDC(**p.vae)
    vae.save_pretrained(vae_dir)
    tokenizer = build_tiny_tokenizer()
    config = dict(p.text_encoder)
    if text_encoder_layers is not None:
        config["num_hidden_layers"] = text_encoder_layers
    # The hub's Gemma-2 is stored in bf16 (loaded with dtype="auto"); the DiT and the DC-AE in fp32.
    encoder = build_text_encoder(config, tokenizer).to(torch.bfloat16)
    transformer = SanaTransformer2DModel(**p.transformer)
    # SANA's release samples with flow DPM-Solver; SANA-SR only reads the transformer, text encoder and tokenizer.
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                 scheduler=scheduler).save_pretrained(base_dir)
    del vae, encoder, transformer
    gc.collect()
    return vae_dir, base_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sana_sr.model.hub_mirror", description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="sana-0.6b or sana-1.6b")
    parser.add_argument("root", type=Path, help="folder to write the mirror into")
    parser.add_argument("--text-encoder-layers", type=int, default=None, help="Gemma-2 layers (default: the real 26)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vae_dir, base_dir = write_hub_mirror(args.preset, args.root, text_encoder_layers=args.text_encoder_layers,
                                         seed=args.seed)
    print(f"model.vae_id={vae_dir} model.base_id={base_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
