"""Atomic, resumable training checkpoints that survive SIGKILL and never run code when loaded.

`output_dir/checkpoint-00000500/` holds, once complete:
- Accelerate's state: optimizer, LR scheduler, the RNG states of every rank, and the trainable (LoRA)
  weights only (DDP: a save hook drops the frozen base; DeepSpeed: `exclude_frozen_parameters`);
- `rank{r}.pt`: what differs per rank (data position, the on-device generator, the degradation queue, the EMA
  shadows of the master slices this rank owns);
- `trainer_state.json` (step, counters) and `lora/pytorch_lora_weights.safetensors` (the adapter, PEFT-loadable);
- `manifest.json`, written last: every other file with its size and SHA-256 (sana_sr/train/checkpoint_files.py).

Writing: every rank writes into `.checkpoint-00000500.tmp/` (saving is collective under ZeRO) and fsyncs; rank 0
adds the manifest and renames the folder into place. Folders on their way out are first renamed to a hidden name
(`.checkpoint-*.old`), so a half-deleted one never carries a checkpoint's name; hidden leftovers of a killed run are
removed at the next start or save.

Resuming: `latest` takes the newest checkpoint whose files match its manifest; a damaged newest one is skipped with
a one-line warning. Rank 0 decides (and checks that no pickled file names a foreign global) and broadcasts the
choice, or the one-line refusal, to every rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from sana_sr.model.lora import has_lora, save_lora
from sana_sr.train.checkpoint_files import (
    CheckpointError,
    check_unpickling,
    damage,
    fsync_path,
    fsync_tree,
    weights_only_loading,
    write_durably,
    write_manifest,
)

__all__ = ["CheckpointError", "complete_checkpoints", "keep_only_trainable", "load_checkpoint", "resolve_resume",
           "save_checkpoint"]

_NAME = re.compile(r"^checkpoint-(\d{8})$")
_LEFTOVER = re.compile(r"^\.checkpoint-\d{8}\.(tmp|old)$")


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Folders named as checkpoints, oldest first (their names are only ever given to complete ones; whether the
    files are still intact is `damage`'s question)."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_dir() and _NAME.match(p.name))


def remove_leftovers(output_dir: Path) -> None:
    """Clean up after a killed save or deletion (rank 0, when no save is running): a `.tmp` folder whose manifest
    was written is complete and only missed its rename (e.g. killed during a re-save, its old copy already moved
    aside), so it is renamed into place; every other hidden leftover is deleted."""
    if not output_dir.is_dir():
        return
    for path in sorted(output_dir.iterdir()):
        if not _LEFTOVER.match(path.name):
            continue
        final = output_dir / path.name[1:].removesuffix(".tmp")
        if path.name.endswith(".tmp") and not final.exists() and damage(path) is None:
            os.replace(path, final)
            fsync_path(output_dir)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _retire(folder: Path) -> None:
    """Delete a checkpoint folder: renamed to a hidden name first (atomic), so no half-deleted folder is ever
    taken for a checkpoint."""
    hidden = folder.parent / f".{folder.name}.old"
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    fsync_path(folder.parent)
    shutil.rmtree(hidden, ignore_errors=True)


def _choose(output_dir: Path, resume: str) -> str:
    """Rank 0's choice of checkpoint folder ("" to start fresh); raises CheckpointError."""
    if resume == "latest":
        for folder in reversed(complete_checkpoints(output_dir)):
            reason = damage(folder)
            if reason is None:
                check_unpickling(folder)
                return str(folder)
            print(f"warning: skipping checkpoint {folder}: {reason}; trying the one before", file=sys.stderr,
                  flush=True)
        return ""
    path = Path(resume)
    if not (path.is_dir() and _NAME.match(path.name)):
        raise CheckpointError(f"checkpoint.resume={resume} is not a checkpoint folder (checkpoint-NNNNNNNN)")
    reason = damage(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint.resume={resume} is not a complete checkpoint: {reason}")
    check_unpickling(path)
    return str(path)


def resolve_resume(accelerator: Accelerator, output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from (decided on rank 0, broadcast to all), or None to start fresh. Raises a
    one-line CheckpointError on every rank when rank 0 refuses the checkpoint."""
    choice: list[str] = ["", ""]  # (folder, refusal)
    if accelerator.is_main_process:
        remove_leftovers(output_dir)
        if resume:
            try:
                choice[0] = _choose(output_dir, resume)
            except CheckpointError as e:
                choice[1] = str(e)
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    if choice[1]:
        raise CheckpointError(choice[1])
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
        remove_leftovers(output_dir)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    kwargs = {"exclude_frozen_parameters": True} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
    accelerator.save_state(str(tmp), **kwargs)
    torch.save(rank_state, tmp / f"rank{accelerator.process_index}.pt")
    fsync_tree(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if has_lora(transformer):  # a full fine-tune's weights are in Accelerate's state only
            save_lora(transformer, tmp / "lora", lora_state)
        write_durably(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2) + "\n")
        fsync_tree(tmp)
        write_manifest(tmp, step, accelerator.num_processes)  # last: it marks the folder complete
        fsync_path(tmp)
        if final.exists():  # a re-save of the same step (a stop signal right after a resume)
            _retire(final)
        os.replace(tmp, final)
        fsync_path(output_dir)
        _write_latest(output_dir, name)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            _retire(old)
    accelerator.wait_for_everyone()
    return final


def _write_latest(output_dir: Path, name: str) -> None:
    """`latest`, for people and scripts (resume itself looks at the folders): replaced atomically."""
    tmp = output_dir / ".latest.tmp"
    write_durably(tmp, name + "\n")
    os.replace(tmp, output_dir / "latest")
    fsync_path(output_dir)


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore Accelerate's state from `path` (checked by `resolve_resume`); returns (trainer_state, this rank's
    state). Every pickled file is read by torch's weights-only unpickler, DeepSpeed's too."""
    kwargs = (
        {"load_module_strict": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {"strict": False}
    )
    rank_file = path / f"rank{accelerator.process_index}.pt"
    if not rank_file.is_file():
        raise CheckpointError(
            f"{rank_file} is missing: the checkpoint was written by fewer ranks than the {accelerator.num_processes} now"
        )
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'trainer_state.json'} is unreadable: {type(e).__name__}: {e}") from None
    if not (isinstance(trainer_state, dict) and isinstance(trainer_state.get("step"), int)):
        raise CheckpointError(f"{path / 'trainer_state.json'} is not a training state (no integer step)")
    with weights_only_loading(path):
        accelerator.load_state(str(path), **kwargs)
        rank_state = torch.load(rank_file, weights_only=True)
    return trainer_state, rank_state
