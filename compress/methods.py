"""`quantize(model, batches, config)`: min-max PTQ, 2DQuant-style, CompSRT and SPR²Q on any nn.Module.

Common steps: trace the execution order on one batch -> selection plan -> swap in quantized modules -> round the
float leftovers (biases, norms, kept layers) to the storage dtype, so the in-memory model *is* the exported one ->
per-channel weight bounds -> observe activations on the calibration batches -> activation bounds. Then per method:

- minmax:  bounds = observed ranges; nothing learned.
- 2dquant: DOBI bound search, then distillation fine-tune of the clipping bounds (a, b) of every quantizer.
- compsrt: as 2dquant on Hadamard-rotated weights and inputs, with 40% magnitude pruning of the rotated weights at
           3–4 bits (1-bit mask), and the two scalar corrections (δs, δz) learned together with the bounds.
- spr2q:   DOBI bounds; (a) rectifier-group training (rectifiers + gates + bounds); (b) static routing calibration
           (only g per layer); (c) fuse W' = W + Σ gᵢBᵢAᵢ and quantize it.
Finally every layer is finalized to integer codes (see compress.export for the packed file).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import rectifier as rect
from .calibrate import activation_quantizer_list, init_activation_bounds, init_weight_bounds, observe
from .export import DTYPES
from .finetune import distill
from .layers import LayerSpec, QuantMatmul, QuantWeightLayer, quant_modules, replace_module
from .select import Decision, SelectionRule, execution_order, plan

METHODS = ("minmax", "2dquant", "compsrt", "spr2q")


def default_forward(model: nn.Module, batch):
    """model(**batch) for a dict, model(*batch) for a tuple/list, model(batch) otherwise."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@dataclass
class QuantizeConfig:
    """One quantization run."""

    method: str = "compsrt"
    """"minmax", "2dquant", "compsrt" or "spr2q"."""
    wbits: int = 4
    """Weight bits (2..8) of quantized layers."""
    abits: int | None = 4
    """Activation bits (2..8) of layer and matmul inputs; None quantizes weights only."""
    act_granularity: str = "tensor"
    """"tensor" (static, calibrated) or "token" (dynamic per token, learnable clip ratios)."""
    bound_init: str | None = None
    """"minmax", "percentile" or "dobi"; None: minmax for the minmax method, dobi for the others."""
    dobi_candidates: int = 100
    """Candidate ranges tried by the DOBI search (2DQuant: 100)."""
    rotate: bool | None = None
    """Hadamard rotation of dense layers and matmuls; None: on for compsrt only."""
    prune: float | None = None
    """Magnitude-pruned fraction of rotated weights; None: 0.4 for compsrt at 3–4 bits (CompSRT), else 0."""
    steps: int = 200
    """Fine-tune steps: bound calibration (2dquant, compsrt) or rectifier-group training (spr2q)."""
    lr: float = 1e-2
    """Adam lr of bounds and corrections, in units of each quantizer's initial range (so 1e-2 ≈ 1% per step)."""
    lr_rectifier: float = 1e-3
    """Adam lr of SPR²Q rectifiers and gates."""
    routing_steps: int = 50
    """SPR²Q static routing calibration steps (paper: 500 at batch 8)."""
    lr_routing: float = 1e-2
    """Adam lr of the static routing weights g."""
    rectifiers: int = 4
    """SPR²Q group size N (paper default 4)."""
    rank: int = 8
    """SPR²Q rectifier rank r (paper default 8)."""
    feature_weight: float = 1.0
    """λ of the block-wise feature MSE in the distillation loss."""
    float_dtype: str = "float16"
    """Storage dtype of weight scales and of every float tensor kept as is (biases, norms, kept layers)."""
    seed: int = 0
    """Seeds the rectifier init and observers' sampling."""
    trainer: Callable = field(default=distill, repr=False)
    """The fine-tune loop (signature of compress.finetune.distill); sana-sr passes its training loop
    (sana_sr.train.quant.finetune_on_loop)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for what, bits in (("wbits", self.wbits), ("abits", self.abits)):
            if bits is not None and not 2 <= bits <= 8:
                raise ValueError(f"{what} must be in 2..8, got {bits}")
        if self.float_dtype not in DTYPES:
            raise ValueError(f"float_dtype must be one of {tuple(DTYPES)}, got {self.float_dtype!r}")
        if self.prune is not None and not 0 <= self.prune < 1:
            raise ValueError(f"prune must be in [0, 1), got {self.prune}")
        if self.bound_init is None:
            self.bound_init = "minmax" if self.method == "minmax" else "dobi"
        if self.rotate is None:
            self.rotate = self.method == "compsrt"
        if self.prune is None:
            self.prune = 0.4 if self.method == "compsrt" and self.wbits in (3, 4) else 0.0

    @property
    def storage_dtype(self) -> torch.dtype:
        return DTYPES[self.float_dtype]


@dataclass
class QuantizationResult:
    model: nn.Module
    decisions: list[Decision]
    config: QuantizeConfig
    losses: dict[str, list[float]] = field(default_factory=dict)


def _spec_for(decision: Decision, module: nn.Module, cfg: QuantizeConfig) -> LayerSpec:
    dense = decision.kind in ("linear", "conv2d")
    if decision.action == "weight-only":
        return LayerSpec(decision.extra["wbits"], None)
    return LayerSpec(cfg.wbits, cfg.abits, cfg.act_granularity, rotate=bool(cfg.rotate) and dense,
                     prune=cfg.prune if dense else 0.0)


def prepare(model: nn.Module, decisions: Sequence[Decision], cfg: QuantizeConfig) -> None:
    """Swap in quantized modules per the plan and round the float leftovers to the storage dtype."""
    modules = dict(model.named_modules())
    for d in decisions:
        if d.action == "keep":
            continue
        if d.kind == "matmul":
            if cfg.abits is not None:
                replace_module(model, d.name, QuantMatmul(cfg.abits, cfg.act_granularity, bool(cfg.rotate)))
            continue
        layer = QuantWeightLayer.from_module(modules[d.name], _spec_for(d, modules[d.name], cfg), cfg.storage_dtype)
        replace_module(model, d.name, layer.to(modules[d.name].weight.device))
    snap_floats(model, cfg.storage_dtype)


@torch.no_grad()
def snap_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every float tensor that will be stored as is to `dtype` precision (values only; dtype unchanged)."""
    skip: set[int] = set()
    for _, module in quant_modules(model):
        for sub in (getattr(module, n, None) for n in ("wq", "aq", "qa", "qb", "rectifier")):
            if sub is not None:
                skip.update(id(t) for t in sub.parameters())
                skip.update(id(t) for t in sub.buffers())
        if isinstance(module, QuantWeightLayer) and module.weight is not None:
            skip.add(id(module.weight))
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in skip and tensor.is_floating_point():
            tensor.data.copy_(tensor.data.to(dtype).to(tensor.dtype))


def _bound_params(model: nn.Module, corrections: bool) -> list[nn.Parameter]:
    params = []
    for _, module in quant_modules(model):
        if isinstance(module, QuantWeightLayer) and not module.finalized:
            params += module.wq.trainable(bounds=True, corrections=corrections)
    for quantizer in activation_quantizer_list(model):
        params += quantizer.trainable(bounds=True, corrections=corrections)
    return params


def quantize(model: nn.Module, batches: Iterable, config: QuantizeConfig, *, rule: SelectionRule | None = None,
             forward: Callable = default_forward, feature_modules: Sequence[str] = (),
             progress: Callable | None = None) -> QuantizationResult:
    """Quantize `model` in place with `config.method`, calibrating on `batches`; returns the finalized model.

    forward(model, batch) -> output tensor; feature_modules: block names whose outputs the fine-tunes match.
    progress: a tqdm-like wrapper (iterable, desc=...) for the fine-tune loops, or None.
    """
    cfg = config
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches: pass at least one")
    torch.manual_seed(cfg.seed)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        order = execution_order(model, lambda: forward(model, batches[0]))
    decisions = plan(model, rule or SelectionRule(), order)
    prepare(model, decisions, cfg)
    init_weight_bounds(model, cfg.bound_init, cfg.dobi_candidates)
    observe(model, batches, forward)
    init_activation_bounds(model, cfg.bound_init, cfg.dobi_candidates)

    losses: dict[str, list[float]] = {}
    common = dict(forward=forward, feature_modules=feature_modules, feature_weight=cfg.feature_weight,
                  progress=progress)
    if cfg.method in ("2dquant", "compsrt"):
        params = _bound_params(model, corrections=cfg.method == "compsrt")
        losses["bounds"] = cfg.trainer(model, teacher, batches, [{"params": params, "lr": cfg.lr}],
                                       steps=cfg.steps, desc=f"{cfg.method} bounds", **common)
    elif cfg.method == "spr2q":
        losses.update(_spr2q(model, teacher, batches, cfg, common))
    for _, module in quant_modules(model):
        if isinstance(module, QuantWeightLayer):
            module.finalize()
    model.requires_grad_(False)
    return QuantizationResult(model, decisions, cfg, losses)


def _spr2q(model: nn.Module, teacher: nn.Module, batches: list, cfg: QuantizeConfig, common: dict) -> dict:
    generator = torch.Generator().manual_seed(cfg.seed)
    groups = [rect.attach(m, num=cfg.rectifiers, rank=cfg.rank, generator=generator)
              for _, m in quant_modules(model) if isinstance(m, QuantWeightLayer) and m.spec.abits is not None]
    groups = [g for g in groups if g is not None]
    device = next(model.parameters()).device
    for g in groups:
        g.to(device)
    # (a) rectifier-group training: rectifiers, gates and clipping bounds together (Eq. 10, loss Eq. 6).
    rect.set_routing(model, "dynamic")
    rect_params = [p for g in groups for p in (g.A, g.B, *g.gate.parameters())]
    for p in rect_params:
        p.requires_grad_(True)
    losses = {"rectifiers": cfg.trainer(model, teacher, batches,
                                        [{"params": rect_params, "lr": cfg.lr_rectifier},
                                         {"params": _bound_params(model, corrections=False), "lr": cfg.lr}],
                                        steps=cfg.steps, desc="spr2q rectifiers", **common)}
    # (b) offline static routing: everything frozen but one weight vector g per layer (Eq. 12), started at the
    # gate's average routing over the calibration set.
    model.requires_grad_(False)
    for g in groups:
        g.record = []
    with torch.no_grad():
        for batch in batches:
            common["forward"](model, batch)
    for g in groups:
        g.static.data.copy_(torch.stack(g.record).mean(0) if g.record else g.static.data)
        g.record = None
        g.static.requires_grad_(True)
    rect.set_routing(model, "static")
    losses["routing"] = cfg.trainer(model, teacher, batches, [{"params": [g.static for g in groups],
                                                               "lr": cfg.lr_routing}],
                                    steps=cfg.routing_steps, desc="spr2q routing", **common)
    model.requires_grad_(False)
    # (c) fold W' = W + Σ gᵢBᵢAᵢ into the weight; the trained bounds quantize it from now on.
    rect.fuse(model)
    return losses
