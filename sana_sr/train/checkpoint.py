"""Atomic, resumable training checkpoints.

`output_dir/checkpoint-00000500/` holds, once complete:
- Accelerate's state: optimizer, LR scheduler, the RNG states of every rank, and the trainable (LoRA)
  weights only (DDP: a save hook drops the frozen base; DeepSpeed: `exclude_frozen_parameters`);
- `rank{r}.pt`: what differs per rank (data position, the on-device generator, the degradation queue, the EMA
  shadows of the master slices this rank owns);
- `trainer_state.json` (step, counters) and `lora/pytorch_lora_weights.safetensors` (the adapter, PEFT-loadable).

Every rank writes into `.checkpoint-00000500.tmp/` (saving is collective under ZeRO), then rank 0 renames it: a
folder named `checkpoint-*` is always complete. `latest` names the newest; resume picks it on rank 0 and
broadcasts the choice.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from sana_sr.atomic import atomic_file
from sana_sr.model.lora import has_lora, save_lora

_NAME = re.compile(r"^checkpoint-(\d{8})$")


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and _NAME.match(p.name))


def resolve_resume(accelerator: Accelerator, output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from (decided on rank 0, broadcast to all), or None to start fresh."""
    choice: list[str | None] = [None]
    if accelerator.is_main_process and resume:
        if resume == "latest":
            found = complete_checkpoints(output_dir)
            choice[0] = str(found[-1]) if found else None
        else:
            path = Path(resume)
            if not (path.is_dir() and _NAME.match(path.name)):
                raise FileNotFoundError(f"checkpoint.resume={resume} is not a complete checkpoint folder")
            choice[0] = str(path)
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    return Path(choice[0]) if choice[0] else None


def keep_only_trainable(trainable: set[str]):
    """Accelerate save hook (DDP / single process): keep the trainable tensors, not the frozen base."""

    def hook(models, weights, output_dir) -> None:
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k.removeprefix("module.") in trainable}

    return hook


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    transformer: torch.nn.Module,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
    lora_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final folder. `lora_state`: the adapter's whole fp32 weights
    (gathered by the caller: under ZeRO-3 the module holds empty placeholders, under bf16 rounded copies)."""
    name = f"checkpoint-{step:08d}"
    final, tmp = output_dir / name, output_dir / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    kwargs = {"exclude_frozen_parameters": True} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
    accelerator.save_state(str(tmp), **kwargs)
    torch.save(rank_state, tmp / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if has_lora(transformer):  # a full fine-tune's weights are in Accelerate's state only
            save_lora(transformer, tmp / "lora", lora_state)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        with atomic_file(output_dir / "latest") as f:
            f.write_text(name + "\n")
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore Accelerate's state from `path`; returns (trainer_state, this rank's state)."""
    kwargs = (
        {"load_module_strict": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {"strict": False}
    )
    accelerator.load_state(str(path), **kwargs)
    rank_file = path / f"rank{accelerator.process_index}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} is missing: the checkpoint was written by fewer ranks than the {accelerator.num_processes} now"
        )
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return trainer_state, torch.load(rank_file, weights_only=True)
