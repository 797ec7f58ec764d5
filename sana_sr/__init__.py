"""SANA-SR: one-step real-world image super-resolution on a frozen DC-AE and a LoRA-adapted SANA DiT."""

from .build import build_pipeline, load_pipeline
from .lora import LoraSettings
from .pipeline import SanaSRPipeline, one_step_restore
from .presets import PRESETS, Preset, get_preset
from .text import PromptEmbedding
from .tiling import TileSettings

__all__ = [
    "PRESETS",
    "LoraSettings",
    "Preset",
    "PromptEmbedding",
    "SanaSRPipeline",
    "TileSettings",
    "build_pipeline",
    "get_preset",
    "load_pipeline",
    "one_step_restore",
]
__version__ = "0.1.0"
