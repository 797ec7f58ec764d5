"""Untrusted pipeline folders: a folder (or hub repo) naming a foreign module or class, carrying Python or pickled
weights, or asking for remote code is refused in one line naming the component, before anything in it is imported
or unpickled (a marker file proves that no code ran); the folders this project writes all load."""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sana_sr import SanaSRPipeline, build_pipeline, get_preset, load_pipeline

EVIL_MODULE = "evil_marker_mod"


@pytest.fixture(scope="module")
def good(tiny_pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "pipe"
    tiny_pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """`evil_marker_mod` on sys.path: importing it writes the marker file."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / f"{EVIL_MODULE}.py").write_text(_evil_source())
    monkeypatch.syspath_prepend(str(modules))
    path = tmp_path / "marker"
    monkeypatch.setenv("EVIL_MARKER", str(path))
    # The module really runs when imported: proof that an absent marker means it was never imported.
    env = dict(os.environ, PYTHONPATH=str(modules), EVIL_MARKER=str(tmp_path / "probe"))
    subprocess.run([sys.executable, "-c", f"import {EVIL_MODULE}"], env=env, check=True, timeout=60)
    assert (tmp_path / "probe").read_text() == "imported"
    return path


def _evil_source() -> str:
    return ("import os, pathlib\n"
            "pathlib.Path(os.environ['EVIL_MARKER']).write_text('imported')\n"
            "class EvilModel:\n    pass\n")


class _Payload:
    """Unpickling this runs code: it writes the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('unpickled')",)


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "pipe"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _refused(folder, match: str, **kwargs) -> str:
    """Loading `folder` fails with one line matching `match`; returns it."""
    with pytest.raises(ValueError, match=match) as error:
        SanaSRPipeline.from_pretrained(folder, **kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("library", [EVIL_MODULE, "sana_sr.__main__"])
def test_model_index_naming_a_foreign_module_is_refused_before_import(good, tmp_path, marker, library, capsys):
    folder = _copy(good, tmp_path)
    _edit_json(folder / "model_index.json", transformer=[library, "EvilModel"])
    message = _refused(folder, f"component 'transformer' names {library}.EvilModel, which is not allowed")
    assert "allowed: diffusers.SanaTransformer2DModel" in message
    with pytest.raises(ValueError, match="component 'transformer'"):
        load_pipeline(folder)
    from sana_sr.model import upscale

    (tmp_path / "in").mkdir()
    assert upscale.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "component 'transformer'" in err
    assert not marker.exists() and library not in sys.modules


def test_custom_component_code_is_refused(good, tmp_path, marker):
    """diffusers' custom-component path: a class named after a .py in the component's own folder."""
    folder = _copy(good, tmp_path)
    (folder / "transformer" / f"{EVIL_MODULE}.py").write_text(_evil_source())
    _refused(folder, r"component 'transformer' carries Python code \(transformer/evil_marker_mod.py\)")
    _edit_json(folder / "model_index.json", transformer=[EVIL_MODULE, "EvilModel"])
    _refused(folder, "component 'transformer' names evil_marker_mod.EvilModel")
    (folder / "transformer" / f"{EVIL_MODULE}.py").unlink()
    _edit_json(folder / "model_index.json", transformer=["diffusers", "SanaTransformer2DModel"])
    (folder / "None.py").write_text(_evil_source())  # diffusers takes <custom_pipeline>.py at the root as the pipeline
    _refused(folder, r"the pipeline folder carries Python code \(pipe/None.py\)")
    assert not marker.exists()


def test_component_config_naming_a_foreign_class_or_remote_code_is_refused(good, tmp_path):
    folder = _copy(good, tmp_path)
    _edit_json(folder / "transformer" / "config.json", _class_name="EvilModel")
    _refused(folder, r"component 'transformer' \(transformer/config.json\) names class 'EvilModel', which is not "
                     "allowed")
    _edit_json(folder / "transformer" / "config.json", _class_name="PrunedSanaTransformer2DModel")
    _refused(folder, "names class 'PrunedSanaTransformer2DModel' but model_index.json names 'SanaTransformer2DModel'")
    folder = _copy(good, tmp_path / "again")
    _edit_json(folder / "text_encoder" / "config.json", auto_map={"AutoModel": "modeling_evil.EvilModel"})
    _refused(folder, r"component 'text_encoder' \(text_encoder/config.json\) asks for remote code")
    folder = _copy(good, tmp_path / "third")
    _edit_json(folder / "tokenizer" / "tokenizer_config.json", tokenizer_class="EvilTokenizer")
    _refused(folder, "component 'tokenizer' .* names class 'EvilTokenizer'")


@pytest.mark.parametrize("keep_safetensors", [True, False])
def test_pickled_weights_are_refused_and_never_unpickled(good, tmp_path, keep_safetensors):
    folder = _copy(good, tmp_path)
    marker = tmp_path / "marker"
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if not keep_safetensors:
        weights.unlink()
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    _refused(folder, r"component 'transformer' carries pickle-format weights \(transformer/diffusion_pytorch_model"
                     r".bin\): refused, weights load only from .safetensors")
    assert not marker.exists()


def test_unsafe_options_are_refused(good):
    _refused(good, "option custom_pipeline='evil' is refused", custom_pipeline="evil")
    _refused(good, "option trust_remote_code=True is refused", trust_remote_code=True)
    _refused(good, "option use_safetensors=False is refused", use_safetensors=False)


def test_unknown_component_and_pipeline_class_are_refused(good, tmp_path):
    folder = _copy(good, tmp_path)
    _edit_json(folder / "model_index.json", helper=["diffusers", "AutoencoderKL"])
    _refused(folder, "names component 'helper'.* not a SANA-SR component")
    _edit_json(folder / "model_index.json", helper=None, _class_name=["pipeline", "EvilPipeline"])
    _refused(folder, "names pipeline \\['pipeline', 'EvilPipeline'\\], not 'SanaSRPipeline'")


@pytest.mark.slow
def test_folders_this_project_writes_load(good, tiny_pipe, tmp_path, lq_photo):
    """A saved pipeline (LoRA, text encoder, tokenizer) and a pruned one; compressed ones: tests/test_sana_compress."""
    loaded = SanaSRPipeline.from_pretrained(good)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded(lq_photo, prompt="a cat"), tiny_pipe(lq_photo, prompt="a cat"))

    from sana_sr.pruning.model import PrunedSanaTransformer2DModel

    pipe = build_pipeline("tiny", text_encoder=False)
    pipe.register_modules(transformer=PrunedSanaTransformer2DModel(
        **dict(get_preset("tiny").transformer, num_layers=2), block_heads=[2, 3], block_cross_heads=[1, 2],
        block_channels=[96, 128], kept_blocks=[1, 3]).eval())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pruned")
    reloaded = load_pipeline(tmp_path / "pruned")
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.transformer) is PrunedSanaTransformer2DModel
    assert torch.equal(reloaded(lq_photo), pipe(lq_photo))


def test_allow_list_names_classes_as_diffusers_records_them():
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    from sana_sr.model.components import ALLOWED, component_class

    for component, entries in ALLOWED.items():
        for entry in entries:
            library, _, name = entry.rpartition(".")
            cls = component_class(component, name, library)
            if library.startswith("sana_sr."):  # moved classes must move their entry too
                assert _fetch_class_library_tuple(cls) == (library, name), entry


# -- hub ids: checked after the JSON files are downloaded, before any weights ------------------------------------
class FakeHub:
    """hf_hub_download / snapshot_download over a local folder, honouring allow_patterns, recording the requests."""

    def __init__(self, remote: Path, cache: Path):
        self.remote, self.cache, self.requests = remote, cache, []

    def hf_hub_download(self, repo_id: str, filename: str, **_) -> str:
        self.requests.append([filename])
        return self._fetch([filename])

    def snapshot_download(self, repo_id: str, allow_patterns: list[str], **_) -> str:
        self.requests.append(list(allow_patterns))
        self._fetch(allow_patterns)
        return str(self.cache)

    def _fetch(self, patterns: list[str]) -> str:
        for path in self.remote.rglob("*"):
            name = path.relative_to(self.remote).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(name, p) for p in patterns):
                (self.cache / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, self.cache / name)
        return str(self.cache / patterns[0])


@pytest.fixture
def hub(good, tmp_path, monkeypatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub(_copy(good, tmp_path / "remote"), tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_hub_repo_is_checked_before_its_weights_are_downloaded(hub, marker):
    _edit_json(hub.remote / "model_index.json", transformer=[EVIL_MODULE, "EvilModel"])
    _refused("me/evil", "component 'transformer' names evil_marker_mod.EvilModel")
    assert hub.requests == [["model_index.json"]]
    _edit_json(hub.remote / "model_index.json", transformer=["diffusers", "SanaTransformer2DModel"])
    _edit_json(hub.remote / "transformer" / "config.json", _class_name="EvilModel")
    _refused("me/evil", "component 'transformer' .* names class 'EvilModel'")
    assert not [p for request in hub.requests for p in request if p.endswith(".safetensors")]
    assert not list(hub.cache.rglob("*.safetensors")) and not marker.exists()


@pytest.mark.slow
def test_hub_repo_loads_without_its_code_or_pickles(hub, tiny_pipe, lq_photo):
    (hub.remote / "transformer" / f"{EVIL_MODULE}.py").write_text(_evil_source())
    (hub.remote / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"never fetched")
    (hub.remote / "variants" / "big").mkdir(parents=True)
    (hub.remote / "variants" / "big" / "weights.safetensors").write_bytes(b"not this pipeline's")
    pipe = SanaSRPipeline.from_pretrained("me/sana-sr-tiny")
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(pipe(lq_photo), tiny_pipe(lq_photo))  # its LoRA adapter came along
    fetched = {p.relative_to(hub.cache).as_posix() for p in hub.cache.rglob("*") if p.is_file()}
    assert "lora/pytorch_lora_weights.safetensors" in fetched
    assert not [f for f in fetched if f.endswith((".py", ".bin")) or f.startswith("variants/")], fetched
