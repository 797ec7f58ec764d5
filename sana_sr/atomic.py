"""Atomic writes: an output is either complete or absent, never half-written; and the size of what was written.

Everything that writes a result (images, checkpoints, model folders, shards, reports) goes through these two
context managers: write into a temporary sibling, then rename it over the target.

Nothing the user owns is deleted: a folder is replaced only when it is empty or when the marker file left inside it
(`MARKER`) names the same writer; anything else needs `overwrite` (a command's `--overwrite`). `check_output` is the
same test, for commands to run before their work starts, plus a refusal of outputs that overlap their inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".sana-sr-output"
"""The file every output folder gets: {"written_by": OWNER}. Only OWNER may replace the folder."""
_NAME_MAX = 255  # bytes in one path component on every filesystem we write to


class OutputError(ValueError):
    """An output that must not be written where asked (it would delete or mix with something else); one line."""


def _temp_sibling(target: Path, kind: str) -> Path:
    # Keep the suffix: writers such as PIL pick the format from it. Shorten the stem so that a target whose own
    # name fits the filesystem's limit never fails only because its temporary name is longer.
    tag = f".{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{target.suffix}"
    return target.parent / f".{_cut(target.stem, _NAME_MAX - 1 - len(tag.encode()))}{tag}"


def _cut(name: str, limit: int) -> str:
    """`name` cut to at most `limit` bytes of UTF-8 (never inside a character)."""
    return name.encode()[: max(limit, 1)].decode(errors="ignore")


def _is_temporary(name: str) -> bool:
    """A temporary of `atomic_file` / `atomic_directory` (left by a writer still running or killed)."""
    return name.startswith(".") and any(f".{kind}-" in name for kind in ("tmp", "old"))


def written_by(folder: str | os.PathLike) -> str | None:
    """The writer the folder's marker names, or None (no marker, unreadable, or not a folder)."""
    try:
        return str(json.loads((Path(folder) / MARKER).read_text())["written_by"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _empty(folder: Path) -> bool:
    return not any(not _is_temporary(entry.name) for entry in folder.iterdir())


def _same_or_nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_apart(target: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise OutputError if the output `target` is one of `inputs`, inside one, or holds one."""
    resolved = Path(target).resolve()
    for item in inputs:
        if item is None or not Path(item).exists():
            continue  # a preset or hub id, or a missing path the command reports itself
        source = Path(item).resolve()
        if _same_or_nested(resolved, source):
            relation = "is" if resolved == source else "is inside" if source in resolved.parents else "holds"
            raise OutputError(f"output {target} {relation} the input {item}: choose an output apart from it")


_HINT = "choose another folder or pass --overwrite (which deletes it)"


def check_output(target: str | os.PathLike, owner: str, *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = (), hint: str = _HINT) -> None:
    """Raise OutputError unless `owner` may write the folder `target`: it is absent, empty, or marked as `owner`'s
    (or `overwrite`); and it is not one of `inputs`, inside one, or around one (whatever `overwrite` says)."""
    target = Path(target)
    check_apart(target, inputs)
    if not (target.exists() or target.is_symlink()):
        return
    if overwrite:
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputError(f"output {target} exists and is not a folder: {hint}")
    found = written_by(target)
    if found == owner or (found is None and _empty(target)):
        return
    by = f"it was written by {found}" if found else f"it holds files not written by {owner} (no {MARKER} inside)"
    raise OutputError(f"output folder {target} exists and {by}: {hint}")


def mark(folder: str | os.PathLike, owner: str) -> None:
    """Leave the marker that lets `owner` replace or reuse `folder` later."""
    with atomic_file(Path(folder) / MARKER) as tmp:
        tmp.write_text(json.dumps({"written_by": owner}) + "\n")


def claim_folder(folder: str | os.PathLike, owner: str, *, inputs: Iterable[str | os.PathLike | None] = (),
                 hint: str = _HINT) -> Path:
    """A folder `owner` writes into over several steps (a run folder, a work folder): checked as `check_output`
    (no overwrite: a claimed folder is later reused or deleted as `owner`'s), created if absent, and marked."""
    folder = Path(folder)
    check_output(folder, owner, inputs=inputs, hint=hint)
    folder.mkdir(parents=True, exist_ok=True)
    if written_by(folder) != owner:
        mark(folder, owner)
    return folder


def remove_owned(folder: str | os.PathLike, owner: str) -> bool:
    """Delete `folder` if its marker names `owner` (or it holds nothing but temporaries); True if it was deleted."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir() or not (written_by(folder) == owner or _empty(folder)):
        return False
    shutil.rmtree(folder)
    return True


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
def atomic_directory(target: str | os.PathLike, owner: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; on success it replaces `target`, on error it is removed.

    `owner` names the writer (a command, "sana-sr compress"): the folder is marked as its, and an existing `target`
    is replaced only when `check_output` allows it (checked before and again after the writing), else OutputError.
    A folder cannot be swapped in one rename, so an existing `target` is first renamed aside and deleted only
    after the new one is in place: a crash in between leaves the old copy as `.NAME.old-*`, never a mix.
    """
    target = Path(target)
    check_output(target, owner, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_cut(target.name, 200)}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        mark(tmp, owner)
        check_output(target, owner, overwrite=overwrite)  # what is there now, after a long write
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists() or target.is_symlink():
        old = _temp_sibling(target, "old")
        os.replace(target, old)
        os.replace(tmp, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, target)


def folder_bytes(folder: str | os.PathLike, suffix: str | None = None, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under `folder` (recursively), optionally only those ending in `suffix` and outside any
    sub-folder named in `skip`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*")
               if p.is_file() and (suffix is None or p.name.endswith(suffix)) and not set(skip) & set(p.parts))
