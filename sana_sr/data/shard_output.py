"""Where `sana-sr shards` writes: the output folder (new, empty, or its own) and tar members with fixed metadata."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from sana_sr.atomic import OutputError, check_apart, claim_folder, mark, written_by

OWNER = "sana-sr shards"
MANIFEST_FORMAT = "sana-sr shards 1"


def claim_output(out: Path, inputs: list[str | os.PathLike], error: type[Exception]) -> None:
    """Write only into a new or empty folder, or one this command wrote (its shards, manifest.json and sizes.json
    are replaced there), never into or around the inputs; else `error` with one line."""
    try:
        check_apart(out, inputs)
        if written_by(out) is None and _manifest_format(out) == MANIFEST_FORMAT:  # written before the marker was
            mark(out, OWNER)
        claim_folder(out, OWNER, hint="choose another -o (a new or empty folder, or an earlier sana-sr shards "
                                      "output)")
    except OutputError as e:
        raise error(str(e)) from None


def _manifest_format(out: Path) -> str | None:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


class HashingFile:
    """A write-only file that hashes what passes through (tarfile needs write and tell)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same inputs give byte-identical tars (and checksums) on every run.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
