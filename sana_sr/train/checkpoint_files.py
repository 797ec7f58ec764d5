"""What a checkpoint folder holds on disk: durable writes, the manifest that marks it complete, and loading its
pickled files without letting them run code.

Completeness. A checkpoint is complete when its `manifest.json` (written last, after every other file was fsynced)
lists every file with its size and SHA-256, and the files match. A SIGKILL or a power cut at any moment leaves
either a complete folder or one that fails this check; a disk that later damages a file fails it too.

Safety. Accelerate writes its optimizer, scheduler and RNG states with `torch.save`; DeepSpeed writes its model and
optimizer states so too, and loads them with `torch.load(weights_only=False)` (deepspeed 0.19.8,
runtime/checkpoint_engine/torch_checkpoint_engine.py), which runs whatever a crafted pickle asks for. So before a
resume every pickled file is disassembled (never executed) and refused, naming the file and the global, unless each
global it imports is in `ALLOWED_GLOBALS`; and during the resume torch's own switch (TORCH_FORCE_WEIGHTS_ONLY_LOAD)
turns every `torch.load`, DeepSpeed's included, into the restricted unpickler with that same allow-list, in case a
file changes between the check and the load.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

MANIFEST = "manifest.json"
PICKLED_SUFFIXES = (".pt", ".bin", ".pkl")
"""What Accelerate (optimizer.bin, scheduler.bin, random_states_*.pkl, pytorch_model.bin, custom_checkpoint_*.pkl),
DeepSpeed (*_model_states.pt, *_optim_states.pt) and sana-sr (rank*.pt) load with torch.load."""

ALLOWED_GLOBALS = (
    # Accelerate's RNG states hold numpy's Mersenne Twister state: a uint32 array (Accelerate allows the same).
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    # DeepSpeed's ZeRO optimizer states: plain records, rebuilt from their fields (no code of theirs runs).
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Globals (beyond torch's own weights-only set: tensors, containers, numbers) that a sana-sr checkpoint needs;
found by disassembling the checkpoints of DDP and of DeepSpeed ZeRO-2/3 in fp32 and bf16."""


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be loaded; `str()` is the one-line reason."""


# -- durable writes ------------------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to the disk (a folder: the names in it, so a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder, deepest first: then the folder can be renamed into place.
    Every rank calls it after writing: on a shared file system a rank's fsync flushes what that rank wrote."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            folders.append(path)
        elif path.is_file():
            fsync_path(path)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)


def write_durably(path: Path, text: str) -> None:
    """Write a small text file in place and fsync it (inside a folder that is renamed into place later)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# -- the manifest --------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: Path, step: int, world_size: int) -> None:
    """List every file of `folder` (size, SHA-256) in its manifest; call it last, once the rest is fsynced."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(folder)}
    manifest = {"step": step, "world_size": world_size, "files": files}
    write_durably(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def damage(folder: Path) -> str | None:
    """None when `folder` is a complete checkpoint, else why not (one line, for a warning or an error)."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except FileNotFoundError:
        return f"{folder.name} has no {MANIFEST} (cut short while being written, or written before manifests)"
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"{path} is unreadable ({type(e).__name__}: {e})"
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            return f"{folder.name}/{name} is missing"
        if file.stat().st_size != entry.get("bytes"):
            return f"{folder.name}/{name} has {file.stat().st_size} bytes, its manifest says {entry.get('bytes')}"
        if _sha256(file) != entry.get("sha256"):
            return f"{folder.name}/{name} differs from its manifest's SHA-256 (damaged or changed after the save)"
    extra = [p.relative_to(folder).as_posix() for p in _files(folder) if p.relative_to(folder).as_posix() not in files]
    if extra:
        return f"{folder.name} holds {len(extra)} files its manifest does not list, e.g. {extra[0]}"
    return None


# -- loading without running code ----------------------------------------------------------------------------------
def _resolve(name: str) -> object | None:
    """The object a global's dotted name refers to, when its package is importable (DeepSpeed's only when DeepSpeed
    is already loaded: a DDP resume has no business with them)."""
    module_name, _, attribute = name.rpartition(".")
    if module_name.split(".")[0] == "deepspeed" and "deepspeed" not in sys.modules:
        return None
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return None


def _allowed_objects() -> list:
    return [(obj, name) for name in ALLOWED_GLOBALS if (obj := _resolve(name)) is not None]


def check_unpickling(folder: Path) -> None:
    """Refuse (CheckpointError) a checkpoint whose pickled files would import anything outside the allow-list.
    Nothing is unpickled here: torch disassembles each file's pickle and lists the globals it names."""
    for path in sorted(folder.rglob("*")):
        if not (path.is_file() and path.suffix in PICKLED_SUFFIXES):
            continue
        rel = path.relative_to(folder.parent)
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - not a torch.save archive (a raw pickle, garbage): never load it
            raise CheckpointError(f"refusing checkpoint file {rel}: not an archive written by torch.save "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        foreign = sorted(set(names) - set(ALLOWED_GLOBALS))
        if foreign:
            raise CheckpointError(
                f"refusing checkpoint file {rel}: unpickling it would import {', '.join(foreign[:3])}"
                f"{' and more' if len(foreign) > 3 else ''}, which no training checkpoint holds (a crafted file?): "
                "nothing was loaded; resume from a checkpoint you wrote yourself"
            )


@contextmanager
def weights_only_loading(folder: Path) -> Iterator[None]:
    """Inside: every torch.load in this process unpickles with torch's weights-only unpickler and the allow-list,
    whatever its caller asked (DeepSpeed asks weights_only=False); a refused file becomes a one-line CheckpointError."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved_env = {key: os.environ.get(key) for key in keys}
    saved_globals = torch.serialization.get_safe_globals()
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set would make torch.load raise
    torch.serialization.add_safe_globals(_allowed_objects())
    try:
        yield
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "a disallowed object")
        raise CheckpointError(f"refusing checkpoint {folder}: a file in it holds {reason.rstrip('.')} "
                              "(a crafted file?): resume from a checkpoint you wrote yourself") from None
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved_globals)
