"""Capturing intermediate outputs: forward hooks that keep what named modules return, for feature losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def first_tensor(out):
    """The first tensor of a module's output (a tensor, a tuple/list of them, or an object with `.sample`)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot find a tensor in a {type(out).__name__} output")


class FeatureTap:
    """Keeps the (first tensor) output of each named module of `model` from its latest forward call.

    Use it as a context manager (hooks removed on exit) or call `close()`; `pop()` hands the features over and
    starts afresh; `ordered()` lists them in the order of `names`.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"feature modules not in the model: {missing[:5]} (of {len(missing)})")
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(_module, _args, out):
            self.features[name] = first_tensor(out)
        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        features, self.features = self.features, {}
        return features

    def ordered(self) -> list[torch.Tensor]:
        """The captured features in the order of `names` (those not reached in the last forward are missing)."""
        return [self.features[n] for n in self.names if n in self.features]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> FeatureTap:
        self.features = {}
        return self

    def __exit__(self, *exc) -> None:
        self.close()
