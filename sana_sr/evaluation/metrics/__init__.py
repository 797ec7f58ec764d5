"""The Real-ISR metric suite: what each metric needs, and one object that scores an image with all of them.

PSNR, SSIM (Y channel, MATLAB conventions) and NIQE (`niqe` on the Y of YCbCr, BasicSR's default; `niqe_gray` on
the BT.601 grey, pyiqa's default channel) are computed here, offline. LPIPS, DISTS, MUSIQ, MANIQA,
CLIPIQA and FID come from pyiqa when it is installed and its weights are in the local cache; otherwise they are
listed in `MetricSuite.unavailable` with the reason and never given a number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sana_sr.evaluation.metrics.fidelity import psnr_y, rgb_to_y, ssim_y, to_8bit_levels
from sana_sr.evaluation.metrics.learned import MetricUnavailable, folder_fid, image_metric, import_pyiqa
from sana_sr.evaluation.metrics.niqe import niqe


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is computed and read."""

    name: str
    kind: str
    """"full-reference" (needs the HR image), "no-reference", or "set" (one number for the whole dataset)."""
    higher_is_better: bool
    backend: str
    """"sana_sr" (computed here, offline) or "pyiqa"."""


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("psnr", "full-reference", True, "sana_sr"),
        MetricInfo("ssim", "full-reference", True, "sana_sr"),
        MetricInfo("lpips", "full-reference", False, "pyiqa"),
        MetricInfo("dists", "full-reference", False, "pyiqa"),
        MetricInfo("niqe", "no-reference", False, "sana_sr"),
        MetricInfo("niqe_gray", "no-reference", False, "sana_sr"),
        MetricInfo("musiq", "no-reference", True, "pyiqa"),
        MetricInfo("maniqa", "no-reference", True, "pyiqa"),
        MetricInfo("clipiqa", "no-reference", True, "pyiqa"),
        MetricInfo("fid", "set", False, "pyiqa"),
    )
}
DEFAULT_METRICS = tuple(METRICS)


def parse_metrics(spec: str | Sequence[str]) -> tuple[str, ...]:
    """"psnr,ssim" or a list -> validated names in the suite's order; "all" is every metric."""
    names = [n.strip().lower() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if names == ["all"]:
        return DEFAULT_METRICS
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    if not names:
        raise ValueError(f"no metric requested; known: {', '.join(METRICS)}")
    return tuple(n for n in METRICS if n in names)


class MetricSuite:
    """Scores restored images with the requested metrics that can run here.

    `available` lists the per-image metrics that will produce numbers (in order), `set_metrics` the dataset-level
    ones (FID), and `unavailable` maps every other requested metric to the reason.
    """

    def __init__(self, names: Sequence[str], device: torch.device, has_reference: bool, crop_border: int):
        self.crop_border = crop_border
        self.device = device
        self.unavailable: dict[str, str] = {}
        self._scorers: dict[str, Callable[[np.ndarray, np.ndarray | None], float]] = {}
        self.set_metrics: list[str] = []
        for name in names:
            info = METRICS[name]
            if info.kind != "no-reference" and not has_reference:
                self.unavailable[name] = "needs HR reference images; this dataset has only LR inputs"
                continue
            if info.kind == "set":
                try:
                    import_pyiqa()  # weights are looked for at the end, when the SR folder exists
                    self.set_metrics.append(name)
                except MetricUnavailable as e:
                    self.unavailable[name] = str(e)
                continue
            try:
                self._scorers[name] = self._build(name)
            except MetricUnavailable as e:
                self.unavailable[name] = str(e)

    def _build(self, name: str) -> Callable[[np.ndarray, np.ndarray | None], float]:
        border = self.crop_border
        if name == "psnr":
            return lambda sr, hr: psnr_y(sr, hr, border)
        if name == "ssim":
            return lambda sr, hr: ssim_y(sr, hr, border)
        if name == "niqe":
            return lambda sr, hr: niqe(sr, "y")
        if name == "niqe_gray":
            return lambda sr, hr: niqe(sr, "gray")
        return image_metric(name, self.device)

    @property
    def available(self) -> list[str]:
        return list(self._scorers)

    def drop(self, name: str, reason: str) -> None:
        """Stop computing `name` and report it as unavailable for `reason`."""
        self._scorers.pop(name, None)
        self.unavailable[name] = reason

    def score(self, sr: np.ndarray, hr: np.ndarray | None) -> tuple[dict[str, float | None], list[str]]:
        """Every available per-image metric of `sr` (and `hr`), RGB (H, W, 3) in [0, 1] on 8-bit levels.

        Returns `(values, problems)`: a metric that cannot score this image (NIQE on an image smaller than two
        96x96 blocks, say) is None in `values` and explained in `problems`, never a made-up number.
        """
        values: dict[str, float | None] = {}
        problems: list[str] = []
        for name, scorer in self._scorers.items():
            try:
                values[name] = scorer(sr, hr)
            except ValueError as e:
                values[name] = None
                problems.append(f"{name}: {e}")
        return values, problems

    def score_sets(self, sr_dir: Path | None, hr_dir: Path | None) -> dict[str, float]:
        """The dataset-level metrics (FID) from the written SR folder and the HR folder; failures become unavailable."""
        results: dict[str, float] = {}
        for name in self.set_metrics:
            if sr_dir is None or hr_dir is None:
                self.unavailable[name] = "needs the SR images on disk (run without --no-save-images) and an HR folder"
                continue
            try:
                results[name] = folder_fid(sr_dir, hr_dir, self.device)
            except MetricUnavailable as e:
                self.unavailable[name] = str(e)
        return results


__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "MetricInfo",
    "MetricSuite",
    "MetricUnavailable",
    "niqe",
    "parse_metrics",
    "psnr_y",
    "rgb_to_y",
    "ssim_y",
    "to_8bit_levels",
]
