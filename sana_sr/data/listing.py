"""Reading a shard listing (`sizes.json`, written by `sana-sr shards`): {shard file name: sample count}.

A listing is a file that travels with downloaded data, so what it names is untrusted: webdataset opens whatever
string it is handed, and `pipe:CMD` runs CMD in a shell, `http://`, `hf://` and the like start curl, and an absolute or
`../` path reads outside the data. A listed name must therefore be a plain relative path to a file inside the
listing's own folder (symlinks resolved); anything else stops the run with one line naming the entry. Remote
shards stay possible, but only where the user typed them: on the command line or in `data.shards`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

# `scheme:` at the start of a name: pipe:, file:, http:, s3:, hf:, ... (webdataset dispatches on it)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


class ListingError(ValueError):
    """A shard listing that cannot be used; `str()` is the one-line reason."""


def _unsafe(name: str) -> str | None:
    """Why `name` is not a plain relative file name, or None."""
    path = PurePosixPath(name)
    if not name or name != name.strip() or "\x00" in name or "\\" in name:
        return "not a plain file name"
    if _SCHEME.match(name):
        return "a URL or command (pipe:, http://, hf://, ...): remote shards go on the command line or in data.shards"
    if path.is_absolute():
        return "an absolute path"
    if ".." in path.parts:
        return "a path that leaves the listing's folder ('..')"
    if any(c in name for c in "{}"):
        return "a brace pattern"
    return None


def read_listing(listing: Path) -> dict[str, int]:
    """{shard path: sample count} of a listing, each path inside the listing's folder; raises ListingError."""
    try:
        counts = json.loads(listing.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ListingError(f"cannot read shard listing {listing}: {type(e).__name__}: {e}") from None
    if not isinstance(counts, dict):
        raise ListingError(f"shard listing {listing} is not a JSON object {{shard file: sample count}}")
    folder = listing.parent.resolve()
    shards: dict[str, int] = {}
    for name, count in counts.items():
        reason = _unsafe(name)
        if reason is None:
            target = (folder / name).resolve()
            if not target.is_relative_to(folder):
                reason = f"a link to {target}, outside {folder}"
        if reason is not None:
            raise ListingError(f"shard listing {listing} names {name!r}, {reason}: refusing to read it")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ListingError(f"shard listing {listing} gives {name!r} the sample count {count!r}: want an integer >= 0")
        shards[str(listing.parent / name)] = count
    return shards
