"""Memory the benchmarks report: the peak resident memory of one call (sampled), and the bytes a module holds."""

from __future__ import annotations

import os
import sys
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


def ensure_unpooled_malloc() -> None:
    """Re-run this process with glibc's mmap threshold fixed at 128 KiB, so that freed tensors go back to the OS
    and the resident set follows what is alive (glibc's default raises the threshold after each large free and
    keeps freed memory, which hides a later call's peak under an earlier one's leftovers)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """`with PeakRSS() as p: ...` then p.start, p.peak (bytes, sampled every `interval` s by a thread) and p.extra
    (peak − start: the call's transient memory, what it allocated on top of what was already resident)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def module_bytes(module) -> int:
    """Bytes of the tensors a module holds: parameters and buffers (each storage once), plus the prepacked weights
    and constants of integer layers (opaque oneDNN tensors, not parameters)."""
    import torch

    from compress.integer import IntegerLayer

    seen, total = set(), 0
    tensors = [*module.parameters(), *module.buffers()]
    for m in module.modules():
        if isinstance(m, IntegerLayer):
            tensors += [t for t in (m.packed, m.bias, m.w_scales, m.box, m.edge_taps) if t is not None]
    for t in tensors:
        if t.is_mkldnn:
            total += t.numel() * t.element_size()
            continue
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes() if isinstance(t, torch.Tensor) else 0
    return total
