"""The learned metrics (LPIPS, DISTS, MUSIQ, MANIQA, CLIPIQA) and FID, through pyiqa when it can run them.

pyiqa fetches each metric's network weights on first use. With no network, or without pyiqa, a metric is reported
as unavailable with the reason: the evaluation never writes a number it did not compute. pyiqa is deliberately not
a dependency of `sana-sr[eval]`: on PyPI it pulls torchvision and, through it, a CUDA build of torch (see
docs/evaluation.md for installing it next to an existing torch).
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

# our name -> pyiqa's name. MANIQA is the PIPAL-trained model, as in the Real-ISR papers (not the KonIQ one).
PYIQA_NAMES = {
    "lpips": "lpips",
    "dists": "dists",
    "musiq": "musiq",
    "maniqa": "maniqa-pipal",
    "clipiqa": "clipiqa",
    "fid": "fid",
}

# A download that cannot connect must fail, not hang the evaluation.
CONNECT_TIMEOUT_S = 20.0


class MetricUnavailable(Exception):
    """The metric cannot be computed here; `str()` is the one-line reason."""


def import_pyiqa():
    """The pyiqa module, or MetricUnavailable saying how to get it (a seam the tests replace)."""
    try:
        return importlib.import_module("pyiqa")
    except ImportError as e:
        raise MetricUnavailable(
            f"pyiqa is not installed ({e.__class__.__name__}: {str(e).splitlines()[0]}); "
            "install it as docs/evaluation.md says, with its weights in the local cache"
        ) from None


@contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def create_pyiqa_metric(name: str, device: torch.device):
    """pyiqa's metric object for our `name`, or MetricUnavailable with the reason (no weights, no network...)."""
    pyiqa = import_pyiqa()
    try:
        with _socket_timeout(CONNECT_TIMEOUT_S):
            metric = pyiqa.create_metric(PYIQA_NAMES[name], device=device, as_loss=False)
    except Exception as e:  # noqa: BLE001 - pyiqa raises whatever its downloader raises
        raise MetricUnavailable(
            f"pyiqa could not load {PYIQA_NAMES[name]!r} (weights not in the local cache and no download possible?): "
            f"{_first_line(e)}"
        ) from None
    return metric


def _to_tensor(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None].to(device)


def image_metric(name: str, device: torch.device) -> Callable[[np.ndarray, np.ndarray | None], float]:
    """A per-image scorer `(sr, hr_or_None) -> float` on RGB arrays in [0, 1], or MetricUnavailable."""
    metric = create_pyiqa_metric(name, device)
    full_reference = name in ("lpips", "dists")

    @torch.no_grad()
    def score(sr: np.ndarray, hr: np.ndarray | None) -> float:
        if full_reference:
            return float(metric(_to_tensor(sr, device), _to_tensor(hr, device)).item())
        return float(metric(_to_tensor(sr, device)).item())

    return score


def folder_fid(sr_dir: Path, hr_dir: Path, device: torch.device) -> float:
    """FID between two image folders (pyiqa's clean-fid implementation), or MetricUnavailable."""
    metric = create_pyiqa_metric("fid", device)
    try:
        with _socket_timeout(CONNECT_TIMEOUT_S):
            return float(metric(str(sr_dir), str(hr_dir)))
    except Exception as e:  # noqa: BLE001 - the Inception weights are fetched on this call
        raise MetricUnavailable(f"pyiqa's FID failed: {_first_line(e)}") from None
