"""The Accelerator for every launcher (plain python, torchrun, `accelerate launch`, Slurm), with the traps closed.

Checked on CPU machines (accelerate 1.15, deepspeed 0.19):
- a plain `Accelerator()` in two torchrun/`--multi_gpu` processes on CPU gives two unsynchronised "rank 0" copies:
  `cpu=True` is what makes it MULTI_CPU on gloo;
- DeepSpeed on CPU needs gloo passed explicitly, and `cpu=True` would silently swap DeepSpeed for DDP;
- DeepSpeed cannot read the micro batch from a webdataset loader (it is not a DataLoader), so it is set here.
After construction the world is verified: the launcher's WORLD_SIZE must match, and an all-reduce must sum to it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from .config import DistConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def mixed_precision(dist: DistConfig, on_cpu: bool) -> str:
    if dist.mixed_precision == "auto":
        return "no" if on_cpu else "bf16"
    return dist.mixed_precision


def build_accelerator(
    dist: DistConfig, accumulation: int, micro_batch: int, grad_clip: float, log_with: list[str] | None = None,
    ddp_kwargs: dict | None = None,
) -> Accelerator:
    on_cpu = dist.cpu or not torch.cuda.is_available()
    common = dict(
        mixed_precision=mixed_precision(dist, on_cpu), gradient_accumulation_steps=accumulation, log_with=log_with
    )
    if dist.strategy == "deepspeed":
        _single_process_group_env()
        config_path = Path(dist.deepspeed_config)
        if not config_path.is_absolute() and not config_path.exists():
            config_path = REPO_ROOT / config_path
        if not config_path.is_file():
            raise FileNotFoundError(f"dist.deepspeed_config {dist.deepspeed_config} does not exist")
        plugin = DeepSpeedPlugin(
            hf_ds_config=str(config_path), gradient_accumulation_steps=accumulation, gradient_clipping=grad_clip
        )
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
        handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu else []
        accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers, **common)
    else:
        handlers = [DistributedDataParallelKwargs(**ddp_kwargs)] if ddp_kwargs else []
        accelerator = Accelerator(cpu=on_cpu, kwargs_handlers=handlers, **common)
    verify_world(accelerator)
    return accelerator


def _single_process_group_env() -> None:
    """DeepSpeed always needs a process group; under plain python there is no launcher to describe one."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def verify_world(accelerator: Accelerator) -> None:
    """Refuse to train unless every process the launcher started takes part in one process group."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but Accelerate sees {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each would train alone"
        )
    total = accelerator.reduce(torch.ones(1, device=accelerator.device), reduction="sum")
    if int(total.item()) != launched:
        raise RuntimeError(f"an all-reduce over {launched} processes summed to {total.item()}")
