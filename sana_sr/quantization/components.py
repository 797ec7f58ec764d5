"""Compressed SANA-SR components as diffusers models: each one's folder describes and holds itself.

    transformer/config.json          the DiT's architecture; _class_name QuantizedSanaTransformer2DModel
                                     (QuantizedPrunedSanaTransformer2DModel for a pruned DiT: per-block widths)
    transformer/layout.json          compress's packed export of the DiT; its metadata: the folded t*, if any
    transformer/weights.safetensors
    vae/config.json                  the DC-AE's architecture; _class_name QuantizedAutoencoderDC
    vae/layout.json                  the packed export of the decoder
    vae/weights.safetensors
    vae/encoder.safetensors          the encoder, full precision (stored in the export's float dtype)

`from_pretrained` builds the full-precision architecture from config.json, installs the matmul sites (and the
folded timestep), and reads the packed export into it, so diffusers' pipeline loader loads a compressed folder
like any other: model_index.json names these classes. No pickled modules, no code from the folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import safetensors.torch
import torch
from accelerate import init_empty_weights

# diffusers' pipeline loader looks the base classes up in the module that defines a component's class.
from diffusers import AutoencoderDC, ModelMixin, SanaTransformer2DModel  # noqa: F401

from compress import export_quantized, load_quantized, read_layout
from compress.export import DTYPES as FLOAT_DTYPES
from compress.integer import EXECUTIONS, IntegerSummary, to_integer
from sana_sr.pruning.model import PrunedSanaTransformer2DModel
from sana_sr.quantization.sana import FoldedTimestep, folded_skeleton, install_matmul_sites

ENCODER_FILE = "encoder.safetensors"
log = logging.getLogger("sana_sr.quantization")


class QuantizedComponent:
    """What a quantized class adds to its full-precision base: writing and reading the packed export.

    It adds no state of its own (the quantized modules are installed in the base's module tree), so a model
    quantized in memory becomes one in place (`as_quantized`), and `float_dtype` is the export's float storage."""

    float_dtype: str | None = None
    execution: str = "fake-quant"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        if self.execution != "fake-quant":
            raise ValueError(f"{type(self).__name__} runs on integer kernels (its codes were handed to them): load "
                             "the folder again with execution='fake-quant' to save it")
        if self.float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"{type(self).__name__} has no float dtype for its export (got {self.float_dtype!r}): "
                             "make it with as_quantized(model, float_dtype)")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_config(directory)
        self._save_export(directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, execution: str = "fake-quant", **kwargs):
        """Rebuild the component from its own folder (config.json + packed export). diffusers' loading options
        (device_map, low_cpu_mem_usage, use_safetensors, ...) do not apply: the export is always safetensors.

        execution: "fake-quant" (the reference: weights dequantized on the fly) or "int" (the layers that have an
        integer kernel run on it, the others dequantized; one summary line is logged). The architecture is built
        without allocating its parameters: every tensor comes from the folder, and no float copy of a quantized
        weight is ever made."""
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        if not (folder / cls.config_name).is_file():
            raise FileNotFoundError(f"{folder / cls.config_name} not found: {cls.__name__} loads from a component "
                                    "folder written by `sana-sr compress`")
        layout = read_layout(folder)
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(cls.load_config(folder))
        model._load_export(folder, layout)
        missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if missing:
            raise ValueError(f"{folder}: {len(missing)} tensors are in neither the export nor the encoder file "
                             f"(first: {missing[0]}); re-run `sana-sr compress`")
        model.float_dtype = layout["float_dtype"]
        model.requires_grad_(False).eval()
        if execution == "int":
            log.warning(model.use_integer_kernels().line())
        return model.to(torch_dtype) if torch_dtype is not None else model

    def use_integer_kernels(self) -> IntegerSummary:
        """Run the quantized layers that have an integer kernel on it, from now on (one way: each layer's codes
        become the kernel's weights). Returns what was converted and what stays dequantized."""
        summary = to_integer(self._quantized_part())
        self.execution = "int"
        return summary

    def _quantized_part(self) -> torch.nn.Module:
        return self

    def _save_export(self, directory: Path) -> None:
        raise NotImplementedError

    def _load_export(self, folder: Path, layout: dict) -> None:
        raise NotImplementedError


class _QuantizedDiT(QuantizedComponent):
    def _save_export(self, directory: Path) -> None:
        # FoldedTimestep's t* is not a tensor, so the export's metadata carries it.
        folded = self.time_embed.timestep if isinstance(self.time_embed, FoldedTimestep) else None
        export_quantized(self, directory, float_dtype=self.float_dtype, metadata=dict(folded_timestep=folded))

    def _load_export(self, folder: Path, layout: dict) -> None:
        install_matmul_sites(self)
        folded = layout.get("metadata", {}).get("folded_timestep")
        if folded is not None:
            folded_skeleton(self, folded)
        load_quantized(self, folder)


class QuantizedSanaTransformer2DModel(_QuantizedDiT, SanaTransformer2DModel):
    """SANA's DiT with low-bit layers and matmuls, as written by `sana-sr compress`."""


class QuantizedPrunedSanaTransformer2DModel(_QuantizedDiT, PrunedSanaTransformer2DModel):
    """A pruned SANA DiT (per-block widths in its config) with low-bit layers and matmuls."""


class QuantizedAutoencoderDC(QuantizedComponent, AutoencoderDC):
    """DC-AE with a low-bit decoder; the encoder stays full precision (it runs once, on the LQ image)."""

    def _save_export(self, directory: Path) -> None:
        storage = FLOAT_DTYPES[self.float_dtype]
        encoder = {k: v.detach().cpu().to(storage).contiguous() for k, v in self.encoder.state_dict().items()}
        safetensors.torch.save_file(encoder, str(directory / ENCODER_FILE))
        export_quantized(self.decoder, directory, float_dtype=self.float_dtype)

    def _quantized_part(self) -> torch.nn.Module:
        return self.decoder

    def _load_export(self, folder: Path, layout: dict) -> None:
        encoder = safetensors.torch.load_file(str(folder / ENCODER_FILE))
        self.encoder.load_state_dict({k: v.float() for k, v in encoder.items()}, strict=True, assign=True)
        install_matmul_sites(self.decoder)
        load_quantized(self.decoder, folder)


# The quantized class of each full-precision one; exact types, since the pruned DiT is a SanaTransformer2DModel too.
QUANTIZED_CLASSES: dict[type, type] = {
    SanaTransformer2DModel: QuantizedSanaTransformer2DModel,
    PrunedSanaTransformer2DModel: QuantizedPrunedSanaTransformer2DModel,
    AutoencoderDC: QuantizedAutoencoderDC,
}


def as_quantized(model: torch.nn.Module, float_dtype: str) -> torch.nn.Module:
    """Make a model quantized in place (its quantized modules installed and finalized) the quantized class of its
    own, which saves and loads the packed export; returns the same object."""
    target = type(model) if isinstance(model, QuantizedComponent) else QUANTIZED_CLASSES.get(type(model))
    if target is None:
        raise TypeError(f"no quantized class for {type(model).__name__} (known: "
                        f"{', '.join(c.__name__ for c in QUANTIZED_CLASSES)})")
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {tuple(FLOAT_DTYPES)}, got {float_dtype!r}")
    model.__class__ = target
    model.float_dtype = float_dtype
    return model
