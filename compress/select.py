"""Which layers to quantize, and why the others stay in full precision.

The rule, in order (the first that applies wins, and its reason is recorded):
1. a name matching one of `keep` (model-specific: e.g. a timestep MLP) — the caller's reason;
2. the first and the last weight layer *executed* in each scope (traced on a calibration batch, not guessed from
   registration order): the first reads the raw input (pixels or latents, a wide range every later error builds on),
   the last writes the output with nothing after it to absorb an error; both hold few weights. They stay full precision,
   or get `boundary_wbits`-bit weights with full-precision inputs when that is set;
3. a layer never executed on the calibration batch — no statistics to calibrate it with;
4. every other nn.Linear and nn.Conv2d (1x1, kxk, grouped, depthwise) and every `MatMul` site is quantized.
Norms, embeddings and other parameter holders are not matmuls or convs: they stay full precision (fp16 on disk).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .layers import MatMul


@dataclass
class SelectionRule:
    """The module-selection rule (see the module docstring)."""

    keep: tuple[tuple[str, str], ...] = ()
    """(glob on the module name, reason) pairs kept in full precision."""
    keep_first_last: bool = True
    """Keep the first and last executed weight layer of each scope out of low-bit quantization."""
    scopes: tuple[str, ...] = ("",)
    """Module-name prefixes, each with its own first/last layer ("" is the whole model)."""
    boundary_wbits: int | None = None
    """None: first/last layers stay full precision; else their weights get this many bits (inputs stay fp)."""
    quantize_matmuls: bool = True
    """Quantize the inputs of `compress.MatMul` sites (attention matmuls)."""

    def __post_init__(self) -> None:
        self.keep = tuple((str(p), str(r)) for p, r in self.keep)
        self.scopes = tuple(self.scopes)
        if self.boundary_wbits is not None and not 2 <= self.boundary_wbits <= 8:
            raise ValueError(f"boundary_wbits must be None or in 2..8, got {self.boundary_wbits}")


@dataclass
class Decision:
    """What happens to one module."""

    name: str
    kind: str
    """"linear", "conv2d", "conv2d-depthwise", "conv2d-grouped", "matmul", or the class name of a kept module."""
    action: str
    """"quantize", "weight-only" or "keep"."""
    reason: str
    params: int = 0
    extra: dict = field(default_factory=dict)


def layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups == 1:
            return "conv2d"
        if module.groups == module.in_channels == module.out_channels:
            return "conv2d-depthwise"
        return "conv2d-grouped"
    if isinstance(module, MatMul):
        return "matmul"
    return None


def execution_order(model: nn.Module, run: Callable[[], object]) -> list[str]:
    """Names of Linear/Conv2d/MatMul modules in the order `run()` first calls them."""
    order: list[str] = []
    seen: set[str] = set()
    handles = []
    for name, module in model.named_modules():
        if layer_kind(module) is not None:
            def hook(_m, _args, _out, name=name):
                if name not in seen:
                    seen.add(name)
                    order.append(name)
            handles.append(module.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order


def _in_scope(name: str, scope: str) -> bool:
    return scope == "" or name == scope or name.startswith(scope + ".")


def plan(model: nn.Module, rule: SelectionRule, order: list[str] | None = None) -> list[Decision]:
    """One Decision per weight layer, matmul site and other parameter-holding leaf of `model`."""
    modules = dict(model.named_modules())
    candidates = [n for n, m in modules.items() if layer_kind(m) is not None]
    executed = order if order is not None else candidates
    boundaries: dict[str, str] = {}
    if rule.keep_first_last:
        for scope in rule.scopes:
            in_scope = [n for n in executed if _in_scope(n, scope) and layer_kind(modules[n]) != "matmul"]
            label = f"scope {scope!r}" if scope else "the model"
            if in_scope:
                boundaries.setdefault(in_scope[0], f"first layer of {label}: reads the raw input, whose wide range "
                                                   "and errors every later layer inherits; few weights")
                boundaries.setdefault(in_scope[-1], f"last layer of {label}: writes the output, with nothing after "
                                                    "it to absorb a quantization error; few weights")
    decisions = []
    for name in candidates:
        module, kind = modules[name], layer_kind(modules[name])
        params = sum(p.numel() for p in module.parameters(recurse=False))
        keep = next((reason for pattern, reason in rule.keep if fnmatch.fnmatchcase(name, pattern)), None)
        if keep is not None:
            decisions.append(Decision(name, kind, "keep", keep, params))
        elif kind == "matmul":
            if not rule.quantize_matmuls:
                decisions.append(Decision(name, kind, "keep", "matmul quantization switched off", 0))
            elif name not in executed:
                decisions.append(Decision(name, kind, "keep", "not executed on the calibration batch", 0))
            else:
                decisions.append(Decision(name, kind, "quantize", "attention/matmul inputs, per tensor", 0))
        elif name in boundaries:
            action = "keep" if rule.boundary_wbits is None else "weight-only"
            decisions.append(Decision(name, kind, action, boundaries[name], params,
                                      {"wbits": rule.boundary_wbits} if rule.boundary_wbits else {}))
        elif name not in executed:
            decisions.append(Decision(name, kind, "keep", "not executed on the calibration batch: nothing to "
                                                          "calibrate its input with", params))
        else:
            reason = {
                "linear": "linear layer",
                "conv2d": "dense conv",
                "conv2d-depthwise": "depthwise conv: per-channel weights, never rotated (rotation would mix the "
                                    "channels it keeps apart)",
                "conv2d-grouped": "grouped conv: per-channel weights, never rotated",
            }[kind]
            decisions.append(Decision(name, kind, "quantize", reason, params))
    for name, module in modules.items():
        if layer_kind(module) is None and any(True for _ in module.parameters(recurse=False)):
            params = sum(p.numel() for p in module.parameters(recurse=False))
            decisions.append(Decision(name or "<root>", type(module).__name__, "keep",
                                      "not a matmul or conv (norm, embedding, table): elementwise or a lookup, "
                                      "few parameters; stored in the float dtype", params))
    return decisions


def summarize(decisions: list[Decision]) -> str:
    """A short text table: action, kind, name, reason."""
    lines = [f"{d.action:<11} {d.kind:<17} {d.name:<48} {d.reason}" for d in decisions]
    return "\n".join(lines)
