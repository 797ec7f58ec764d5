"""SANA-SR: one-step real-world image super-resolution on a frozen DC-AE and a LoRA-adapted SANA DiT.

Exports are resolved on first use, so that tools which need no model (the shard writer, the CLI's help) start
without importing diffusers.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# bitsandbytes (pulled in by pyiqa, imported by peft) logs a warning at import on CPUs with AVX512-BF16 about an
# optional 4-bit kernel package; nothing here uses 4-bit layers, and the line would precede every one-line error.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "build_pipeline": "model.loading",
    "load_pipeline": "model.loading",
    "LoraSettings": "model.lora",
    "SanaSRPipeline": "model.pipeline",
    "one_step_restore": "model.pipeline",
    "PRESETS": "model.presets",
    "Preset": "model.presets",
    "get_preset": "model.presets",
    "PromptEmbedding": "model.text",
    "TileSettings": "model.tiling",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
