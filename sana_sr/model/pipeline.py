"""SANA-SR: one-step real-world super-resolution on a frozen DC-AE and a (LoRA-adapted) SANA DiT.

    LQ --bicubic x s--> x_L --DC-AE encode--> z_L --one DiT call at t*--> z_H = z_L - sigma* v --decode--> SR

SANA is a flow-matching model (x_sigma = (1 - sigma) x_0 + sigma eps, v = eps - x_0): the clean LQ latent is taken
as the sample at sigma* and one Euler step jumps to sigma = 0. sigma* and t* come from the scheduler config at
`timestep_index` (the release: index 900 of 1000 with flow shift 3, so sigma* = 0.25 and t* = 250).
"""

from __future__ import annotations

import functools
import logging
import operator
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from PIL import Image

from sana_sr.atomic import atomic_directory
from sana_sr.model.color import apply_color_fix
from sana_sr.model.lora import (
    LORA_WEIGHT_NAME,
    has_lora,
    load_lora,
    merge_lora,
    save_lora,
    save_transformer_without_lora,
)
from sana_sr.model.prompt_reuse import reuse_prompt_projections
from sana_sr.model.text import PromptEmbedding, encode_prompts
from sana_sr.model.tiling import TileSettings, tiled_apply

logger = logging.getLogger(__name__)


def bicubic_upsample(lq: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The LQ image resized to (height, width), bicubic, clamped to [0, 1]: the model's input in training and use."""
    return F.interpolate(lq, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


def predict_velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_mask: torch.Tensor,
) -> torch.Tensor:
    """v_theta(z, t, c) in the latents' dtype; `timesteps` is (B,) in scheduler units (sigma x 1000)."""
    model_dtype = next(transformer.parameters()).dtype
    velocity = transformer(
        latents.to(model_dtype),
        encoder_hidden_states=prompt_embeds.to(model_dtype),
        encoder_attention_mask=prompt_mask,
        timestep=timesteps.to(model_dtype),
        return_dict=False,
    )[0]
    return velocity.to(latents.dtype)


def one_step_restore(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_mask: torch.Tensor,
    timestep: float,
    sigma: float,
) -> torch.Tensor:
    """z_H = z_L - sigma * v(z_L, t, c): the one Euler step from sigma to 0. Differentiable (training uses it)."""
    t = torch.full((latents.shape[0],), timestep, device=latents.device)
    return latents - sigma * predict_velocity(transformer, latents, t, prompt_embeds, prompt_mask)


def _own_dtype(module: torch.nn.Module):
    """Switch off an enclosing autocast (training's bf16): the DC-AE runs in the dtype it is held in, which
    `model.vae_dtype` chose (fp32 by default: SANA's users report fp16 NaNs, and bf16 costs reconstruction detail)."""
    return torch.autocast(module.device.type, enabled=False)


def _to_batch(image) -> torch.Tensor:
    """PIL image(s) or a (B, 3, H, W) / (3, H, W) tensor in [0, 1] -> float tensor (B, 3, H, W)."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in image]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(image.shape)}")
    return image.float()


class SanaSRPipeline(DiffusionPipeline):
    """The SANA-SR restoration pipeline, saved and loaded in diffusers folder layout.

    Components: `vae` (AutoencoderDC, frozen), `transformer` (SanaTransformer2DModel, optionally with a PEFT LoRA
    adapter), `scheduler` (FlowMatchEulerDiscreteScheduler: defines sigma*), and optionally `text_encoder` +
    `tokenizer` (Gemma-2) and `default_prompt` (a stored prompt embedding used when no prompt is given).
    A LoRA adapter is saved beside the base weights as `lora/pytorch_lora_weights.safetensors`.
    """

    _optional_components = ["text_encoder", "tokenizer", "default_prompt"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        vae: AutoencoderDC,
        transformer: SanaTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder=None,
        tokenizer=None,
        default_prompt: PromptEmbedding | None = None,
        upscale: int = 4,
        timestep_index: int = 900,
        max_sequence_length: int = 300,
    ):
        super().__init__()
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(f"SANA-SR needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
        n = scheduler.config.num_train_timesteps
        if not 0 <= timestep_index < n:
            raise ValueError(f"timestep_index must be in [0, {n}), got {timestep_index}")
        self.register_modules(
            vae=vae, transformer=transformer, scheduler=scheduler,
            text_encoder=text_encoder, tokenizer=tokenizer, default_prompt=default_prompt,
        )
        self.register_to_config(
            upscale=upscale, timestep_index=timestep_index, max_sequence_length=max_sequence_length
        )

    # -- the one-step operating point ------------------------------------------------------------------------
    @property
    def sigma(self) -> float:
        """sigma* of the one step; read from a fresh scheduler so that `set_timesteps` calls cannot move it."""
        fresh = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        return float(fresh.sigmas[self.config.timestep_index])

    @property
    def timestep(self) -> float:
        """t* fed to the DiT (sigma* times the number of training timesteps)."""
        return self.sigma * self.scheduler.config.num_train_timesteps

    @property
    def size_multiple(self) -> int:
        """Output sides are padded to a multiple of this (AE compression x DiT patch)."""
        return self.vae.spatial_compression_ratio * self.transformer.config.patch_size

    # -- pieces ------------------------------------------------------------------------------------------------
    def encode_prompt(
        self, prompt: str | list[str] | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings for a batch: the stored default when `prompt` is None, else the text encoder's."""
        device = self.transformer.device
        if prompt is None and self.default_prompt is not None:
            embeds, mask = self.default_prompt.expand(batch_size)
            return embeds.to(device), mask.to(device)
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "this pipeline has no text encoder: pass prompt_embeds (and prompt_attention_mask), "
                "or load a pipeline that has one"
            )
        prompts = [prompt or ""] * batch_size if not isinstance(prompt, list) else prompt
        if len(prompts) != batch_size:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {batch_size} images")
        embeds, mask = encode_prompts(self.tokenizer, self.text_encoder, prompts, self.config.max_sequence_length)
        return embeds.to(device), mask.to(device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, computed in the DC-AE's own dtype."""
        with _own_dtype(self.vae):
            latents = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent
        return latents * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (unclamped), computed in the DC-AE's own dtype."""
        with _own_dtype(self.vae):
            return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    @contextmanager
    def ae_tiling(self, tiling: TileSettings | None):
        """Run the DC-AE tiled (diffusers' own tiling) inside this block when `tiling` is given."""
        vae = self.vae
        if tiling is None:
            yield
            return
        ratio = vae.spatial_compression_ratio
        if tiling.ae_tile % ratio or tiling.ae_overlap % ratio:
            raise ValueError(
                f"AE tile {tiling.ae_tile} and overlap {tiling.ae_overlap} must be multiples of the AE ratio {ratio}"
            )
        saved = {k: v for k, v in vars(vae).items() if k == "use_tiling" or k.startswith("tile_")}
        stride = tiling.ae_tile - tiling.ae_overlap
        vae.enable_tiling(tiling.ae_tile, tiling.ae_tile, stride, stride)
        try:
            yield
        finally:
            for key, value in saved.items():
                setattr(vae, key, value)

    def restore_latents(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor,
        tiling: TileSettings | None = None,
    ) -> torch.Tensor:
        """The one DiT step, over blended latent tiles when `tiling` is given and the latents exceed a tile."""

        def step(z: torch.Tensor) -> torch.Tensor:
            return one_step_restore(self.transformer, z, prompt_embeds, prompt_mask, self.timestep, self.sigma)

        if tiling is None:
            return step(latents)
        m = self.size_multiple
        if tiling.tile % m or tiling.overlap % m:
            raise ValueError(f"tile {tiling.tile} and overlap {tiling.overlap} must be multiples of {m}")
        ratio = self.vae.spatial_compression_ratio
        # One tensor in the model's dtype for every tile, so that the prompt's projections are made once.
        prompt_embeds = prompt_embeds.to(next(self.transformer.parameters()).dtype)
        with reuse_prompt_projections(self.transformer):
            return tiled_apply(step, latents, tiling.tile // ratio, tiling.overlap // ratio)

    # -- the whole restoration -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        upscale: int | None = None,
        tiling: TileSettings | None = None,
        color_fix: str | None = None,
        output_type: str = "pt",
    ):
        """Restore LQ images (PIL, or a (B, 3, h, w) tensor in [0, 1]) to `upscale` times their size.

        Returns a (B, 3, H, W) tensor in [0, 1] (`output_type="pt"`) or a list of PIL images (`"pil"`).
        """
        lq = _to_batch(image).to(self.vae.device)
        scale = upscale or self.config.upscale
        height, width = lq.shape[2] * scale, lq.shape[3] * scale
        upsampled = bicubic_upsample(lq, height, width)
        m = self.size_multiple
        padded = F.pad(upsampled * 2 - 1, (0, -width % m, 0, -height % m), mode="replicate")

        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask = self.encode_prompt(prompt, lq.shape[0])
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)

        with self.ae_tiling(tiling):
            latents = self.encode(padded)
        latents = self.restore_latents(latents, prompt_embeds, prompt_attention_mask, tiling)
        with self.ae_tiling(tiling):
            restored = self.decode(latents)
        restored = ((restored[:, :, :height, :width].float() + 1) / 2).clamp(0, 1)
        restored = apply_color_fix(restored, upsampled.float(), color_fix)

        if output_type == "pil":
            arrays = (restored.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
            return [Image.fromarray(a) for a in arrays]
        return restored

    # -- LoRA and persistence --------------------------------------------------------------------------------
    def merge_lora(self) -> None:
        """Fold the DiT's LoRA adapter into its weights (no-op without one)."""
        if has_lora(self.transformer):
            merge_lora(self.transformer)

    def drop_text_encoder(self) -> None:
        """Forget the text encoder and tokenizer; the stored default prompt embedding keeps the pipeline usable."""
        if self.default_prompt is None:
            raise ValueError("no default prompt embedding is stored: dropping the text encoder would leave no prompt")
        self.register_modules(text_encoder=None, tokenizer=None)

    def save_pretrained(self, save_directory: str | os.PathLike, transformer_state: dict | None = None,
                        overwrite: bool = False, **kwargs) -> None:
        """Write the pipeline folder atomically: model_index.json, a folder per component, `lora/` if any.

        An existing folder is replaced only if empty or written by this method before (its marker file says so),
        or with `overwrite`; else `sana_sr.atomic.OutputError`.

        `transformer_state`: the transformer's state dict to write instead of its own tensors (a trainer's export:
        weights gathered from ZeRO-3 partitions, fp32 masters or the EMA of a bf16 module)."""
        with atomic_directory(save_directory, "SanaSRPipeline.save_pretrained", overwrite=overwrite) as tmp:
            self.write_folder(tmp, transformer_state)

    def write_folder(self, directory: Path, transformer_state: dict | None = None) -> None:
        """What save_pretrained writes, into an existing folder: for callers that add files of their own to the
        same atomic folder (`sana-sr compress` adds its report)."""
        self.save_config(directory)
        for name, component in self.components.items():
            if component is None:
                continue
            if name == "transformer" and (has_lora(component) or transformer_state is not None):
                save_transformer_without_lora(component, directory / name, transformer_state)
            else:
                component.save_pretrained(directory / name)  # a compressed component writes its packed export
        if has_lora(self.transformer):
            save_lora(self.transformer, directory / "lora", transformer_state)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, load_lora_adapter: bool = True,
                        execution: str = "fake-quant", **kwargs):
        """Load a folder or hub repo written by `save_pretrained` or `sana-sr compress`, through diffusers' loader.

        The folder is checked first (sana_sr.model.components): every component an allow-listed class, weights only
        from safetensors, no code from the folder; a hub repo is downloaded only once its configs pass. The `lora/`
        adapter is attached unless told not to. execution="int" runs the compressed DiT and DC-AE decoder on integer
        kernels (each compressed component's `use_integer_kernels`); "fake-quant", the default, is the reference.
        """
        from sana_sr.model.components import prepare_pipeline_folder

        if execution not in ("fake-quant", "int"):
            raise ValueError(f"execution must be 'fake-quant' or 'int', got {execution!r}")
        folder = prepare_pipeline_folder(pretrained_model_name_or_path, kwargs)
        pipe = super().from_pretrained(str(folder), **kwargs)
        adapter = folder / "lora" / LORA_WEIGHT_NAME
        if load_lora_adapter and adapter.is_file():
            load_lora(pipe.transformer, adapter)
        if execution == "int":
            # Compressed components (sana_sr.quantization.components) know how to switch themselves.
            parts = [c for c in (pipe.transformer, pipe.vae) if hasattr(c, "use_integer_kernels")]
            if not parts:
                raise ValueError("execution='int' needs a compressed pipeline folder (written by `sana-sr compress`); "
                                 f"{pretrained_model_name_or_path} is full precision")
            pipe.integer_summary = functools.reduce(operator.add, (part.use_integer_kernels() for part in parts))
            logger.warning(pipe.integer_summary.line())
        return pipe
