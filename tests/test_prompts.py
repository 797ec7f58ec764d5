"""Prompts done right: the stored null prompt is the text encoder's output for "", never a zero placeholder, and
`sana-sr embed-captions` adds the encoder's caption embeddings to existing shards (resumable, several processes)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sana_sr import PromptEmbedding, build_pipeline
from sana_sr.model.loading import load_text_encoder
from sana_sr.model.text import encode_prompts

from .train_helpers import REPO, make_shards, write_photo_crops


@pytest.mark.parametrize("weights,keep_encoder", [("random", False), ("random", True), ("pretrained", False)])
def test_stored_null_prompt_is_the_encoders_empty_prompt(weights, keep_encoder):
    pipe = build_pipeline("tiny", weights=weights, text_encoder=keep_encoder)
    if weights == "random":  # the same seed builds the same encoder
        reference = build_pipeline("tiny", weights="random", text_encoder=True)
        encoder, tokenizer = reference.text_encoder, reference.tokenizer
    else:
        encoder, tokenizer = load_text_encoder("tiny")
    embeds, mask = encode_prompts(tokenizer, encoder, [""], 32)
    stored = pipe.default_prompt
    assert (pipe.text_encoder is not None) == keep_encoder
    assert stored.config.prompt == "" and int(stored.mask.sum()) == int(mask.sum()) >= 1
    assert torch.equal(stored.embeds, embeds.float()) and torch.equal(stored.mask, mask.float())
    assert stored.embeds[0, 0].abs().sum() > 0


def test_a_placeholder_prompt_is_an_error_naming_the_fix(tiny_pipe, lq_photo):
    placeholder = PromptEmbedding("", 32, 64)  # what a component is before any encoder filled it
    with pytest.raises(ValueError, match="empty placeholder.*from_encoder"):
        placeholder.expand(1)
    pipe = build_pipeline("tiny", text_encoder=False)
    pipe.register_modules(default_prompt=placeholder)
    with pytest.raises(ValueError, match="empty placeholder"):
        pipe(lq_photo)


def test_no_code_path_builds_a_zero_prompt():
    """Every PromptEmbedding in the library comes from an encoder (`from_encoder`) or from a saved folder."""
    constructed = []
    for path in sorted((REPO / "sana_sr").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"PromptEmbedding\(", line) and "class PromptEmbedding" not in line:
                constructed.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
            if re.search(r"mask\.data\.fill_|prompt.*zeros\(|zeros.*prompt_embeds", line):
                constructed.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not constructed, constructed


def _members(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


@pytest.mark.slow
def test_embed_captions_adds_the_encoders_embeddings_resumably_on_two_processes(tmp_path, monkeypatch):
    from sana_sr.cli import main as cli
    from sana_sr.data.streaming import make_loader

    images = write_photo_crops(tmp_path / "images", per_photo=2)
    captions = {}
    for i, image in enumerate(sorted(images.iterdir())):
        if i % 3:  # every third image has no caption: it gets the null prompt
            captions[image.stem] = f"a photo, {image.stem.split('_')[0]}, high quality"
            image.with_suffix(".txt").write_text(captions[image.stem])
    shards = make_shards(images, tmp_path / "shards", per_shard=2)
    out = tmp_path / "embedded"
    args = ["embed-captions", str(shards), "-o", str(out), "--model", "tiny", "--max-length", "32",
            "--workers", "2", "--dtype", "fp32"]
    assert cli(args) == 0
    assert json.loads((out / "sizes.json").read_text()) == json.loads((shards / "sizes.json").read_text())

    encoder, tokenizer = load_text_encoder("tiny")
    null = build_pipeline("tiny", weights="pretrained", text_encoder=False).default_prompt
    seen = 0
    for name in json.loads((out / "sizes.json").read_text()):
        before, after = _members(shards / name), _members(out / name)
        assert after.keys() == before.keys()
        for key, members in after.items():
            assert {k: v for k, v in members.items() if k != "emb.npy"} == before[key]  # copied unchanged
            stored = np.load(io.BytesIO(members["emb.npy"]))
            caption = members["txt"].decode() if "txt" in members else ""
            embeds, mask = encode_prompts(tokenizer, encoder, [caption], 32)
            np.testing.assert_allclose(stored, embeds[0][mask[0].bool()].float().numpy(), rtol=0, atol=1e-6)
            if not caption:
                valid = null.mask[0].bool()
                np.testing.assert_allclose(stored, null.embeds[0][valid].numpy(), rtol=0, atol=1e-6)
            seen += 1
    assert seen == 8

    # Resumable, and dealt over a launcher's ranks: two lost shards; rank 1 of 2 rewrites only its own (the second)
    # and leaves the index to whoever finishes last; rank 0 rewrites the first and completes it. Nothing else moves.
    from sana_sr.data.caption_embeddings import embed_captions

    names = sorted(p.name for p in out.glob("*.tar"))
    mtimes = {name: (out / name).stat().st_mtime_ns for name in names}
    for name in names[:2]:
        (out / name).unlink()
    options = dict(max_length=32, dtype="fp32")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert embed_captions(str(shards), out, "tiny", **options) == {"written": 1, "skipped": 1, "complete": False}
    assert (out / names[1]).is_file() and not (out / names[0]).exists()
    monkeypatch.setenv("RANK", "0")
    assert embed_captions(str(shards), out, "tiny", **options) == {"written": 1, "skipped": 1, "complete": True}
    assert {n: (out / n).stat().st_mtime_ns for n in names[2:]} == {n: mtimes[n] for n in names[2:]}
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert embed_captions(str(shards), out, "tiny", **options) == {"written": 0, "skipped": 4, "complete": True}

    # The training loader reads them, padded to the configured prompt length.
    loader = make_loader(out, batch_size=2, mode="exact", num_workers=0, crop_size=64, prompt_embeds=True,
                         prompt_length=32, degradation=None, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["prompt_embeds"].shape == (2, 32, 64) and batch["prompt_mask"].shape == (2, 32)
