"""SANA-SR: one-step real-world image super-resolution on a frozen DC-AE and a LoRA-adapted SANA DiT.

Exports are resolved on first use, so that tools which need no model (the shard writer, the CLI's help) start
without importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_pipeline": "build",
    "load_pipeline": "build",
    "LoraSettings": "lora",
    "SanaSRPipeline": "pipeline",
    "one_step_restore": "pipeline",
    "PRESETS": "presets",
    "Preset": "presets",
    "get_preset": "presets",
    "PromptEmbedding": "text",
    "TileSettings": "tiling",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
