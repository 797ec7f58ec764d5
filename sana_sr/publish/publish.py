"""`sana-sr publish RUN_DIR --repo-id ORG/NAME [--variant merged|lora|pruned|COMPRESSED] [--private] [--dry-run]`.

Builds a hub-ready folder from a run and uploads it with huggingface_hub in one commit:

    README.md                  the model card (YAML metadata, metrics from the run's evaluation, cost, usage)
    model_index.json, vae/ ... the chosen variant at the root, loadable by `sana_sr.load_pipeline(folder)`
    variants/NAME/             every compressed variant of the run that is not at the root, with its report

A run folder is what `sana-sr quickstart` writes (train/, prune/, compress/, eval/) or a training output_dir
(final/pipeline). The token comes from HF_TOKEN or the stored login (`hf auth login`); it is never printed or
written. `--dry-run` builds the folder and lists what would be uploaded, with sizes; it needs no token.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from sana_sr.atomic import MARKER, OutputError, atomic_directory, check_apart, check_output, folder_bytes
from sana_sr.run_folder import RunFolder

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
REQUIRED_METADATA = {"library_name": "diffusers", "pipeline_tag": "image-to-image"}
OWNER = "sana-sr publish"


class PublishError(RuntimeError):
    """A publishing problem, reported as one line."""


def find_variants(run: Path) -> dict[str, Path]:
    """{variant: folder} of everything publishable in a run folder."""
    folders = RunFolder(run).variants()
    variants = {"merged": folders["trained"], "lora": folders["trained"]} if "trained" in folders else {}
    return variants | {name: folder for name, folder in folders.items() if name != "trained"}


def training_config(run: Path) -> dict:
    path = RunFolder(run).training_config
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


def base_models(config: dict) -> list[str]:
    """Hub ids of the DC-AE and the SANA base the run started from (none for the bundled tiny base)."""
    from sana_sr.model.presets import PRESETS

    preset = PRESETS.get(config.get("model", {}).get("preset", ""))
    ids = [] if preset is None else [preset.base_id, preset.vae_id]
    return [i for i in ids if i and REPO_ID.match(i) and not Path(i).is_absolute()]


def _metrics_table(run: Path) -> list[str]:
    rows = []
    for summary_path in RunFolder(run).evaluation_summaries():
        summary = json.loads(summary_path.read_text())
        for name, entry in summary["metrics"].items():
            value = entry.get("mean", entry.get("value"))
            arrow = "↑" if entry["higher_is_better"] else "↓"
            rows.append(f"| {summary_path.parent.name} | {summary['dataset']['name']} | {name} {arrow} | "
                        f"{value:.4g} | {entry['images']} |")
    if not rows:
        return ["No evaluation in this run (`eval/realsr.py` writes eval/NAME/summary.json)."]
    return ["| variant | dataset | metric | value | images |", "|---|---|---|---|---|", *rows]


def model_card(run: Path, repo_id: str, variant: str, variants: dict[str, Path], license_id: str,
               datasets: list[str]):
    """The README.md of the repo as a huggingface_hub ModelCard."""
    from huggingface_hub import ModelCard, ModelCardData

    config = training_config(run)
    bases = base_models(config)
    data = ModelCardData(library_name="diffusers", pipeline_tag="image-to-image", license=license_id,
                         base_model=bases or None, datasets=datasets or None,
                         tags=["super-resolution", "image-restoration", "one-step", "sana", "dc-ae", "sana-sr"])
    preset = config.get("model", {}).get("preset", "unknown")
    origin = ", ".join(f"`{b}`" for b in bases) if bases else "the tiny base bundled with sana-sr (not on the hub)"
    others = [name for name in variants if name not in (variant, "merged", "lora", "pruned")]
    cost = RunFolder(run).cost
    lines = [
        f"# {repo_id}", "",
        f"SANA-SR ({preset} preset): one-step real-world ×4 super-resolution with a frozen DC-AE and a LoRA-adapted "
        f"SANA DiT, trained with sana-sr. Base weights: {origin}. This folder holds the "
        f"`{variant}` variant at the root.", "",
        "## Usage", "", "```python",
        "from huggingface_hub import snapshot_download",
        "from sana_sr import load_pipeline", "",
        f'pipe = load_pipeline(snapshot_download("{repo_id}"))',
        "sr = pipe(lq_image)            # PIL image or (B, 3, h, w) tensor in [0, 1] -> (B, 3, 4h, 4w)",
        "```", "",
        f"or `sana-sr upscale photos/ -o restored/ --model \"$(hf download {repo_id})\"`.", "",
        "## Evaluation", "", *_metrics_table(run), "",
    ]
    if cost.is_file():
        lines += ["## Cost", "", cost.read_text().strip(), ""]
    if others:
        lines += ["## Compressed variants", "",
                  "Packed low-bit weights (sana-sr `compress/`); each folder loads with `load_pipeline(folder)`:", "",
                  "| folder | size | report |", "|---|---|---|"]
        lines += [f"| `variants/{n}/` | {folder_bytes(variants[n]) / 2**20:.2f} MiB | "
                  f"`variants/{n}/compression.json` |" for n in others]
        lines += ["", "```python", f'folder = snapshot_download("{repo_id}", allow_patterns="variants/{others[0]}/*")',
                  f'pipe = load_pipeline(Path(folder) / "variants/{others[0]}")', "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def validate_card(text: str) -> None:
    """Parse the card as the hub client does and check the metadata this project promises; raises PublishError."""
    from huggingface_hub import ModelCard

    try:
        metadata = ModelCard(text).data.to_dict()
    except Exception as e:  # the client's YAML / metadata errors
        raise PublishError(f"model card metadata does not parse: {e}") from None
    for key, value in REQUIRED_METADATA.items():
        if metadata.get(key) != value:
            raise PublishError(f"model card metadata {key} is {metadata.get(key)!r}, expected {value!r}")
    if not metadata.get("license"):
        raise PublishError("model card metadata has no license")
    for key in ("base_model", "datasets"):
        bad = [v for v in metadata.get(key) or [] if not REPO_ID.match(v)]
        if bad:
            raise PublishError(f"model card metadata {key} holds {bad}: not hub ids (ORG/NAME)")


def _copy_variant(name: str, source: Path, dest: Path) -> None:
    if name == "merged":
        from diffusers.utils import logging
        from transformers.utils import logging as transformers_logging

        from sana_sr.model.pipeline import SanaSRPipeline

        logging.disable_progress_bar()  # stderr stays for the one-line outcome
        transformers_logging.disable_progress_bar()

        pipe = SanaSRPipeline.from_pretrained(source)
        pipe.merge_lora()
        pipe.save_pretrained(dest)
    else:
        shutil.copytree(source, dest, dirs_exist_ok=True)


def build_folder(run: Path, repo_id: str, variant: str, out: Path, license_id: str = "apache-2.0",
                 datasets: list[str] = (), overwrite: bool = False) -> Path:
    """Write the hub-ready folder to `out` atomically and return it. `out` may lie inside the run (the default
    does) but must not be the run, hold it, or overlap a folder it copies; an existing `out` is replaced only if
    publish wrote it (or with `overwrite`)."""
    variants = find_variants(run)
    if variant not in variants:
        raise PublishError(f"variant {variant!r} not in run {run} (found: {', '.join(variants) or 'none'})")
    try:
        if Path(out).resolve() in (Path(run).resolve(), *Path(run).resolve().parents):
            raise OutputError(f"output {out} is or holds the run folder {run}: choose a folder apart from it")
        check_apart(out, variants.values())
        check_output(out, OWNER, overwrite=overwrite)
    except OutputError as e:
        raise PublishError(str(e)) from None
    card = model_card(run, repo_id, variant, variants, license_id, list(datasets))
    validate_card(str(card))
    with atomic_directory(out, OWNER, overwrite=overwrite) as tmp:
        _copy_variant(variant, variants[variant], tmp)
        for name, folder in variants.items():
            if name not in (variant, "merged", "lora", "pruned"):
                shutil.copytree(folder, tmp / "variants" / name)
        (tmp / "README.md").write_text(str(card))
    return out


def _is_public(api, repo_id: str) -> bool:
    """Whether `repo_id` exists as a public model repo (False when it does not exist yet)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return not api.repo_info(repo_id, repo_type="model").private
    except RepositoryNotFoundError:
        return False


def upload(folder: Path, repo_id: str, private: bool) -> str:
    """One commit with the whole folder; returns the commit URL. Errors become one-line PublishErrors."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (--dry-run needs none)")
    api = HfApi(token=token)
    try:
        from huggingface_hub import ModelCard

        ModelCard((folder / "README.md").read_text()).validate()  # the hub's own check, before any write
        # create_repo(exist_ok=True) leaves an existing repo's visibility as it is: --private would upload into a
        # public repo without a word.
        if private and _is_public(api, repo_id):
            raise PublishError(f"--private, but {repo_id} already exists and is public: nothing was uploaded; make "
                               "it private on the hub (Settings) first, or publish without --private")
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload SANA-SR (sana-sr publish)",
                                 ignore_patterns=[MARKER, f"**/{MARKER}"])  # sana-sr's bookkeeping, not the model's
    except PublishError:
        raise
    except Exception as e:  # connection, auth, validation: one line, the token never in it
        message = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(token, "***")
        raise PublishError(
            f"upload to {repo_id} failed, nothing was committed: {type(e).__name__}: {message}"
        ) from None
    return str(info.commit_url)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sana-sr publish", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder (sana-sr quickstart's, or a training output_dir)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hugging Face hub")
    p.add_argument("--variant", default="merged", help="what goes at the root: merged, lora, pruned, or a "
                   "compressed folder name under RUN/compress (default merged)")
    p.add_argument("--out", type=Path, help="where to build the folder (default RUN/publish/VARIANT)")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--dataset", action="append", default=[], help="hub id of a training dataset (repeatable)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="build and list the files, upload nothing (no token)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it was not written by sana-sr publish (it is deleted)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not REPO_ID.match(args.repo_id):
            raise PublishError(f"--repo-id {args.repo_id!r} is not ORG/NAME")
        out = build_folder(args.run, args.repo_id, args.variant, args.out or RunFolder(args.run).publish(args.variant),
                           args.license, args.dataset, overwrite=args.overwrite)
        files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MARKER)  # what would be uploaded
        for path in files:
            print(f"{path.stat().st_size:>12,d}  {path.relative_to(out)}")
        print(f"{sum(p.stat().st_size for p in files):>12,d}  total, {len(files)} files in {out}")
        if args.dry_run:
            print(f"dry run: nothing uploaded to {args.repo_id}")
            return 0
        print(f"committed to {args.repo_id}: {upload(out, args.repo_id, args.private)}")
        return 0
    except PublishError as e:
        print(f"sana-sr publish: {e}", file=sys.stderr)
        return 1
