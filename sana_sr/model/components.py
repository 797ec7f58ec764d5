"""The classes a SANA-SR pipeline folder may name, and the checks a folder passes before anything in it is loaded.

A folder's model_index.json names each component's class as [library, class]; diffusers' loader imports what it
names and calls that class's `from_pretrained`, runs a `.py` that a folder carries when told to trust it, and reads
pickled weights (`.bin`) when no safetensors are there. A downloaded folder is not trusted, so:

- `ALLOWED` is the only map from a name in a folder to a class: per component, the classes it may be;
- `check_pipeline_folder` reads model_index.json, each component's configs and its file names (no import, no
  diffusers call) and refuses, in one line naming the component, any class outside `ALLOWED`, any `.py` file, any
  pickle-format weights and any config that asks for remote code (`auto_map`);
- `fetch_pipeline_folder` does the same for a hub id: model_index.json first, then the components' configs, and
  only then their safetensors, configs and tokenizer files (never code or pickles);
- `refuse_unsafe_options` turns away `from_pretrained` options that would run a folder's code or read pickles.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

PIPELINE_CLASS = "SanaSRPipeline"

# Per component, the classes it may be, written as diffusers records them in model_index.json: "library.Class",
# where the library is `diffusers` or `transformers` for theirs and the defining module for this project's own.
ALLOWED: dict[str, tuple[str, ...]] = {
    "vae": ("diffusers.AutoencoderDC", "sana_sr.quantization.components.QuantizedAutoencoderDC"),
    "transformer": (
        "diffusers.SanaTransformer2DModel",
        "sana_sr.pruning.model.PrunedSanaTransformer2DModel",
        "sana_sr.quantization.components.QuantizedSanaTransformer2DModel",
        "sana_sr.quantization.components.QuantizedPrunedSanaTransformer2DModel",
    ),
    "scheduler": ("diffusers.FlowMatchEulerDiscreteScheduler",),
    "text_encoder": ("transformers.Gemma2Model",),
    # What a tokenizer's save_pretrained records: TokenizersBackend (transformers 5), PreTrainedTokenizerFast
    # (transformers 4) and Gemma's own (SANA's hub folders).
    "tokenizer": (
        "transformers.TokenizersBackend",
        "transformers.PreTrainedTokenizerFast",
        "transformers.GemmaTokenizer",
        "transformers.GemmaTokenizerFast",
    ),
    "default_prompt": ("sana_sr.model.text.PromptEmbedding",),
}
# Weight formats that torch.load / pickle would read, and so could run code: never read from a pipeline folder.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# from_pretrained options that load code shipped with a folder (or pickles) instead of the allow-listed classes.
UNSAFE_OPTIONS = ("custom_pipeline", "custom_revision", "trust_remote_code", "use_onnx", "from_flax",
                  "load_connected_pipeline")
# Options of DiffusionPipeline.from_pretrained that only say where to download from; fetch_pipeline_folder takes them.
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
# Files a hub download may fetch of a component folder, beyond configs and safetensors: tokenizer vocabularies.
TOKENIZER_FILES = ("*.model", "*.txt")
LORA_DIR = "lora"
OLD_COMPRESSED_LAYOUT = Path("quantized") / "layout.json"  # what `sana-sr compress` wrote before per-component folders


class UnsafeFolderError(ValueError):
    """A pipeline folder (or an option) that could run code or load a class outside the allow-list; one line."""


def _allowed_list(component: str) -> str:
    return ", ".join(ALLOWED[component])


def allowed_name(component: str, library: str | None, class_name: str) -> str | None:
    """The ALLOWED entry "library.Class" that `component` may be, or None. `library` None matches a bare class name
    (as a config.json's `_class_name` records it)."""
    for entry in ALLOWED.get(component, ()):
        entry_library, _, entry_class = entry.rpartition(".")
        if entry_class == class_name and library in (None, entry_library):
            return entry
    return None


def component_class(component: str, class_name: str, library: str | None = None) -> type:
    """The class of an allowed entry, imported only now (the module is one of ALLOWED's, never a folder's choice).

    The one place a name read from a folder becomes a class: the pipeline loader, `load_pruned_transformer` and
    `sana-sr cost` all come here. Raises UnsafeFolderError for a class outside ALLOWED[component]."""
    if component not in ALLOWED:
        raise UnsafeFolderError(f"{component!r} is not a SANA-SR component (known: {', '.join(ALLOWED)})")
    entry = allowed_name(component, library, class_name)
    if entry is None:
        found = f"{library}.{class_name}" if library else class_name
        raise UnsafeFolderError(f"component {component!r} names {found}, which is not allowed "
                                f"(allowed: {_allowed_list(component)})")
    module, _, name = entry.rpartition(".")
    return getattr(importlib.import_module(module), name)


def refuse_unsafe_options(kwargs: dict) -> None:
    """Refuse from_pretrained options that would run a folder's code or read pickles; force safetensors."""
    for option in UNSAFE_OPTIONS:
        if kwargs.get(option):
            raise UnsafeFolderError(f"from_pretrained option {option}={kwargs[option]!r} is refused: SANA-SR "
                                    "pipelines load only allow-listed classes, never code from a folder")
    if kwargs.get("use_safetensors") is False:
        raise UnsafeFolderError("from_pretrained option use_safetensors=False is refused: weights load only "
                                "from safetensors")
    kwargs["use_safetensors"] = True


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeFolderError(f"{path} is not readable JSON ({type(e).__name__}): rewrite the folder") from None
    if not isinstance(data, dict):
        raise UnsafeFolderError(f"{path} holds a {type(data).__name__}, not a JSON object: rewrite the folder")
    return data


def _refuse_files(folder: Path, what: str, recursive: bool) -> None:
    """No Python (diffusers would run it as a custom class) and no pickle-format weights in `folder`."""
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if path.suffix == ".py":
            raise UnsafeFolderError(f"{what} carries Python code ({path.relative_to(folder.parent)}): refused, "
                                    "SANA-SR folders load only allow-listed classes")
        if path.suffix in PICKLE_SUFFIXES:
            raise UnsafeFolderError(f"{what} carries pickle-format weights ({path.relative_to(folder.parent)}): "
                                    "refused, weights load only from .safetensors")


def check_index(index: dict, where: str | os.PathLike) -> dict[str, str]:
    """Check a model_index.json's contents; returns {component: "library.Class"} of the components it names."""
    if index.get("_class_name") != PIPELINE_CLASS:
        raise UnsafeFolderError(f"{where}: model_index.json names pipeline {index.get('_class_name')!r}, "
                                f"not {PIPELINE_CLASS!r}")
    components = {}
    for key, value in index.items():
        if key.startswith("_") or (key not in ALLOWED and not isinstance(value, (list, tuple))):
            continue  # pipeline settings (upscale, timestep_index, ...)
        if key not in ALLOWED:
            raise UnsafeFolderError(f"{where}: model_index.json names component {key!r} = {value!r}, which is not a "
                                    f"SANA-SR component (known: {', '.join(ALLOWED)})")
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(v is None or isinstance(v, str) for v in value)):
            raise UnsafeFolderError(f"{where}: component {key!r} is {value!r} in model_index.json, not "
                                    "[library, class]")
        library, class_name = value
        if library is None and class_name is None:
            continue  # an optional component left out
        entry = allowed_name(key, library, class_name)
        if entry is None or library is None:
            raise UnsafeFolderError(f"{where}: component {key!r} names {library}.{class_name}, which is not "
                                    f"allowed (allowed: {_allowed_list(key)})")
        components[key] = entry
    return components


def _check_component(folder: Path, component: str, entry: str) -> None:
    """One component folder: files, and every config it holds agrees with the allowed class it was named as."""
    sub = folder / component
    if not sub.is_dir():
        raise UnsafeFolderError(f"{folder}: component {component!r} is named in model_index.json but has no folder")
    _refuse_files(sub, f"component {component!r}", recursive=True)
    class_name = entry.rpartition(".")[2]
    for config_file in sorted(sub.glob("*.json")):
        config = _read_json(config_file)
        where = f"component {component!r} ({config_file.relative_to(folder)})"
        if "auto_map" in config:
            raise UnsafeFolderError(f"{where} asks for remote code (auto_map): refused, SANA-SR folders load only "
                                    "allow-listed classes")
        named = [config[k] for k in ("_class_name", "tokenizer_class") if k in config]
        named += config.get("architectures") or []
        for name in named:
            if not isinstance(name, str) or allowed_name(component, None, name) is None:
                raise UnsafeFolderError(f"{where} names class {name!r}, which is not allowed "
                                        f"(allowed: {_allowed_list(component)})")
        if "_class_name" in config and config["_class_name"] != class_name:
            raise UnsafeFolderError(f"{where} names class {config['_class_name']!r} but model_index.json names "
                                    f"{class_name!r}: rewrite the folder")


def check_pipeline_folder(folder: str | os.PathLike) -> dict[str, str]:
    """Check a local pipeline folder before anything in it is imported or loaded; returns {component:
    "library.Class"} of the components it holds. Raises UnsafeFolderError (one line) at the first unsafe thing,
    FileNotFoundError / ValueError for a folder that is not, or no longer, a loadable pipeline folder."""
    folder = Path(folder)
    if (folder / OLD_COMPRESSED_LAYOUT).is_file():
        raise ValueError(f"{folder} is a compressed folder of an older layout (one {OLD_COMPRESSED_LAYOUT.parent}/ "
                         "export for DiT and decoder): re-run `sana-sr compress` to rewrite it")
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a SANA-SR pipeline folder (no model_index.json)")
    components = check_index(_read_json(folder / "model_index.json"), folder)
    _refuse_files(folder, "the pipeline folder", recursive=False)
    for component, entry in components.items():
        _check_component(folder, component, entry)
    if (folder / LORA_DIR).is_dir():
        _refuse_files(folder / LORA_DIR, "the LoRA adapter", recursive=True)
    return components


def fetch_pipeline_folder(repo_id: str, **hub_options) -> Path:
    """Download a hub pipeline in three steps and return its local folder: model_index.json (checked), the named
    components' configs (checked), then only their configs, safetensors and tokenizer files, and the LoRA adapter's
    safetensors, so that code and pickles never reach the disk. The caller checks the result like a local folder."""
    import huggingface_hub

    index = Path(huggingface_hub.hf_hub_download(repo_id, "model_index.json", **hub_options))
    components = check_index(_read_json(index), repo_id)
    patterns = ["model_index.json", *(f"{c}/*.json" for c in components)]
    check_pipeline_folder(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, **hub_options))
    patterns += [f"{c}/*.safetensors" for c in components] + [f"{LORA_DIR}/*.safetensors"]
    patterns += [f"tokenizer/{p}" for p in TOKENIZER_FILES] if "tokenizer" in components else []
    return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, **hub_options))


def prepare_pipeline_folder(name_or_path: str | os.PathLike, kwargs: dict) -> Path:
    """The checked local folder of a pipeline folder or hub id, its components' classes imported (from ALLOWED):
    diffusers' loader takes a class outside diffusers and transformers only from a module already imported.
    Refuses unsafe options and takes the hub options out of `kwargs`."""
    refuse_unsafe_options(kwargs)
    hub_options = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
    kwargs.pop("proxies", None)  # huggingface_hub no longer takes proxies (it reads the environment)
    path = Path(name_or_path)
    if not path.is_dir() and (path.exists() or path.is_absolute() or str(name_or_path).startswith(".")
                              or str(name_or_path).count("/") > 1):
        raise FileNotFoundError(f"{name_or_path} is not a SANA-SR pipeline folder (no such folder, and not a hub "
                                "id ORG/NAME)")
    folder = path if path.is_dir() else fetch_pipeline_folder(str(name_or_path), **hub_options)
    for component, entry in check_pipeline_folder(folder).items():
        library, _, class_name = entry.rpartition(".")
        component_class(component, class_name, library)
    return folder
