"""A compressed SANA-SR pipeline on disk: configs, the full-precision DC-AE encoder, and the packed export of the
quantized part (DiT + DC-AE decoder, see `sana_sr.quant_sana.LatentRestorer`).

    OUT_DIR/
      model_index.json            the pipeline config (upscale, timestep_index, max_sequence_length)
      scheduler/  default_prompt/ as in a normal pipeline folder
      transformer/config.json     the DiT architecture (its weights are in quantized/)
      vae/config.json             the DC-AE architecture
      vae/encoder.safetensors     the encoder, full precision (in the float dtype)
      quantized/layout.json       compress's packed export of the LatentRestorer
      quantized/weights.safetensors
      compression.json            what was done: method, bits, plan with reasons, sizes, bits/param, command
      text_encoder/ tokenizer/    only with --keep-text-encoder

Loading needs no pickled modules: architectures come from the configs, the quantized modules from layout.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler

from compress import export_quantized, export_size, load_quantized
from compress.export import DTYPES as FLOAT_DTYPES
from sana_sr.atomic import atomic_directory
from sana_sr.model.components import component_class
from sana_sr.model.pipeline import SanaSRPipeline
from sana_sr.model.text import PromptEmbedding
from sana_sr.quantization.sana import LatentRestorer, folded_skeleton, install_matmul_sites

REPORT_FILE = "compression.json"
QUANTIZED_DIR = "quantized"


def is_quantized_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANTIZED_DIR / "layout.json").is_file()


def save_quantized_pipeline(pipe: SanaSRPipeline, restorer: LatentRestorer, out_dir: str | os.PathLike, *,
                            float_dtype: str, report: dict, keep_text_encoder: bool = False) -> dict:
    """Write the folder atomically; returns the export's layout."""
    storage = FLOAT_DTYPES[float_dtype]
    with atomic_directory(out_dir) as tmp:
        pipe.save_config(tmp)
        pipe.scheduler.save_pretrained(tmp / "scheduler")
        if pipe.default_prompt is not None:
            pipe.default_prompt.save_pretrained(tmp / "default_prompt")
        if keep_text_encoder and pipe.text_encoder is not None:
            pipe.text_encoder.save_pretrained(tmp / "text_encoder")
            pipe.tokenizer.save_pretrained(tmp / "tokenizer")
        pipe.transformer.save_config(tmp / "transformer")
        pipe.vae.save_config(tmp / "vae")
        encoder = {k: v.detach().cpu().to(storage).contiguous() for k, v in pipe.vae.encoder.state_dict().items()}
        safetensors.torch.save_file(encoder, str(tmp / "vae" / "encoder.safetensors"))
        layout = export_quantized(restorer, tmp / QUANTIZED_DIR, float_dtype=float_dtype,
                                  metadata=dict(folded_timestep=report["folded_timestep"]))
        report = dict(report, export=dict(bytes=export_size(tmp / QUANTIZED_DIR), summary=layout["summary"]))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return layout


def load_quantized_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu") -> SanaSRPipeline:
    """Rebuild a pipeline from a folder written by `sana-sr compress`."""
    path = Path(path)
    if not is_quantized_folder(path):
        raise FileNotFoundError(f"{path} is not a compressed SANA-SR folder (no {QUANTIZED_DIR}/layout.json): "
                                "write one with `sana-sr compress`")
    config = json.loads((path / "model_index.json").read_text())
    layout_meta = json.loads((path / QUANTIZED_DIR / "layout.json").read_text()).get("metadata", {})
    # The class the folder was saved from (diffusers' DiT, or the pruned one whose config holds the pruned widths).
    library, class_name = config["transformer"]
    transformer_class = component_class("transformer", class_name, library)
    transformer = transformer_class.from_config(transformer_class.load_config(path / "transformer"))
    vae = AutoencoderDC.from_config(AutoencoderDC.load_config(path / "vae"))
    encoder_state = safetensors.torch.load_file(str(path / "vae" / "encoder.safetensors"))
    vae.encoder.load_state_dict({k: v.float() for k, v in encoder_state.items()}, strict=True)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    prompt = PromptEmbedding.from_pretrained(path / "default_prompt") if (path / "default_prompt").is_dir() else None
    encoder = tokenizer = None
    if (path / "text_encoder").is_dir():
        from transformers import AutoModel, AutoTokenizer

        encoder = AutoModel.from_pretrained(path / "text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    pipe = SanaSRPipeline(vae=vae, transformer=transformer, scheduler=scheduler, text_encoder=encoder,
                          tokenizer=tokenizer, default_prompt=prompt, upscale=config["upscale"],
                          timestep_index=config["timestep_index"],
                          max_sequence_length=config["max_sequence_length"])
    install_matmul_sites(pipe.transformer, pipe.vae.decoder)
    if layout_meta.get("folded_timestep"):
        folded_skeleton(pipe.transformer, pipe.timestep)
    load_quantized(LatentRestorer.from_pipeline(pipe), path / QUANTIZED_DIR)
    vae.requires_grad_(False).eval()
    transformer.requires_grad_(False).eval()
    return pipe.to(device)
