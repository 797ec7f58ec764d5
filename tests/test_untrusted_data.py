"""Data that travels with a download never runs or reads what it names (issue 16, item 3).

- A shard listing (`sizes.json`) naming `../`, absolute, `pipe:`, URL or out-of-folder-link entries is refused with
  one line before any shard is opened; a marker file proves no command ran.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sana_sr.data.streaming import make_loader, resolve_shards


def write_shard(path: Path, keys: tuple[str, ...] = ("a",)) -> Path:
    """A tar shard of 64x64 PNG samples."""
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            buffer = io.BytesIO()
            Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(buffer, format="PNG")
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return path


def _read_all(spec: str) -> list[dict]:
    loader = make_loader(spec, mode="exact", num_workers=0, crop_size=64, batch_size=1, degradation=None,
                         shuffle_buffer=0)
    return list(loader)


@pytest.fixture
def data(tmp_path):
    """A shard folder, a shard outside it, and a marker that a shell command would create."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_shard(folder / "inside.tar")
    outside = write_shard(tmp_path / "outside.tar", ("secret",))
    (folder / "link.tar").symlink_to(outside)
    return SimpleNamespace(folder=folder, outside=outside, marker=tmp_path / "marker")


@pytest.mark.parametrize("kind", ["parent", "absolute", "pipe", "url", "hf", "link"])
def test_a_listing_cannot_name_commands_urls_or_files_outside_its_folder(data, monkeypatch, kind):
    name = {"parent": "../outside.tar", "absolute": str(data.outside), "pipe": f"pipe:touch {data.marker}; cat "
            f"{data.outside}", "url": "https://127.0.0.1:9/x.tar", "hf": "hf://datasets/me/x/x.tar",
            "link": "link.tar"}[kind]
    (data.folder / "sizes.json").write_text(json.dumps({"inside.tar": 1, name: 1}))
    monkeypatch.chdir(data.folder)  # `data.shards=sizes.json`: the listing's folder is "."
    try:
        batches, message = _read_all("sizes.json"), None
    except ValueError as e:
        batches, message = None, str(e)
    assert not data.marker.exists(), "the listing ran a command"
    assert message is not None, f"read the samples {[b['key'] for b in batches]}"
    assert "\n" not in message and json.dumps(name)[1:-1] in message and "sizes.json" in message, message


def test_a_plain_listing_and_remote_specs_given_by_the_user_still_work(data):
    (data.folder / "sizes.json").write_text(json.dumps({"inside.tar": 1}))
    assert [b["key"] for b in _read_all(str(data.folder))] == [["a"]]
    # A pipe: command typed by the user (command line or data.shards) is the user's own choice.
    urls, sizes = resolve_shards(f"pipe:cat {data.outside}")
    assert urls == [f"pipe:cat {data.outside}"] and sizes is None


def test_hf_shards_never_put_the_token_in_a_command_line(data, monkeypatch):
    """webdataset opens hf:// with `curl -H "Authorization:Bearer TOKEN"`: any local user could read it in `ps`."""
    import subprocess

    import huggingface_hub

    opened = []

    class FakeHfFileSystem:
        def open(self, url, mode):
            opened.append(url)
            return open(data.folder / "inside.tar", mode)

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", FakeHfFileSystem)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    url = "hf://datasets/me/x/train-000000.tar"
    assert [b["key"] for b in _read_all(url)] == [["a"]]
    assert opened == [url]
