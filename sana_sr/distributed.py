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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class DistConfig:
    """How processes work together: the `dist` section of the training config (evaluation uses it too)."""

    strategy: str = "ddp"
    """`ddp` (gloo on CPU, NCCL on GPU) or `deepspeed`."""
    deepspeed_config: str = "deepspeed_zero2.json"
    """DeepSpeed config file (`auto` values are filled by Accelerate): a path, or the name of one bundled in
    sana_sr/configs/ (`deepspeed_zero2.json`, `deepspeed_zero3.json`)."""
    mixed_precision: str = "auto"
    """`auto` (bf16 on GPU, none on CPU), `bf16` or `no`."""
    cpu: bool = False
    """Train on CPU even when a GPU is present."""
    timeout_s: float = 1800.0
    """Seconds a collective (all-reduce, barrier, collective checkpoint save) waits for the other ranks before the
    job fails: a dead or stuck rank ends the run instead of holding the allocation until the time limit. Must cover
    the longest work one rank does alone between collectives (the final export, a DIV2K LQ cache)."""

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "deepspeed"):
            raise ValueError(f"dist.strategy must be 'ddp' or 'deepspeed', got {self.strategy!r}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"dist.mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"dist.timeout_s must be > 0, got {self.timeout_s}")


_PROCESS_GROUP = {"used": False}


@contextmanager
def process_group_released() -> Iterator[None]:
    """Destroy the process group however the body ends. A gloo group left alive after a collective timed out makes
    the interpreter's exit abort in about half the runs here, so the exit code the command chose would be lost; end
    the process with `exit_code` for the same reason after a normal run."""
    import torch.distributed as dist

    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            _PROCESS_GROUP["used"] = True
            dist.destroy_process_group()


def exit_code(code: int) -> int:
    """`code` for `sys.exit`, from a command's `__main__`; in a process that ran a process group, the process ends
    here with it instead. Gloo's worker threads outlive `destroy_process_group` while anything still holds the group
    (DeepSpeed's engine does): one that drops its last finished collective during the interpreter's teardown must take
    the GIL to free the tensors, Python makes it exit, and that aborts the process (SIGABRT, "terminate called without
    an active exception"; 1 in ~10 two-process DeepSpeed runs here: docs/training.md, "How a process ends"). So
    the exit handlers run (trackers, loader workers, logging), the streams are flushed, and the teardown is skipped."""
    if not _PROCESS_GROUP["used"]:
        return code
    import atexit
    import sys

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def collective_failed(error: BaseException) -> bool:
    """True for the errors a collective raises when another rank is stuck or gone: NCCL's DistBackendError, gloo's
    RuntimeError naming its timeout (`dist.timeout_s`) or the closed connection of a rank that died."""
    import torch.distributed as dist

    if isinstance(error, dist.DistBackendError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in message for sign in ("Timed out", "Connection closed by peer", "Connection reset by peer"))


def mixed_precision(dist: DistConfig, on_cpu: bool) -> str:
    if dist.mixed_precision == "auto":
        return "no" if on_cpu else "bf16"
    return dist.mixed_precision


def build_accelerator(
    dist: DistConfig, accumulation: int, micro_batch: int, grad_clip: float, log_with: list[str] | None = None,
    ddp_kwargs: dict | None = None,
) -> Accelerator:
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    on_cpu = dist.cpu or not torch.cuda.is_available()
    timeout = timedelta(seconds=dist.timeout_s)  # torch's default would wait 30 min (gloo) or 10 (NCCL) silently
    common = dict(
        mixed_precision=mixed_precision(dist, on_cpu), gradient_accumulation_steps=accumulation, log_with=log_with
    )
    if dist.strategy == "deepspeed":
        _single_process_group_env()
        config_path = deepspeed_config_path(dist.deepspeed_config)
        plugin = DeepSpeedPlugin(
            hf_ds_config=str(config_path), gradient_accumulation_steps=accumulation, gradient_clipping=grad_clip
        )
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
        handlers = [InitProcessGroupKwargs(backend="gloo" if on_cpu else None, timeout=timeout)]
        accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers, **common)
    else:
        handlers = [InitProcessGroupKwargs(timeout=timeout)]
        handlers += [DistributedDataParallelKwargs(**ddp_kwargs)] if ddp_kwargs else []
        accelerator = Accelerator(cpu=on_cpu, kwargs_handlers=handlers, **common)
    verify_world(accelerator)
    if torch.distributed.is_initialized():  # remembered: Accelerate's end_training destroys the group early
        _PROCESS_GROUP["used"] = True
    return accelerator


def deepspeed_config_path(name: str) -> Path:
    """A DeepSpeed JSON: a path as given, else one bundled with the package (`deepspeed_zero2.json`, ...)."""
    from sana_sr import bundled

    path = Path(name)
    if path.is_file():
        return path
    if path.parent == Path(".") and (bundled.CONFIGS / path.name).is_file():
        return bundled.CONFIGS / path.name
    raise FileNotFoundError(f"dist.deepspeed_config {name} is neither a file nor a bundled config "
                            f"({', '.join(p.name for p in sorted(bundled.CONFIGS.glob('*.json')))})")


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
