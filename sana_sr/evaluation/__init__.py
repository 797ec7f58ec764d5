"""Distributed Real-ISR evaluation (`accelerate launch eval/realsr.py`): datasets, the sharded run, reports."""

from sana_sr.evaluation.datasets import Dataset, DatasetError, Sample, find_layout, lr_only_dataset, paired_dataset
from sana_sr.evaluation.runner import EvalConfig, run

__all__ = [
    "Dataset",
    "DatasetError",
    "EvalConfig",
    "Sample",
    "find_layout",
    "lr_only_dataset",
    "paired_dataset",
    "run",
]
