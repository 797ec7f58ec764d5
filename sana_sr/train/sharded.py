"""Parameters that DeepSpeed partitions: where each rank's part of a fp32 master lives, whole tensors from the
parts, and ZeRO-3 gathering for the replica check and the exports.

Under DeepSpeed bf16 the module's parameters are bf16 copies of fp32 masters that the optimizer keeps, partitioned
over the ranks (ZeRO-1/2: each rank holds a slice of the flattened trainable weights; ZeRO-3: a slice of every
parameter, and the module holds empty placeholders, frozen ones included). Anything that reads trained weights (the
EMA, the replica check, LoRA and pipeline saves) goes through here. Without DeepSpeed a master is the parameter.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class MasterSlice:
    """Where this rank's part of one parameter's fp32 master lives."""

    numel: int
    """Elements of the whole (flattened) parameter."""
    start: int
    """Offset of this rank's slice in the flattened parameter."""
    length: int
    """Elements of the slice (0: this rank owns none of the parameter)."""
    shape: torch.Size
    """Shape of the whole parameter."""
    param: torch.nn.Parameter

    def read(self) -> torch.Tensor:
        """This rank's slice of the fp32 master, flattened (a view where the optimizer allows it)."""
        p = self.param
        if hasattr(p, "ds_id"):  # ZeRO-3: the optimizer's fp32 partition of this parameter
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p).view(-1)[: self.length]
        if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and DeepSpeed's bf16 optimizer: a fragment of a flat partition
            if p._hp_mapping is None:
                return torch.empty(0, dtype=torch.float32, device=p.device)
            return p._hp_mapping.get_hp_fragment().view(-1)
        return p.detach().reshape(-1).float()


def master_slice(param: torch.nn.Parameter) -> MasterSlice:
    if hasattr(param, "ds_id"):
        numel, per_rank = param.ds_numel, param.ds_tensor.numel()
        start = min(numel, torch_dist.get_rank() * per_rank)
        return MasterSlice(numel, start, min(numel, start + per_rank) - start, param.ds_shape, param)
    if getattr(param, "_hp_mapping", None) is not None:
        address = param._hp_mapping.lp_fragment_address
        return MasterSlice(param.numel(), address.start, address.numel, param.shape, param)
    if hasattr(param, "_hp_mapping"):
        return MasterSlice(param.numel(), 0, 0, param.shape, param)
    return MasterSlice(param.numel(), 0, param.numel(), param.shape, param)


def partitioned(slices: list[MasterSlice]) -> bool:
    """True when the masters are spread over the ranks (DeepSpeed), so whole tensors need a collective."""
    return any(hasattr(s.param, "ds_id") or hasattr(s.param, "_hp_mapping") for s in slices)


def assemble(slices: list[MasterSlice], parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole fp32 tensors from every rank's `parts` (one per slice). Collective when the slices are partitioned:
    each rank writes its slice into zeros and a sum over the ranks fills in the rest (slices do not overlap)."""
    spread = partitioned(slices) and torch_dist.is_initialized() and torch_dist.get_world_size() > 1
    out = []
    for s, part in zip(slices, parts, strict=True):
        if not spread and s.length == s.numel:
            out.append(part.detach().float().clone().view(s.shape))
            continue
        whole = torch.zeros(s.numel, dtype=torch.float32, device=part.device)
        whole.narrow(0, s.start, s.length).copy_(part)
        if spread:
            torch_dist.all_reduce(whole)
        out.append(whole.view(s.shape))
    return out


def full_masters(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The whole fp32 master of each parameter (collective under DeepSpeed)."""
    slices = [master_slice(p) for p in params]
    return assemble(slices, [s.read() for s in slices])




def zero3(params) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def gathered(params: list[torch.nn.Parameter]):
    """Inside this block ZeRO-3 parameters hold their whole (16-bit) values on every rank; collective. A no-op
    for parameters that are not partitioned."""
    if not zero3(params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def module_state(module: torch.nn.Module, dtypes: dict[str, torch.dtype], keep: bool) -> dict[str, torch.Tensor]:
    """The module's whole state dict on the CPU, each tensor cast back to the dtype it had before DeepSpeed cast the
    module (`dtypes`); collective under ZeRO-3 (every rank calls it), returned where `keep` (else {})."""
    with gathered(list(module.parameters())):
        if not keep:
            return {}
        return {k: v.detach().to("cpu", dtypes.get(k, v.dtype), copy=True) for k, v in module.state_dict().items()}
