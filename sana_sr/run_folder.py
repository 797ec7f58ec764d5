"""The layout of a run folder: where each stage of the main job writes, and where `publish` and the report read.

    photos/  shards/                       the training photos and their shards
    train/                                  a training output_dir (config.yaml, metrics.jsonl, replicas.json, final/)
    train/final/pipeline/                   the trained pipeline (LoRA adapter, EMA weights)
    prune/pruned/                           the pruned pipeline, before its fine-tune
    prune/finetune/final/pipeline/          the pruned pipeline after its distillation fine-tune
    compress/NAME/                          compressed pipelines (`sana-sr compress`)
    eval-photos/{hr,lr}/PROTOCOL/           the held-out crops and their LQ, one folder per LQ protocol
    eval/NAME/summary.json                  evaluations (`eval/realsr.py`), one folder per variant
    restore/scores.json                     every variant and bicubic on the same LQ photos
    cost.md  publish/VARIANT/  report/  timings.json

A training output_dir on its own (final/pipeline at its top) is a run folder too: `trained` finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def photos(self) -> Path:
        return self.root / "photos"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def trained(self) -> Path:
        """The trained pipeline: train/final/pipeline, or final/pipeline when the folder is a training output_dir."""
        nested = self.train / "final" / "pipeline"
        alone = self.root / "final" / "pipeline"
        return alone if not (nested / "model_index.json").is_file() and (alone / "model_index.json").is_file() \
            else nested

    @property
    def training_config(self) -> Path:
        nested = self.train / "config.yaml"
        return nested if nested.is_file() or not (self.root / "config.yaml").is_file() else self.root / "config.yaml"

    @property
    def pruned_raw(self) -> Path:
        return self.root / "prune" / "pruned"

    @property
    def prune_finetune(self) -> Path:
        return self.root / "prune" / "finetune"

    @property
    def pruned(self) -> Path:
        return self.prune_finetune / "final" / "pipeline"

    def compressed(self, name: str) -> Path:
        return self.root / "compress" / name

    def compressed_variants(self) -> dict[str, Path]:
        """{name: folder} of the compressed pipelines written so far, by name."""
        folder = self.root / "compress"
        found = sorted(p for p in folder.iterdir() if (p / "model_index.json").is_file()) if folder.is_dir() else []
        return {p.name: p for p in found}

    def variants(self) -> dict[str, Path]:
        """{name: pipeline folder} of every model the run has made: trained, pruned, then each compressed one."""
        found = {name: path for name, path in (("trained", self.trained), ("pruned", self.pruned))
                 if (path / "model_index.json").is_file()}
        return found | self.compressed_variants()

    def evaluation(self, variant: str) -> Path:
        return self.root / "eval" / variant

    def evaluation_summaries(self) -> list[Path]:
        return sorted((self.root / "eval").glob("*/summary.json"))

    @property
    def eval_photos(self) -> Path:
        """The held-out crops the evaluation stage scores, hr/PROTOCOL/ and lr/PROTOCOL/ (written once)."""
        return self.root / "eval-photos"

    @property
    def restore(self) -> Path:
        return self.root / "restore"

    @property
    def cost(self) -> Path:
        return self.root / "cost.md"

    def publish(self, variant: str) -> Path:
        return self.root / "publish" / variant

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"
