"""Data: shard writing (`shards`), streaming (`streaming`), Real-ESRGAN degradation (`degradation`, `kernels`).

Imports are lazy so that `import sana_sr.data.shards` in a shard-writing job does not pull in torch's loader stack.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "LoaderConfig": "streaming",
    "StreamingLoader": "streaming",
    "make_loader": "streaming",
    "resolve_shards": "streaming",
    "DegradationConfig": "degradation_config",
    "RealESRGANDegradation": "degradation",
    "usm_sharpen": "degradation",
    "draw_kernels": "kernels",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
