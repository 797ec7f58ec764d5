"""Finding the images of a shard job: folder trees, keys, captions and prompt embeddings.

Runs in the main process before any image is opened (stat calls and small text files only), so that the shard
plan, and hence the output, is a function of the inputs and the seed alone.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from sana_sr.images import EXTENSIONS, walk_files

SIDECAR_SUFFIXES = {".txt", ".json", ".npy", ".npz", ".csv", ".md"}
_PATH_COLUMNS = ("path", "file", "file_name", "filename", "image", "key")
_CAPTION_COLUMNS = ("caption", "text", "prompt")


class SourceError(Exception):
    """A bad shard-job input; `str()` is the one-line reason."""


@dataclass
class SourceImage:
    """One candidate image and what goes with it."""

    path: str
    """Absolute path of the image file."""
    rel: str
    """Path relative to its input root (POSIX), prefixed with the root's name when there are several roots."""
    key: str
    """webdataset sample key: `rel` without extension, made safe (no dots) and unique."""
    size: int
    """File size in bytes (-1 when it cannot be read; the worker then reports why)."""
    mtime_ns: int
    """Modification time, part of the shard signature so that a changed file re-writes its shard."""
    caption: str | None = None
    """Caption text (sidecar .txt or caption map), or None."""
    embedding: str | None = None
    """Path of the prompt-embedding file (.npy, or .npz with prompt_embeds [+ prompt_mask]), or None."""


@dataclass
class Discovery:
    """Every candidate image plus a count of the other files met."""

    images: list[SourceImage]
    ignored: int
    """Files that are neither images nor sidecars (not listed: they are not skipped images)."""
    captions_unmatched: int = 0
    """Entries of the caption map that matched no image."""


def _safe_key(rel_without_suffix: str) -> str:
    # webdataset splits a member name at the first dot of its base name, and "__x__" names are metadata.
    key = re.sub(r"[^A-Za-z0-9_/\-]", "_", rel_without_suffix).strip("/")
    return re.sub(r"(^|/)_+", r"\1", key) or "image"


def discover(inputs: list[str | os.PathLike]) -> Discovery:
    """All image files under `inputs` (folders are searched recursively, symlinks included; files are taken as
    they are), sorted by their relative path."""
    roots = [Path(p) for p in inputs]
    missing = [str(r) for r in roots if not r.exists() and not r.is_symlink()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SourceError(f"input not found: {missing[0]}{more}")
    names = [r.resolve().name or "root" for r in roots]
    prefixes = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)] if len(roots) > 1 else [""]
    found: list[tuple[str, Path]] = []
    ignored = 0
    for root, prefix in zip(roots, prefixes, strict=True):
        if root.is_file() or (root.is_symlink() and not root.is_dir()):
            candidates = [(root.name, root)]
        else:
            candidates = [(path.relative_to(root).as_posix(), path) for path in walk_files(root)]
        for rel, path in candidates:
            suffix = path.suffix.lower()
            if suffix in EXTENSIONS:
                found.append((f"{prefix}/{rel}" if prefix else rel, path))
            elif suffix not in SIDECAR_SUFFIXES and not path.name.startswith("."):
                ignored += 1
    found.sort(key=lambda item: item[0])
    images, used = [], set()
    for rel, path in found:
        base = _safe_key(rel[: -len(Path(rel).suffix)])
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, 0
        images.append(SourceImage(str(path.absolute()), rel, key, size, mtime))
    return Discovery(images, ignored)


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def read_input(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file (a link to one is fine), at most `max_bytes` of them; SourceError saying why not.

    Never opens anything else: a FIFO would block for ever, and opening a device can have effects of its own."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise SourceError(f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'special file')})")
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, the open still returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SourceError("not a regular file (replaced while being read)")
            if st.st_size > max_bytes:
                raise SourceError(f"too large: {st.st_size} bytes > the limit of {max_bytes} (--max-file-bytes)")
            data = f.read(max_bytes + 1)  # a file growing while read is still bounded
    except OSError as e:
        raise SourceError(f"unreadable: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise SourceError(f"too large: more than the limit of {max_bytes} bytes (--max-file-bytes)")
    return data


def load_caption_map(path: str | os.PathLike) -> dict[str, str]:
    """A caption map: JSON {name: caption} or [{path, caption}], or CSV with a path column and a caption column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SourceError(f"cannot read caption map {path}: {e.strerror}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"caption map {path} is not valid JSON: {e}") from None
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
        rows = data
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        raise SourceError(f"caption map {path}: want {{name: caption}} or rows with a path and a caption column")
    columns = {c.lower(): c for c in rows[0]}
    key_col = next((columns[c] for c in _PATH_COLUMNS if c in columns), None)
    cap_col = next((columns[c] for c in _CAPTION_COLUMNS if c in columns), None)
    if key_col is None or cap_col is None:
        raise SourceError(f"caption map {path}: columns {list(rows[0])} lack a path column "
                          f"({', '.join(_PATH_COLUMNS)}) or a caption column ({', '.join(_CAPTION_COLUMNS)})")  # fmt: skip
    return {str(row[key_col]): str(row[cap_col]) for row in rows}


def _lookup_names(image: SourceImage) -> list[str]:
    rel = image.rel
    no_suffix = rel[: -len(Path(rel).suffix)]
    return [rel, no_suffix, Path(rel).name, Path(rel).stem]


def attach_captions(found: Discovery, caption_map: dict[str, str] | None) -> None:
    """Sidecar `<image>.txt` captions, overridden by the map where it names the image."""
    matched: set[str] = set()
    for image in found.images:
        sidecar = Path(image.path).with_suffix(".txt")
        if sidecar.is_file():
            image.caption = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        if caption_map:
            for name in _lookup_names(image):
                if name in caption_map:
                    image.caption = caption_map[name].strip()
                    matched.add(name)
                    break
    if caption_map:
        found.captions_unmatched = len(set(caption_map) - matched)


def attach_embeddings(found: Discovery, folder: str | os.PathLike) -> None:
    """Prompt embeddings from `folder`, laid out as the images' relative paths: `<folder>/<rel minus suffix>.npy`
    (or `.npz`). With a single input root, `folder` may be that root itself (embeddings beside the images)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"embeddings folder not found: {folder}")
    for image in found.images:
        stem = image.rel[: -len(Path(image.rel).suffix)]
        for suffix in (".npy", ".npz"):
            candidate = folder / (stem + suffix)
            if candidate.is_file():
                image.embedding = str(candidate)
                break
