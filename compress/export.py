"""Packed export of a quantized model, and the loader that rebuilds it — no pickled modules.

A folder with two files:
  weights.safetensors — a handful of flat blobs, each the concatenation, in the model's state-dict order, of:
      "packed"     (uint8)  per quantized layer: its 1-bit pruning mask (if pruned), its n-bit zero codes and its
                            n-bit weight codes (only the kept ones when pruned), each bit-packed and byte aligned;
      "scales"     (fp16)   per-output-channel weight scales;
      "quantizers" (fp32)   activation-quantizer parameters (bounds, corrections, units);
      "floats"     (fp16 by default) every other float tensor: biases, norms, layers kept in full precision;
      "raw.<key>"           the rare non-float tensor, as is.
  layout.json — format/version, float dtype, for each quantized layer [wbits, abits, act granularity, rotate,
      prune] and for each quantized matmul [abits, act granularity, rotate], blob sizes, a summary, caller metadata.
      Written last: a folder without it is incomplete.
Shapes are not stored: the loader takes a full-precision skeleton of the same architecture (built from its config),
swaps in the quantized modules the layout names, and reads the blobs back in the skeleton's own state-dict order.
A few large blobs instead of one tensor per weight keep the safetensors header small, which matters for small models.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .integer import EXECUTIONS, to_integer
from .layers import LayerSpec, QuantMatmul, QuantWeightLayer, quant_modules, replace_module
from .pack import pack_bits, packed_nbytes, unpack_bits

FORMAT = "compress-packed"
VERSION = 2
WEIGHTS_FILE = "weights.safetensors"
LAYOUT_FILE = "layout.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # storage dtypes, by name
_PACKED = ("codes", "zero_codes", "scales", "mask")
_QUANTIZERS = ("aq", "qa", "qb")


def _atomic_write(path: Path, write) -> None:
    # compress/ may not import sana_sr: the same temp-then-rename idea as sana_sr.atomic, per file.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _entries(model: nn.Module):
    """The canonical walk shared by export and load: ("layer", name, module) once per quantized layer (its
    packed tensors as a group), ("quantizer" | "float" | "raw", key, tensor) for everything else."""
    modules = dict(quant_modules(model))
    seen: set[str] = set()
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        while owner and owner not in modules:
            owner = owner.rpartition(".")[0]
        module = modules.get(owner) if owner else None
        rest = key[len(owner) + 1:] if module is not None else key
        if isinstance(module, QuantWeightLayer) and rest in _PACKED:
            if owner not in seen:
                seen.add(owner)
                yield "layer", owner, module
        elif module is not None and rest.split(".")[0] in _QUANTIZERS:
            yield "quantizer", key, value
        elif value.is_floating_point():
            yield "float", key, value
        else:
            yield "raw", key, value


def export_quantized(model: nn.Module, directory: str | os.PathLike, *, float_dtype: str = "float16",
                     metadata: dict | None = None) -> dict:
    """Write `model` (its quantized layers finalized) to `directory`; returns the layout that was written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    storage = DTYPES[float_dtype]
    layers, matmuls = {}, {}
    for name, module in quant_modules(model):
        if isinstance(module, QuantWeightLayer):
            if not module.finalized:
                raise ValueError(f"layer {name!r} is not finalized: call quantize() (or layer.finalize()) first")
            layers[name] = module.layout()
        else:
            matmuls[name] = module.layout()
    packed, scales, quantizers, floats, raw = [], [], [], [], {}
    weights = weight_bits = 0.0
    for kind, key, item in _entries(model):
        if kind == "layer":
            layer: QuantWeightLayer = item
            bits = layer.spec.wbits
            codes = layer.codes.cpu()
            if layer.mask is not None:
                mask = layer.mask.flatten(1).cpu()
                packed.append(pack_bits(mask, 1))
                codes = codes[mask]
            packed += [pack_bits(layer.zero_codes.cpu(), bits), pack_bits(codes, bits)]
            stored = layer.scales.cpu().to(storage)
            if not torch.equal(stored.float(), layer.scales.cpu()):
                raise ValueError(f"{key}: scales are not exact in {float_dtype}; quantize with that float_dtype")
            scales.append(stored)
            n = layer.codes.numel()
            weights += n
            weight_bits += (bits * codes.numel() / n + 1 if layer.mask is not None else bits) * n
        elif kind == "quantizer":
            quantizers.append(item.detach().cpu().float().flatten())
        elif kind == "float":
            value = item.detach().cpu()
            stored = value.to(storage)
            if not torch.equal(stored.to(value.dtype), value):
                raise ValueError(f"{key} is not exact in {float_dtype}: quantize() rounds the float leftovers; "
                                 "was the model changed after quantizing?")
            floats.append(stored.flatten())
        else:
            raw[f"raw.{key}"] = item.detach().cpu().contiguous()
    tensors = dict(raw)
    for blob, parts, dtype in (("packed", packed, torch.uint8), ("scales", scales, storage),
                               ("quantizers", quantizers, torch.float32), ("floats", floats, storage)):
        tensors[blob] = torch.cat(parts).contiguous() if parts else torch.zeros(0, dtype=dtype)
    layout = dict(format=FORMAT, version=VERSION, float_dtype=float_dtype, layers=layers, matmuls=matmuls,
                  blobs={k: int(v.numel()) for k, v in tensors.items() if not k.startswith("raw.")},
                  summary=dict(quantized_weights=int(weights),
                               bits_per_weight=round(weight_bits / weights, 4) if weights else 0.0),
                  metadata=metadata or {})
    _atomic_write(directory / WEIGHTS_FILE,
                  lambda p: safetensors.torch.save_file(tensors, str(p), metadata={"format": FORMAT}))
    _atomic_write(directory / LAYOUT_FILE, lambda p: p.write_text(json.dumps(layout, separators=(",", ":"))))
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


class _Reader:
    """Sequential reads from one flat blob, with a clear error when the skeleton asks for more than is there."""

    def __init__(self, name: str, blob: torch.Tensor):
        self.name, self.blob, self.pos = name, blob, 0

    def take(self, count: int) -> torch.Tensor:
        if self.pos + count > self.blob.numel():
            raise ValueError(f"blob {self.name!r} ends at {self.blob.numel()} but the skeleton needs "
                             f"{self.pos + count}: the skeleton does not match the exported architecture")
        out = self.blob[self.pos:self.pos + count]
        self.pos += count
        return out

    def done(self) -> None:
        if self.pos != self.blob.numel():
            raise ValueError(f"blob {self.name!r} has {self.blob.numel() - self.pos} unread values: the skeleton "
                             "does not match the exported architecture")


def load_quantized(model: nn.Module, directory: str | os.PathLike, *, execution: str = "fake-quant") -> nn.Module:
    """Rebuild the exported quantized model inside `model`, a skeleton of the same architecture.

    The skeleton's parameters may be on the meta device (nothing is allocated for them: every tensor is assigned
    from the export). execution="int" then runs the layers that have an integer kernel through it
    (`compress.integer.to_integer`; its summary is left in `model.integer_summary`); "fake-quant" (the reference)
    dequantizes weights on the fly. Either way no float copy of a quantized weight is kept."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    layout = read_layout(directory)
    storage = DTYPES[layout["float_dtype"]]
    tensors = safetensors.torch.load_file(str(Path(directory) / WEIGHTS_FILE))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device("cpu") if device.type == "meta" else device
    skeleton = dict(model.named_modules())
    with torch.device("meta"):  # placeholders only: every tensor of the quantized modules is assigned below
        for name, spec in layout["layers"].items():
            if not isinstance(skeleton.get(name), (nn.Linear, nn.Conv2d)):
                raise ValueError(f"the skeleton has no Linear/Conv2d {name!r}: the skeleton does not match the "
                                 "exported architecture")
            replace_module(model, name, QuantWeightLayer.empty_like(skeleton[name], LayerSpec(*spec), storage))
        for name, spec in layout["matmuls"].items():
            replace_module(model, name, QuantMatmul.from_layout(spec))
    readers = {k: _Reader(k, tensors[k]) for k in ("packed", "scales", "quantizers", "floats")}
    state = {}
    for kind, key, item in _entries(model):
        if kind == "layer":
            layer: QuantWeightLayer = item
            rows, cols = layer.codes.shape
            bits = layer.spec.wbits
            mask = None
            if layer.mask is not None:
                mask = unpack_bits(readers["packed"].take(packed_nbytes(rows * cols, 1)), 1, rows * cols)
                mask = mask.bool().view(rows, cols)
                state[f"{key}.mask"] = mask.view(layer.mask.shape)
            zero = unpack_bits(readers["packed"].take(packed_nbytes(rows, bits)), bits, rows)
            count = int(mask.sum()) if mask is not None else rows * cols
            codes = unpack_bits(readers["packed"].take(packed_nbytes(count, bits)), bits, count)
            if mask is not None:
                # Pruned slots get the row's zero code, as finalize() leaves them.
                full = zero[:, None].expand(rows, cols).clone()
                full[mask] = codes
                codes = full
            state[f"{key}.zero_codes"] = zero
            state[f"{key}.codes"] = codes.view(rows, cols)
            state[f"{key}.scales"] = readers["scales"].take(rows).float()
        elif kind == "raw":
            if f"raw.{key}" not in tensors:
                raise ValueError(f"{key} is not in the export: the skeleton does not match the exported architecture")
            state[key] = tensors[f"raw.{key}"]
        else:
            blob = readers["quantizers" if kind == "quantizer" else "floats"]
            state[key] = blob.take(item.numel()).view(item.shape).to(item.dtype)
    for reader in readers.values():
        reader.done()
    del tensors, readers
    model.load_state_dict(state, strict=True, assign=True)
    del state
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"{len(missing)} tensors of the skeleton are not in the export (first: {missing[0]}): "
                         "the skeleton does not match the exported architecture")
    model = model.to(device)
    if execution == "int":
        model.integer_summary = to_integer(model)
    return model


def export_size(directory: str | os.PathLike) -> int:
    """Bytes on disk of an export (weights + layout)."""
    directory = Path(directory)
    return sum((directory / f).stat().st_size for f in (WEIGHTS_FILE, LAYOUT_FILE))


def nominal_bits(layout: dict) -> dict:
    """Bits per quantized weight as the papers count them (b, or b·(1−p)+1 with pruning), from the layout."""
    return dict(layout["summary"])


def fp16_reference_bytes(model: nn.Module, directory: str | os.PathLike) -> int:
    """Size of `model`'s state dict saved as plain fp16 safetensors (the baseline an export is compared with)."""
    path = Path(directory) / f".fp16-reference-{uuid.uuid4().hex[:8]}.safetensors"
    state = {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items()}
    try:
        _atomic_write(path, lambda p: safetensors.torch.save_file(state, str(p)))
        return path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
