"""Build a SanaSRPipeline from a preset: random weights, the meta device (no weights), or the pretrained hub ids."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

from sana_sr.model.lora import LoraSettings, add_lora
from sana_sr.model.pipeline import SanaSRPipeline
from sana_sr.model.presets import Preset, get_preset
from sana_sr.model.text import PromptEmbedding, build_text_encoder, build_tiny_tokenizer

WEIGHTS = ("random", "meta", "pretrained")

# SANA's flow shift; with index 900 of 1000 it puts the one step at sigma* = 0.25.
FLOW_SHIFT = 3.0


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def build_pipeline(
    preset: str | Preset = "tiny",
    *,
    weights: str = "random",
    text_encoder: bool = True,
    lora: LoraSettings | None = None,
    upscale: int = 4,
    timestep_index: int = 900,
    default_prompt: str = "",
    seed: int = 0,
    vae_id: str | None = None,
    base_id: str | None = None,
    text_encoder_layers: int | None = None,
) -> SanaSRPipeline:
    """Assemble the pipeline of `preset`.

    weights: "random" (seeded init; what `tiny` is for), "meta" (shapes only, for parameter and MAC counts of
    the real sizes without memory) or "pretrained" (DC-AE and SANA weights by hub id, through `from_pretrained`).
    text_encoder: keep Gemma-2 and its tokenizer; without it the pipeline conditions on its stored default prompt.
    Either way the stored default prompt (the null prompt "" unless told otherwise) is the encoder's output for it,
    computed here once; it is never a zero placeholder.
    vae_id, base_id: hub ids or local folders overriding the preset's (a local mirror of the hub repos, say).
    text_encoder_layers: with random weights, build Gemma-2 at the preset's width with this many layers instead of
    the preset's (the 26 of Gemma-2-2B take 8 GiB; tests and benchmarks need only the real width).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if vae_id or base_id:
        preset = dataclasses.replace(preset, vae_id=vae_id or preset.vae_id, base_id=base_id or preset.base_id)
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")

    if weights == "pretrained":
        vae, transformer = _load_pretrained(preset)
        encoder, tokenizer = load_text_encoder(preset.base_id)
    else:
        torch.manual_seed(seed)
        meta = weights == "meta"
        with torch.device("meta" if meta else "cpu"):
            vae = AutoencoderDC(**preset.vae)
            transformer = SanaTransformer2DModel(**preset.transformer)
            # The real tokenizers come from the hub with their weights; random weights get one built locally (its
            # vocabulary sizes the embedding table). The meta build keeps the real vocabulary for parameter counts.
            tokenizer = build_tiny_tokenizer() if preset.name == "tiny" or not meta else None
            encoder_config = dict(preset.text_encoder)
            if text_encoder_layers is not None and not meta:
                encoder_config["num_hidden_layers"] = text_encoder_layers
            encoder = build_text_encoder(encoder_config, tokenizer) if text_encoder or not meta else None

    prompt = None
    if weights != "meta":
        encoder.eval()
        prompt = PromptEmbedding.from_encoder(tokenizer, encoder, default_prompt, preset.max_sequence_length)
        if not text_encoder:  # the embedding stays; the encoder (2B parameters for the real sizes) goes
            encoder, tokenizer = None, None

    vae.requires_grad_(False)
    vae.eval()
    transformer.eval()
    if lora is not None:
        add_lora(transformer, lora)
    return SanaSRPipeline(
        vae=vae,
        transformer=transformer,
        scheduler=make_scheduler(),
        text_encoder=encoder,
        tokenizer=tokenizer if encoder is not None else None,
        default_prompt=prompt,
        upscale=upscale,
        timestep_index=timestep_index,
        max_sequence_length=preset.max_sequence_length,
    )


def _load_pretrained(preset: Preset):
    if preset.vae_id is None or preset.base_id is None:
        raise ValueError(
            f"preset {preset.name!r} has no published weights: build it with weights='random', "
            "or load a saved pipeline folder with SanaSRPipeline.from_pretrained"
        )
    for local in (preset.vae_id, preset.base_id):
        if os.path.isabs(local) and not Path(local).is_dir():  # a local folder, not a hub id
            raise FileNotFoundError(f"preset {preset.name!r}: weights folder {local} is missing "
                                    "(the tiny base is made by `sana-sr pretrain-tiny`)")
    vae = AutoencoderDC.from_pretrained(preset.vae_id, torch_dtype=torch.float32)
    transformer = SanaTransformer2DModel.from_pretrained(preset.base_id, subfolder="transformer")
    return vae, transformer


def load_text_encoder(source: str | os.PathLike):
    """(Gemma-2 encoder, tokenizer) from a preset name, or a folder / hub id with text_encoder/ and tokenizer/."""
    from transformers import AutoModel, AutoTokenizer

    from sana_sr.model.presets import PRESETS

    if str(source) in PRESETS:
        source = PRESETS[str(source)].base_id
        if source is None:
            raise ValueError("this preset has no published text encoder")
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
    return AutoModel.from_pretrained(source, subfolder="text_encoder", dtype="auto"), tokenizer


RANDOM_SUFFIX = "-random"


def shipped_models() -> dict[str, Path]:
    """Model names of the trained pipelines that ship inside the package."""
    from sana_sr.bundled import TINY_SR

    return {"tiny-sr": TINY_SR}


def random_preset(model: str | os.PathLike) -> str | None:
    """The preset of a model name `PRESET-random` (random weights, asked for by name), else None."""
    from sana_sr.model.presets import PRESETS

    name = str(model)
    if name.endswith(RANDOM_SUFFIX) and name[: -len(RANDOM_SUFFIX)] in PRESETS:
        return name[: -len(RANDOM_SUFFIX)]
    return None


def resolve_model(model: str | os.PathLike) -> str | os.PathLike:
    """A shipped model's name -> its folder; a bare preset name -> ValueError naming the alternatives (a preset is
    an architecture, and silently restoring with random weights is what this rule prevents); anything else as given.
    """
    from sana_sr.model.presets import PRESETS

    name = str(model)
    shipped = shipped_models()
    if name in shipped:
        return shipped[name]
    if name in PRESETS:
        trained = [n for n in shipped if n.startswith(f"{name}-")]
        alternative = f"{trained[0]!r} (the shipped trained model)" if trained else "a pipeline folder or hub id"
        raise ValueError(f"{name!r} is a preset (an architecture), not a model: use {alternative} or "
                         f"'{name}{RANDOM_SUFFIX}' (random weights)")
    return model


def load_pipeline(model: str | os.PathLike, execution: str = "fake-quant", **kwargs) -> SanaSRPipeline:
    """`model` is a saved (or compressed) pipeline folder, a hub id of one, a shipped model (`tiny-sr`), or
    `PRESET-random` (the preset built with random weights; `kwargs` go to `build_pipeline`). A bare preset name is
    refused: a model name never means random weights unless it says so.

    Folders and hub ids load through `SanaSRPipeline.from_pretrained`, which checks them first. execution="int"
    runs a compressed folder on integer kernels (random weights or a full-precision folder are refused)."""
    preset = random_preset(model)
    if preset is not None:
        if execution != "fake-quant":
            raise ValueError(f"execution={execution!r} needs a compressed pipeline folder; {model!r} is random weights")
        return build_pipeline(preset, **kwargs)
    return SanaSRPipeline.from_pretrained(resolve_model(model), execution=execution)
