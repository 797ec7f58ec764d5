"""What a checkpoint folder holds on disk: durable writes and the manifest that marks it complete.

Completeness. A checkpoint is complete when its `manifest.json` (written last, after every other file was fsynced)
lists every file with its size and SHA-256, and the files match. A SIGKILL or a power cut at any moment leaves
either a complete folder or one that fails this check; a disk that later damages a file fails it too.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"


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
