"""Packed export of a quantized model, and the loader that rebuilds it — no pickled modules.

A folder with two files:
  weights.safetensors — per quantized layer: `<name>.codes` (n-bit codes packed into uint8; with pruning only the
                        kept ones), `<name>.zero_codes` (n-bit, packed), `<name>.scales` (fp16), `<name>.mask`
                        (1 bit per weight, packed) when pruned; activation-quantizer parameters in fp32; every other
                        tensor of the state dict (biases, norms, kept layers) in the float dtype.
  layout.json         — format version, the float dtype, each quantized layer's shape/bits/rotation/pruning/conv
                        arguments, each quantized matmul, the packed tensors' bit widths and counts, and caller
                        metadata. Written last: a folder without it is incomplete.
`load_quantized(model, folder)` swaps the quantized modules into a full-precision skeleton of the same architecture
(built from its config, e.g. on any device) and loads the state strictly: every tensor must be accounted for.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .layers import QuantMatmul, QuantWeightLayer, quant_modules, replace_module
from .pack import pack_bits, unpack_bits

FORMAT = "compress-packed"
VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
LAYOUT_FILE = "layout.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _atomic_write(path: Path, write) -> None:
    # compress/ may not import sana_sr: the same temp-then-rename idea as sana_sr.atomic, per file.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _owner(key: str, prefixes: dict[str, nn.Module]):
    name, _, leaf = key.rpartition(".")
    while name:
        if name in prefixes:
            return name, key[len(name) + 1:]
        name = name.rpartition(".")[0]
    return None, key


def export_quantized(model: nn.Module, directory: str | os.PathLike, *, float_dtype: str = "float16",
                     metadata: dict | None = None) -> dict:
    """Write `model` (finalized quantized layers) to `directory`; returns the layout dict that was written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    storage = _DTYPES[float_dtype]
    modules = dict(quant_modules(model))
    layers, matmuls = {}, {}
    for name, module in modules.items():
        if isinstance(module, QuantWeightLayer):
            if not module.finalized:
                raise ValueError(f"layer {name!r} is not finalized: call quantize() (or layer.finalize()) first")
            layers[name] = module.layout()
        else:
            matmuls[name] = module.layout()
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, dict] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        owner, leaf = _owner(key, modules)
        module = modules.get(owner)
        if isinstance(module, QuantWeightLayer) and leaf in ("codes", "zero_codes", "mask"):
            bits = 1 if leaf == "mask" else module.spec.wbits
            data = value[module.mask.flatten(1).cpu()] if leaf == "codes" and module.mask is not None else value
            tensors[key] = pack_bits(data.to(torch.uint8), bits)
            packed[key] = dict(bits=bits, count=data.numel(), shape=list(value.shape), kept_only=data is not value)
        elif isinstance(module, QuantWeightLayer) and leaf == "scales":
            scales = value.to(storage)
            if not torch.equal(scales.float(), value):
                raise ValueError(f"{key}: scales are not exact in {float_dtype}; quantize with that float_dtype")
            tensors[key] = scales.contiguous()
        elif module is not None and leaf.split(".")[0] in ("aq", "qa", "qb"):
            tensors[key] = value.float().contiguous()
        elif value.is_floating_point():
            stored = value.to(storage)
            if not torch.equal(stored.to(value.dtype), value):
                raise ValueError(f"{key} is not exact in {float_dtype}: quantize() rounds the float leftovers; "
                                 "was the model changed after quantizing?")
            tensors[key] = stored.contiguous()
        else:
            tensors[key] = value.contiguous()
    layout = dict(format=FORMAT, version=VERSION, float_dtype=float_dtype, layers=layers, matmuls=matmuls,
                  packed=packed, metadata=metadata or {})
    _atomic_write(directory / WEIGHTS_FILE,
                  lambda p: safetensors.torch.save_file(tensors, str(p), metadata={"format": FORMAT}))
    _atomic_write(directory / LAYOUT_FILE, lambda p: p.write_text(json.dumps(layout, indent=1)))
    return layout


def read_layout(directory: str | os.PathLike) -> dict:
    path = Path(directory) / LAYOUT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a compress export (or an interrupted one); re-export it")
    layout = json.loads(path.read_text())
    if layout.get("format") != FORMAT or layout.get("version") != VERSION:
        raise ValueError(f"{path}: format {layout.get('format')!r} v{layout.get('version')} is not "
                         f"{FORMAT!r} v{VERSION}; re-export with this version of compress")
    return layout


def load_quantized(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Rebuild the exported quantized model inside `model`, a full-precision skeleton of the same architecture."""
    layout = read_layout(directory)
    storage = _DTYPES[layout["float_dtype"]]
    tensors = safetensors.torch.load_file(str(Path(directory) / WEIGHTS_FILE))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    skeleton = dict(model.named_modules())
    for name, spec in layout["layers"].items():
        _check_skeleton(skeleton.get(name), name, spec)
        layer = QuantWeightLayer.from_layout(spec, scale_dtype=storage)
        rows = spec["weight_shape"][0]
        cols = int(torch.Size(spec["weight_shape"][1:]).numel())
        layer.set_codes(torch.zeros(rows, cols, dtype=torch.uint8), torch.zeros(rows, dtype=torch.uint8),
                        torch.ones(rows))
        replace_module(model, name, layer)
    for name, spec in layout["matmuls"].items():
        replace_module(model, name, QuantMatmul.from_layout(spec))
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing or extra:
        raise KeyError(f"skeleton and {Path(directory) / WEIGHTS_FILE} disagree: {len(missing)} tensors missing "
                       f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]}); build the skeleton from "
                       "the same architecture/config as the exported model")
    state, deferred = {}, []
    for key, target in expected.items():
        info = layout["packed"].get(key)
        if info is None:
            state[key] = tensors[key].to(target.dtype)
        elif info["kept_only"]:
            deferred.append(key)
        else:
            values = unpack_bits(tensors[key], info["bits"], info["count"]).view(info["shape"])
            state[key] = values.bool() if info["bits"] == 1 and key.endswith(".mask") else values
    for key in deferred:
        # Pruned layer: scatter the kept codes; pruned slots get the row's zero code (as finalize() puts there).
        info, owner = layout["packed"][key], key[: -len(".codes")]
        kept = unpack_bits(tensors[key], info["bits"], info["count"])
        full = state[f"{owner}.zero_codes"][:, None].expand(info["shape"]).clone()
        full[state[f"{owner}.mask"].flatten(1)] = kept
        state[key] = full
    model.load_state_dict(state, strict=True)
    return model.to(device)


def _check_skeleton(module: nn.Module | None, name: str, spec: dict) -> None:
    """The float module the quantized layer replaces must have the exported layer's shape."""
    if module is None:
        raise KeyError(f"the skeleton has no module {name!r}: build it from the exported model's config")
    weight = getattr(module, "weight", None)
    expected = [spec["weight_shape"][0], spec["in_size"], *spec["weight_shape"][2:]]
    if weight is None or list(weight.shape) != expected:
        got = list(weight.shape) if weight is not None else type(module).__name__
        raise ValueError(f"skeleton module {name!r} has weight {got}, the export has {expected}: the skeleton "
                         "does not match the exported architecture")


def export_size(directory: str | os.PathLike) -> int:
    """Bytes on disk of an export (weights + layout)."""
    directory = Path(directory)
    return sum((directory / f).stat().st_size for f in (WEIGHTS_FILE, LAYOUT_FILE))


def nominal_bits(layout: dict) -> dict:
    """Bits per weight of the quantized layers as the papers count them: b, or b·(1−p)+1 with pruning."""
    total_weights = total_bits = 0.0
    for spec in layout["layers"].values():
        n = int(torch.Size(spec["weight_shape"]).numel())
        b = spec["wbits"]
        bits = b * spec["kept"] / n + 1 if spec["prune"] > 0 else b
        total_weights += n
        total_bits += bits * n
    return dict(quantized_weights=int(total_weights),
                bits_per_weight=total_bits / total_weights if total_weights else 0.0)


def fp16_reference_bytes(model: nn.Module, directory: str | os.PathLike) -> int:
    """Size of `model`'s full state dict saved as fp16 safetensors (the baseline the export is compared with)."""
    path = Path(directory) / "fp16-reference.safetensors"
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items()}
    _atomic_write(path, lambda p: safetensors.torch.save_file(state, str(p)))
    size = path.stat().st_size
    path.unlink()
    return size
