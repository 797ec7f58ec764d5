"""Atomic writes: an output is either complete or absent, never half-written; and the size of what was written.

Everything that writes a result (images, checkpoints, model folders, shards, reports) goes through these two
context managers: write into a temporary sibling, then rename it over the target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_sibling(target: Path, kind: str) -> Path:
    # Keep the suffix: writers such as PIL pick the format from it.
    return target.parent / f".{target.stem}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{target.suffix}"


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it is renamed onto `target`, on error deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target, "tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; on success it replaces `target`, on error it is removed.

    A folder cannot be swapped in one rename, so an existing `target` is first renamed aside and deleted only
    after the new one is in place: a crash in between leaves the old copy as `.NAME.old-*`, never a mix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = _temp_sibling(target, "old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def folder_bytes(folder: str | os.PathLike, suffix: str | None = None, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under `folder` (recursively), optionally only those ending in `suffix` and outside any
    sub-folder named in `skip`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*")
               if p.is_file() and (suffix is None or p.name.endswith(suffix)) and not set(skip) & set(p.parts))
