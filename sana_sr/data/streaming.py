"""Streaming loader over webdataset tar shards, for training (resampled) and evaluation (exact).

    loader = make_loader("shards/", LoaderConfig(batch_size=16))   # degradation=DegradationConfig() by default
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:   # len(loader) batches, the same number on every rank
            lq, gt = degrader(batch, generator)
            skipped += batch["skipped"]

A batch is a dict: "hq" float32 (B, 3, S, S) in [0, 1]; "kernel1", "kernel2", "sinc_kernel" float32 (B, K, K) drawn
per sample in the workers (absent with make_loader(..., degradation=None)); "caption" list[str] ("" when a sample has
none); "key" list[str]; "prompt_embeds" (B, L, D) and "prompt_mask" (B, L) when LoaderConfig.prompt_embeds is on;
"skipped" int, the bad samples this worker met since its previous batch (sum it; `loader.skipped` is the running
total on this rank).

Shard specs: a folder written by `sana-sr shards` (its sizes.json lists the shards), a sizes.json, local tar paths
or brace patterns ("train-{000000..000099}.tar"), `pipe:` commands ("pipe:aws s3 cp s3://b/x.tar -"), a list of
these, or several joined by "::". URLs and commands are taken only from the spec itself: a sizes.json may name
only files inside its own folder (sana_sr/data/listing.py), since it travels with downloaded data.

Modes:
- "resampled" (training): every worker draws shards with replacement, for ever; the loader stops each epoch after
  ceil(epoch_samples / (batch_size * world_size)) full batches, so every rank yields the same number and DDP never
  waits on a rank that ran out. Epochs are a fixed sample count, not passes over the data.
- "exact" (evaluation, tests): the shard list is dealt to the ranks x workers; each sample is read exactly once per
  epoch; the last batch of a worker may be short. When the shard sizes are known, ranks that run out first yield
  empty batches ("hq" of 0 rows) up to `len(loader)`, so every rank still yields the same number of batches.

Seeds: shard draws, shuffle buffer, crops, flips and kernels come from (seed, epoch, rank, worker), so a run is
reproducible and no two workers repeat each other. Ranks and world size come from the arguments, else from the
RANK/WORLD_SIZE environment (as webdataset reads them), else torch.distributed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from sana_sr.data.degradation_config import DegradationConfig
from sana_sr.data.listing import read_listing
from sana_sr.data.samples import (
    DataStreamError,
    DecodeSettings,
    SkipCounter,
    batches,
    collate,
    decode_stream,
    read_shard,
    shard_names,
)
from sana_sr.data.workers import ignore_termination

MODES = ("resampled", "exact")
_DEFAULT: DegradationConfig = DegradationConfig()  # a sentinel: "not given" (None means "no kernels")


@dataclass
class LoaderConfig:
    """How shards become batches."""

    batch_size: int = 16
    """Samples per batch on each rank."""
    mode: str = "resampled"
    """"resampled" (training: fixed epoch length, equal batch counts) or "exact" (each sample once per epoch)."""
    num_workers: int = 4
    """Loader worker processes per rank (0 reads in the main process)."""
    crop_size: int = 512
    """Side of the random square HQ crop; smaller images are skipped (and counted)."""
    hflip: bool = True
    """Random horizontal flip (Real-ESRGAN x4plus: on)."""
    vflip: bool = False
    """Random vertical flip (x4plus: off)."""
    shuffle_buffer: int = 1000
    """Samples held for shuffling in each worker; 0 or 1 keeps shard order."""
    shuffle_initial: int = 100
    """Samples buffered before the first one is yielded."""
    epoch_samples: int | None = None
    """Samples per epoch over all ranks in resampled mode; None takes the total of sizes.json."""
    seed: int = 0
    """Base seed; the same on every rank (each rank and worker derives its own streams from it)."""
    prompt_embeds: bool = False
    """Read precomputed prompt embeddings (emb.npy [+ mask.npy] members); samples without one are skipped."""
    prompt_length: int | None = None
    """Pad or cut prompt embeddings to this many tokens (needed with the training-pair queue); None pads each
    batch to its longest."""
    warn_first: int = 3
    """Bad samples logged one by one in each worker before rate limiting starts."""
    warn_interval_s: float = 60.0
    """After that, at most one warning per worker per this many seconds (with the count since the last one)."""
    hq_uint8: bool = False
    """Leave "hq" as uint8 (0..255) instead of float32 in [0, 1]: 4x fewer bytes to the GPU (RealESRGANDegradation
    takes either)."""
    pin_memory: bool = False
    """Pin batches in page-locked memory (faster host-to-GPU copies); needs CUDA."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    prompt_dim: int | None = None
    """Width of the prompt embeddings the model takes; samples with another are skipped and counted (None: the
    first good sample's width, per worker)."""
    max_bad_in_a_row: int = 1000
    """Resampled mode: a worker that meets this many bad samples in a row (e.g. prompt_embeds on shards written
    without embeddings) stops the run with DataStreamError instead of drawing shards for ever."""
    timeout_s: float = 600.0
    """Seconds to wait for a batch from the loader workers (with num_workers > 0) before DataStreamError: a
    worker stuck on a shard (a hung `pipe:` download) ends the run instead of holding it until the time limit."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"LoaderConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("batch_size", "crop_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoaderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"LoaderConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise ValueError(f"LoaderConfig.epoch_samples must be >= 1, got {self.epoch_samples}")
        if self.max_bad_in_a_row < 1 or not self.timeout_s >= 0:
            raise ValueError(f"LoaderConfig.max_bad_in_a_row ({self.max_bad_in_a_row}) must be >= 1 and timeout_s "
                             f"({self.timeout_s}) >= 0")


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[str], dict[str, int] | None]:
    """Shard URLs of a spec (see the module docstring) and their sample counts when every one is known."""
    parts: list[str] = []
    for item in [spec] if isinstance(spec, str | os.PathLike) else list(spec):
        parts.extend(str(item).split("::"))
    urls: list[str] = []
    sizes: dict[str, int] = {}
    known = True
    for part in parts:
        path = Path(part)
        if "://" in part or part.startswith("pipe:"):
            urls.extend(braceexpand(part))
            known = False
        elif path.is_dir() or path.suffix == ".json":
            listing = path / "sizes.json" if path.is_dir() else path
            if not listing.is_file():
                raise FileNotFoundError(
                    f"no sizes.json in {path}: write shards with `sana-sr shards`, or give the .tar files themselves"
                )
            listed = read_listing(listing)  # names confined to the listing's folder: it is untrusted data
            urls.extend(listed)
            sizes.update(listed)
        else:
            expanded = list(braceexpand(part))
            missing = [p for p in expanded if not Path(p).is_file()]
            if missing and len(expanded) == 1:
                raise FileNotFoundError(f"shard spec not found: {part} (want a shard folder with sizes.json, a "
                                        "sizes.json, .tar files, a brace pattern or a pipe: command)")  # fmt: skip
            if missing:
                raise FileNotFoundError(f"{len(missing)} of {len(expanded)} shards of {part!r} do not exist, e.g. "
                                        f"{missing[0]}")  # fmt: skip
            for p in expanded:
                urls.append(p)
                listing = Path(p).parent / "sizes.json"
                counts = json.loads(listing.read_text()) if listing.is_file() else {}
                if Path(p).name in counts:
                    sizes[p] = int(counts[Path(p).name])
                else:
                    known = False
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls, (sizes if known else None)


def world_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the arguments, else RANK/WORLD_SIZE from the environment, else torch.distributed."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _WorkerSeed:
    """webdataset's ResampledShards seed hook: distinct per (seed, epoch, rank, worker), picklable."""

    def __init__(self, stream: _ShardStream):
        self.stream = stream

    def __call__(self) -> int:
        return self.stream.worker_seed("shards")


class _ShardStream(IterableDataset):
    """One worker's stream of batches (runs inside the loader worker)."""

    def __init__(self, urls: list[str], config: LoaderConfig, kernels: DegradationConfig | None, rank: int,
                 world_size: int, sizes: dict[str, int] | None = None):  # fmt: skip
        super().__init__()
        self.urls, self.config, self.kernels, self.sizes = urls, config, kernels, sizes or {}
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def worker_seed(self, purpose: str) -> int:
        worker, _ = self.worker()
        tag = {"shards": 1, "shuffle": 2, "samples": 3}[purpose]
        sequence = np.random.SeedSequence([self.config.seed, self.epoch, self.rank, worker, tag])
        return int(sequence.generate_state(1)[0])

    def shard_urls(self) -> Iterator[str]:
        if self.config.mode == "resampled":
            source = wds.ResampledShards(self.urls, worker_seed=_WorkerSeed(self), deterministic=True)
            return (item["url"] for item in source)
        worker, num_workers = self.worker()
        readers = self.world_size * num_workers
        # A fixed deal (shard i -> reader i mod readers) so that len(loader) is known; the order in which a reader
        # visits its shards changes with the epoch.
        mine = self.urls[self.rank * num_workers + worker :: readers]
        random.Random(self.worker_seed("shards")).shuffle(mine)
        return iter(mine)

    def __iter__(self) -> Iterator[dict]:
        c = self.config
        worker, _ = self.worker()
        counter = SkipCounter(c.warn_first, c.warn_interval_s, where=f", rank {self.rank} worker {worker}")
        rng = np.random.default_rng(self.worker_seed("samples"))
        settings = DecodeSettings(c.crop_size, c.hflip, c.vflip, c.prompt_embeds, c.prompt_length, c.prompt_dim)
        raw = self._samples(counter)
        if c.shuffle_buffer > 1:
            shuffle_rng = random.Random(self.worker_seed("shuffle"))
            raw = _shuffle(raw, c.shuffle_buffer, min(c.shuffle_initial, c.shuffle_buffer), rng=shuffle_rng)
        # Resampled streams never end by themselves: one of nothing but bad samples must stop, not spin.
        bound = c.max_bad_in_a_row if c.mode == "resampled" else None
        decoded = decode_stream(raw, settings, rng, counter, self.kernels, bound)
        yield from batches(decoded, c.batch_size, counter, partial=c.mode == "exact")

    def _samples(self, counter: SkipCounter) -> Iterator[dict]:
        barren = 0  # consecutive shards without one sample: all-bad data must fail, not spin for ever
        for url in self.shard_urls():
            got = False
            for sample in read_shard(url, counter, self.sizes.get(url)):
                got = True
                yield sample
            barren = 0 if got else barren + 1
            if self.config.mode == "resampled" and barren >= max(50, 3 * len(self.urls)):
                raise DataStreamError(f"{barren} shards in a row gave no sample (the last because: "
                                      f"{counter.last_reason or 'empty'}; last shard: {url}): are the shards readable?")


class StreamingLoader:
    """Iterable of batches with a length; not a torch DataLoader, so `accelerator.prepare` leaves it alone (which
    is right: each rank already reads its own data)."""

    def __init__(self, dataset: _ShardStream, sizes: dict[str, int] | None):
        self.dataset, self.sizes = dataset, sizes
        c = dataset.config
        self.config = c
        self.skipped = 0
        """Bad samples seen on this rank so far (the sum of the batches' "skipped")."""
        self._next_epoch = 0
        kwargs: dict = {"batch_size": None, "num_workers": c.num_workers}  # pinning is done after the float cast
        if c.num_workers > 0:
            kwargs.update(prefetch_factor=c.prefetch_factor, persistent_workers=False,
                          worker_init_fn=ignore_termination, timeout=c.timeout_s)
        self.loader = wds.WebLoader(dataset, **kwargs)
        if c.mode == "resampled":
            self.loader = self.loader.with_epoch(len(self))

    @property
    def readers(self) -> int:
        return self.dataset.world_size * max(1, self.config.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch `epoch` (seeds derive from it); iterating without it counts up from 0."""
        self._next_epoch = epoch

    def __len__(self) -> int:
        c, d = self.config, self.dataset
        if c.mode == "resampled":
            total = c.epoch_samples or sum(self.sizes.values())
            return math.ceil(total / (c.batch_size * d.world_size))
        if self.sizes is None:
            raise TypeError("len() of an exact-mode loader needs the shard sizes (a sizes.json beside the shards)")
        readers, per_rank = self.readers, []
        for rank in range(d.world_size):
            workers = range(rank * max(1, c.num_workers), (rank + 1) * max(1, c.num_workers))
            per_rank.append(sum(math.ceil(sum(self.sizes[u] for u in d.urls[w::readers]) / c.batch_size)
                                for w in workers))  # fmt: skip
        return max(per_rank)

    def __iter__(self) -> Iterator[dict]:
        self.dataset.epoch = self._next_epoch
        self._next_epoch += 1
        count = 0
        batches = iter(self.loader)
        # Workers are forked by the first fetch; SIGTERM stays blocked until each has ignored it
        # (ignore_termination). A signal for this process meanwhile is delivered when the mask is restored.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            first = self._next(batches)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for batch in [] if first is None else itertools.chain([first], iter(lambda: self._next(batches), None)):
            yield self._finish(batch)
            count += 1
        if self.config.mode == "resampled" and count < len(self):  # other ranks would wait on this one for ever
            raise DataStreamError(f"epoch {self.dataset.epoch} ended after {count} of {len(self)} batches on rank "
                                  f"{self.dataset.rank}; shards: {shard_names(self.dataset.urls)}")
        if self.config.mode == "exact" and self.sizes is not None:
            for _ in range(count, len(self)):
                yield self._finish(self._empty_batch())

    def _next(self, batches: Iterator[dict]) -> dict | None:
        """The next batch, None at the end; a worker's DataStreamError or a timeout as one clean line."""
        try:
            return next(batches, None)
        except DataStreamError as e:  # from a worker, re-raised with its traceback in the message: keep the line
            last = str(e).strip().splitlines()[-1]
            raise DataStreamError(last.split("DataStreamError: ", 1)[-1]) from None
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            raise DataStreamError(f"no batch from the loader workers of rank {self.dataset.rank} in "
                                  f"{self.config.timeout_s:g} s (LoaderConfig.timeout_s): a worker is stuck reading "
                                  f"one of {shard_names(self.dataset.urls)}") from None

    def _finish(self, batch: dict) -> dict:
        if "hq" not in batch:  # a worker met only bad samples: an empty batch that carries their count
            batch = {**self._empty_batch(), "skipped": batch["skipped"]}
        if not self.config.hq_uint8:
            # In numpy: torch's uint8 -> float cast is several times slower on a loaded 2-core machine (measured).
            batch["hq"] = torch.from_numpy(np.divide(batch["hq"].numpy(), np.float32(255.0), dtype=np.float32))
        if self.config.pin_memory and torch.cuda.is_available():
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.skipped += batch["skipped"]
        return batch

    def _empty_batch(self) -> dict:
        size = self.config.crop_size
        batch = collate([], 0)
        batch["hq"] = torch.zeros(0, 3, size, size, dtype=torch.uint8)
        if self.dataset.kernels is not None:
            k = self.dataset.kernels.blur_kernel_size
            batch.update({name: torch.zeros(0, k, k) for name in ("kernel1", "kernel2", "sinc_kernel")})
        return batch


def check_readers(spec, num_shards: int, world_size: int, workers: int, sizes: dict[str, int] | None = None) -> None:
    """Every reader (rank x loader worker) needs a shard of its own, or it idles and the ranks' batch counts
    differ (DDP then hangs); raises a one-line ValueError with both numbers and the two fixes."""
    readers = world_size * max(1, workers)
    if num_shards >= readers:
        return
    samples = sum(sizes.values()) if sizes else None
    rewrite = f"--max-count {max(1, samples // readers)}" if samples else "a smaller --max-count"
    raise ValueError(
        f"{num_shards} shards in {spec} are too few for {world_size} ranks x {max(1, workers)} workers = "
        f"{readers} readers: re-write them with `sana-sr shards {rewrite}` (at least {readers} shards), or set "
        f"data.workers={max(1, num_shards // world_size) if num_shards >= world_size else 1} or fewer"
        + ("" if num_shards >= world_size else " and use fewer ranks")
    )


def make_loader(shards: str | os.PathLike | Sequence[str | os.PathLike], config: LoaderConfig | None = None, *,
                degradation: DegradationConfig | None = _DEFAULT, rank: int | None = None,
                world_size: int | None = None, **overrides) -> StreamingLoader:  # fmt: skip
    """A `StreamingLoader` over `shards` (see the module docstring). The per-sample kernels are drawn with the values
    of `degradation` (x4plus by default; None draws none, e.g. for evaluation); `overrides` replace fields of
    `config` (make_loader(spec, batch_size=4))."""
    config = replace(config or LoaderConfig(), **overrides)
    if degradation is _DEFAULT:
        degradation = DegradationConfig()
    rank, world_size = world_info(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    urls, sizes = resolve_shards(shards)
    check_readers(shards, len(urls), world_size, config.num_workers, sizes)
    if config.mode == "resampled" and config.epoch_samples is None and sizes is None:
        raise ValueError(f"cannot tell how many samples {shards} holds (no sizes.json for every shard): "
                         "set LoaderConfig.epoch_samples")  # fmt: skip
    dataset = _ShardStream(urls, config, degradation, rank, world_size, sizes)
    loader = StreamingLoader(dataset, sizes)
    if config.mode == "resampled" and len(loader) == 0:
        raise ValueError(f"the shards {shards} hold no samples (their sizes.json counts add up to 0)")
    return loader
