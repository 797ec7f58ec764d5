"""`sana-sr shards`: folder trees -> shards + manifest; bad files listed; deterministic; resumable; captions."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sana_sr.cli import main as cli
from sana_sr.data import make_loader
from sana_sr.data.shards import ShardError, ShardOptions, write_shards
from sana_sr.data.streaming import LoaderConfig

from .image_zoo import CORPUS, CORPUS_MAX_PIXELS, GOOD, write_corpus

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "sana_sr" / "assets" / "photos"


def make_tree(root: Path) -> tuple[set[str], dict[str, str]]:
    """An LSDIR-like tree of real photo crops plus bad files; returns (good keys, {bad file name: reason start})."""
    good = set()
    for i, photo in enumerate(sorted(PHOTOS.iterdir())):
        with Image.open(photo) as im:
            im = im.convert("RGB")
            for j, size in enumerate((96, 128, 80)):
                folder = root / f"{i:04d}"
                folder.mkdir(parents=True, exist_ok=True)
                crop = im.crop((j * 20, j * 10, j * 20 + size, j * 10 + size + j))
                crop.save(folder / f"{i:04d}_{j}.{'png' if j == 1 else 'jpg'}")
                good.add(f"{i:04d}/{i:04d}_{j}")
    (root / "0000" / "0000_0.txt").write_text("a grey-haired astronaut\n")
    bad = root / "bad"
    bad.mkdir()
    whole = (PHOTOS / "rocket.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    Image.new("RGB", (40, 300)).save(bad / "small.png")
    os.symlink(root / "does-not-exist.png", bad / "dangling.png")
    os.symlink(root, bad / "loop")  # a link cycle: followed once, never looped
    (root / "notes.md").write_text("sidecar-like files are not images and not listed")
    reasons = {
        "truncated.jpg": "truncated or corrupt image",
        "empty.png": "empty file (0 bytes)",
        "text.jpg": "not an image",
        "small.png": "smaller than the training crop: 40x300",
        "dangling.png": "unreadable",
    }
    return good, reasons


@pytest.fixture()
def tree(tmp_path) -> tuple[Path, set[str], dict[str, str]]:
    good, reasons = make_tree(tmp_path / "LSDIR" / "HR" / "train")
    return tmp_path / "LSDIR" / "HR" / "train", good, reasons


def read_members(out: Path) -> dict[str, list[str]]:
    return {p.name: tarfile.open(p).getnames() for p in sorted(out.glob("shard-*.tar"))}


def test_make_shards_writes_shards_and_lists_bad_files(tree, tmp_path, monkeypatch):
    src, good, reasons = tree
    out = tmp_path / "shards"
    assert cli(["shards", str(src), "-o", str(out), "--max-count", "4", "--min-size", "64", "--workers", "2",
                "--no-progress"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = json.loads((out / "sizes.json").read_text())
    assert manifest["num_samples"] == sum(sizes.values()) == len(good) == 12
    listed = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(listed) == set(reasons)
    for name, start in reasons.items():
        assert listed[name].startswith(start), (name, listed[name])
    for shard in manifest["shards"]:
        assert len(shard["sha256"]) == 64 and (out / shard["name"]).stat().st_size == shard["bytes"]
    members = [m for names in read_members(out).values() for m in names]
    assert "0000/0000_0.txt" in members and "0000/0000_1.png" in members and "0000/0000_0.json" in members
    # Original bytes, untouched.
    with tarfile.open(next(out / s["name"] for s in manifest["shards"] if "0000/0000_1.png" in
                           tarfile.open(out / s["name"]).getnames())) as tar:  # fmt: skip
        assert tar.extractfile("0000/0000_1.png").read() == (src / "0000" / "0000_1.png").read_bytes()
    # The loader reads back exactly the good images, with the sidecar caption.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    loader = make_loader(out, LoaderConfig(num_workers=2, crop_size=64, batch_size=4, mode="exact"))
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == sorted(good)
    captions = {k: c for b in batches for k, c in zip(b["key"], b["caption"], strict=True)}
    assert captions["0000/0000_0"] == "a grey-haired astronaut" and captions["0000/0000_2"] == ""
    assert sum(b["skipped"] for b in batches) == 0


def test_same_seed_same_bytes_other_seed_other_order(tree, tmp_path):
    src, _, _ = tree
    options = ShardOptions(max_count=5, min_size=64, workers=1, progress=False)
    a = write_shards([src], tmp_path / "a", options)
    b = write_shards([src], tmp_path / "b", ShardOptions(**{**options.__dict__, "workers": 2}))
    write_shards([src], tmp_path / "c", ShardOptions(**{**options.__dict__, "seed": 1}))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert read_members(tmp_path / "a") != read_members(tmp_path / "c")


def test_rerun_resumes_and_never_leaves_half_written_shards(tree, tmp_path):
    src, _, _ = tree
    out = tmp_path / "out"
    options = ShardOptions(max_count=3, min_size=64, workers=1, progress=False)
    first = write_shards([src], out, options)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    victim = first["shards"][1]["name"]
    (out / victim).unlink()
    (out / ".shard-000000.tmp-123-deadbeef.tar").write_bytes(b"half a tar")  # what a killed run leaves
    second = write_shards([src], out, options)
    assert second["shards"] == first["shards"]
    assert not list(out.glob(".*.tmp-*"))
    for name, stamp in stamps.items():
        if name != victim:
            assert (out / name).stat().st_mtime_ns == stamp, name  # finished shards were not rewritten
    # A changed input re-writes only the shard that holds it.
    changed = src / "0001" / "0001_0.jpg"
    Image.new("RGB", (100, 100), (200, 10, 10)).save(changed)
    third = write_shards([src], out, options)
    assert sum(a["sha256"] != b["sha256"] for a, b in zip(first["shards"], third["shards"], strict=True)) == 1


def test_caption_maps_reencoding_and_embeddings(tree, tmp_path, monkeypatch):
    src, good, _ = tree
    captions = tmp_path / "captions.csv"
    with open(captions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        writer.writerow(["0001/0001_0.jpg", "a tabby cat"])
        writer.writerow(["0002_1", "a cup of coffee"])
        writer.writerow(["missing.png", "matches nothing"])
    embeddings = tmp_path / "emb"
    for i, key in enumerate(sorted(good)):
        (embeddings / key).parent.mkdir(parents=True, exist_ok=True)
        length = 3 + i % 4  # uneven token counts: the loader pads them
        if i % 2:
            np.savez(embeddings / f"{key}.npz", prompt_embeds=np.full((length, 8), i, np.float32),
                     prompt_mask=np.ones(length, np.int64))  # fmt: skip
        else:
            np.save(embeddings / f"{key}.npy", np.full((length, 8), i, np.float16))
    out = tmp_path / "out"
    manifest = write_shards([src], out, ShardOptions(max_count=4, min_size=64, workers=1, progress=False,
                                                     captions=str(captions), embeddings=str(embeddings),
                                                     reencode="jpg", quality=90))  # fmt: skip
    assert manifest["captions_unmatched"] == 1
    names = [m for n in read_members(out).values() for m in n]
    assert not any(m.endswith(".png") for m in names) and "0000/0000_0.emb.npy" in names
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    config = LoaderConfig(num_workers=2, crop_size=64, batch_size=4, mode="exact", prompt_embeds=True)
    batches = list(make_loader(out, config))
    captions_seen = {k: c for b in batches for k, c in zip(b["key"], b["caption"], strict=True)}
    assert captions_seen["0001/0001_0"] == "a tabby cat" and captions_seen["0002/0002_1"] == "a cup of coffee"
    assert captions_seen["0000/0000_0"] == "a grey-haired astronaut"  # sidecar kept where the map is silent
    for b in batches:
        assert b["prompt_embeds"].shape[0] == len(b["key"]) and b["prompt_embeds"].shape[2] == 8
        assert b["prompt_mask"].shape == b["prompt_embeds"].shape[:2]
    fixed = list(make_loader(out, LoaderConfig(**{**config.__dict__, "prompt_length": 16})))
    assert {tuple(b["prompt_embeds"].shape[1:]) for b in fixed} == {(16, 8)}
    # With --embeddings every image needs one: a missing embedding is a listed skip.
    next((embeddings / "0003").glob("0003_2.*")).unlink()
    again = write_shards([src], tmp_path / "out2", ShardOptions(max_count=4, min_size=64, workers=1,
                         progress=False, embeddings=str(embeddings)))  # fmt: skip
    assert any(s["reason"].startswith("no prompt embedding") for s in again["skipped"])


def test_no_usable_image_is_an_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"")
    Image.new("RGB", (10, 10)).save(src / "b.png")
    assert cli(["shards", str(src), "-o", str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no usable image among 2 files" in err and "manifest.json" in err
    assert err.count("\n") == 1 and err.endswith("\n")  # one line
    assert not (tmp_path / "out" / "sizes.json").exists() and not list((tmp_path / "out").glob("*.tar"))
    with pytest.raises(ShardError, match="no image files"):
        write_shards([tmp_path / "out"], tmp_path / "out3", ShardOptions(workers=1, progress=False))
    with pytest.raises(ShardError, match="input not found"):
        write_shards([tmp_path / "nope"], tmp_path / "out4", ShardOptions(workers=1, progress=False))


def test_the_script_runs(tree, tmp_path):
    src, good, _ = tree
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "data" / "make_shards.py"), str(src), "-o", str(tmp_path / "o"),
                             "--min-size", "64", "--workers", "1", "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{len(good)} samples in 1 shards" in result.stdout


def test_malformed_corpus_every_file_a_sample_or_listed_with_its_reason(tmp_path, monkeypatch, capsys):
    """Issue 16: the shard writer (2 worker processes) over the malformed corpus: FIFOs, devices and links to them
    are never opened, every decoder failure is a listed skip, the counts are exact, nothing partial is left; the
    loader then accounts for every sample (decoded, or skipped and counted)."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_corpus(inputs)
    code = cli(["shards", str(inputs), "-o", str(out), "--min-size", "1", "--max-pixels", str(CORPUS_MAX_PIXELS),
                "--max-count", "16", "--workers", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err, captured.err
    bad = {"empty.png": "empty file", "truncated.jpg": "truncated or corrupt", "truncated.png": "truncated or corrupt",
           "not_an_image.png": "not an image"} | {n: shards for n, (_, shards) in CORPUS.items() if shards is not None}
    good = (set(GOOD) | {n for n, (_, shards) in CORPUS.items() if shards is None} | {"huge.png"}) - set(bad)
    assert len(good) + len(bad) >= 40
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert manifest["num_skipped"] == len(listed) == len(bad), sorted(listed)
    for name, reason in bad.items():
        found = [r for path, r in listed.items() if path.endswith("/" + name)]
        assert len(found) == 1 and reason in found[0], (name, reason, found)
    assert manifest["num_samples"] == len(good) == sum(json.loads((out / "sizes.json").read_text()).values())
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    loader = make_loader(out, LoaderConfig(num_workers=0, crop_size=1, batch_size=8, mode="exact", shuffle_buffer=0),
                         degradation=None)
    batches = list(loader)
    decoded = sum(len(b["key"]) for b in batches)
    assert decoded + loader.skipped == len(good) and decoded >= len(good) - 3  # the loader cannot read F/LAB/I
