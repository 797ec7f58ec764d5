"""What each loader worker does to the bytes of one shard: read samples, decode, crop, draw kernels, batch.

Bad input never stops a worker. Each bad sample is counted once and logged (the first few, then at most one line
per interval), and the count since the previous batch rides on the next batch as `"skipped"`:
- a sample whose image is missing, empty (0 bytes), undecodable, or smaller than the crop;
- a sample without a prompt embedding when embeddings are asked for, or with one of another width (or shape);
- a shard that breaks while being read (truncated or corrupt tar), or cannot be opened at all: every sample of it
  that was not delivered is counted when its size is known (sizes.json), else the one being read (or one for the
  unopenable shard).
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from webdataset import gopen
from webdataset.tariterators import base_plus_ext

from sana_sr.data.kernels import KernelDrawConfig, draw_kernels
from sana_sr.images import EXTENSIONS

log = logging.getLogger("sana_sr.data")

IMAGE_EXTENSIONS = tuple(suffix[1:] for suffix in EXTENSIONS)  # shard member names: the one list of suffixes
_EXIF_ORIENTATION = 0x0112


class DataStreamError(RuntimeError):
    """A training stream that cannot go on (nothing but bad samples, a stuck worker, an epoch cut short); the
    message is one line naming the reason and the shards."""


def shard_names(urls: Iterable[str]) -> str:
    shown = sorted(set(urls))
    return ", ".join(shown[:3]) + (f" (and {len(shown) - 3} more)" if len(shown) > 3 else "")


class SkipCounter:
    """Counts bad samples in one worker and rate-limits the warnings about them."""

    def __init__(self, warn_first: int = 3, warn_interval_s: float = 60.0, where: str = ""):
        self.warn_first = warn_first
        self.warn_interval_s = warn_interval_s
        self.where = where
        self.pending = 0
        self.total = 0
        self.last_reason = ""
        """Why the latest bad sample was bad (for the message when a stream has nothing but bad samples)."""
        self._unlogged = 0
        self._last_log = 0.0

    def bad(self, reason: str, key: str, url: str, count: int = 1) -> None:
        self.pending += count
        self.total += count
        self.last_reason = reason
        now = time.monotonic()
        if self.total <= self.warn_first or now - self._last_log >= self.warn_interval_s:
            more = f" (+{self._unlogged} more since the last message)" if self._unlogged else ""
            log.warning("skipped bad sample %s in %s: %s [%d skipped so far%s%s]",
                        key, url, reason, self.total, self.where, more)  # fmt: skip
            self._last_log, self._unlogged = now, 0
        else:
            self._unlogged += 1

    def take(self) -> int:
        """Bad samples since the last call."""
        pending, self.pending = self.pending, 0
        return pending


def open_shard(url: str) -> BinaryIO:
    """A binary stream of a shard. `hf://` goes through huggingface_hub in this process: webdataset's own handler
    runs curl with the hub token in its argv, where every local user can read it (`ps`)."""
    if url.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        return HfFileSystem().open(url, "rb")
    return gopen(url, "rb")


def read_shard(url: str, counter: SkipCounter, expected: int | None = None) -> Iterator[dict]:
    """Samples of one tar shard (local path, or any URL webdataset's gopen opens, `pipe:` included) as dicts
    {"__key__", "__url__", ext: bytes}. Consecutive members with the same key form a sample (webdataset's rule).
    `expected`: the shard's sample count when known, so that samples lost to a broken shard are counted exactly."""
    try:
        stream = open_shard(url)
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except Exception as e:  # noqa: BLE001 - any failure to open is reported, the worker goes on
        counter.bad(f"cannot open the shard ({type(e).__name__}: {e})", "(all of it)", url, count=expected or 1)
        return
    current: dict | None = None  # the sample being assembled
    reading: str | None = None  # the key of the member being read
    delivered = 0
    try:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None or key.startswith("__"):
                continue
            if current is not None and current["__key__"] != key:
                yield current
                delivered += 1
                current = None
            reading = key
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} truncated: {len(data)} of {member.size} bytes")
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = data
            reading = None
        if current is not None:
            yield current
    except Exception as e:  # noqa: BLE001 - a broken shard must not stop training
        # The sample being read (or assembled, its last member unknown) is lost, and so is what follows in the
        # shard: all of it is counted when the shard's size is known, else the one sample.
        lost = reading if reading is not None else (current["__key__"] if current is not None else None)
        reason = f"shard breaks here, rest of it lost ({type(e).__name__}: {e})"
        count = max(expected - delivered, 0) if expected is not None else 0
        count = max(count, 1 if lost is not None else 0)
        if count:
            counter.bad(reason, lost or "(the rest)", url, count=count)
        else:
            log.warning("shard %s: %s", url, reason)
    finally:
        try:
            tar.close()
            stream.close()
        except Exception as e:  # noqa: BLE001 - e.g. a `pipe:` command that exited non-zero
            log.warning("closing shard %s: %s", url, e)


@dataclass
class DecodeSettings:
    """What `decode_sample` needs (taken from LoaderConfig)."""

    crop_size: int
    hflip: bool
    vflip: bool
    prompt_embeds: bool
    prompt_length: int | None
    prompt_dim: int | None = None
    """Embedding width every sample must have (the model's); None: the first good sample's (then fixed)."""


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's convert("RGB") clips 16-bit grey to 255; scale it instead.
        grey = (np.asarray(im).astype(np.float32) / 257.0).round().clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # convert("RGB") of an RGB image is a copy


def decode_sample(sample: dict, settings: DecodeSettings, rng: np.random.Generator, counter: SkipCounter,
                  kernel_config: KernelDrawConfig | None) -> dict | None:  # fmt: skip
    """A raw sample -> {"hq": uint8 numpy (S, S, 3), "key", "caption", [kernels], [prompt_embeds, prompt_mask]};
    None (counted) when it is bad."""
    key, url = sample["__key__"], sample["__url__"]
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        counter.bad(f"no image member (members: {sorted(k for k in sample if not k.startswith('__'))})", key, url)
        return None
    data = sample[ext]
    if len(data) == 0:
        counter.bad(f"empty image member {key}.{ext} (0 bytes)", key, url)
        return None
    size = settings.crop_size
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)
            width, height = im.size
            if width < size or height < size:
                counter.bad(f"image {width}x{height} is smaller than the {size}x{size} crop", key, url)
                return None
            top = int(rng.integers(0, height - size + 1))
            left = int(rng.integers(0, width - size + 1))
            im.load()
            crop = _to_rgb_array(im.crop((left, top, left + size, top + size)))
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad bytes
        counter.bad(f"undecodable image ({type(e).__name__}: {e})", key, url)
        return None
    if settings.hflip and rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    if settings.vflip and rng.uniform() < 0.5:
        crop = crop[::-1]
    out = {
        "hq": crop,  # (S, S, 3) as decoded: collate's stack makes the one copy, into the (B, 3, S, S) batch
        "key": key,
        "caption": sample["txt"].decode("utf-8", errors="replace").strip() if "txt" in sample else "",
    }
    if settings.prompt_embeds:
        embeds = _prompt_embeds(sample, settings.prompt_length, settings.prompt_dim)
        if isinstance(embeds, str):
            counter.bad(embeds, key, url)
            return None
        out["prompt_embeds"], out["prompt_mask"] = embeds
        settings.prompt_dim = embeds[0].shape[1]  # one width per stream: a batch of mixed widths cannot stack
    if kernel_config is not None:
        out.update({name: torch.from_numpy(k) for name, k in draw_kernels(rng, kernel_config).items()})
    return out


def decode_stream(raw: Iterable[dict], settings: DecodeSettings, rng: np.random.Generator, counter: SkipCounter,
                  kernel_config: KernelDrawConfig | None, max_bad_in_a_row: int | None) -> Iterator[dict]:
    """`decode_sample` over a stream; DataStreamError after `max_bad_in_a_row` bad samples in a row (None: never)."""
    bad_urls: list[str] = []  # of the current run of bad samples
    for sample in raw:
        decoded = decode_sample(sample, settings, rng, counter, kernel_config)
        if decoded is not None:
            bad_urls.clear()
            yield decoded
            continue
        bad_urls.append(sample["__url__"])
        if max_bad_in_a_row is not None and len(bad_urls) >= max_bad_in_a_row:
            raise DataStreamError(f"{len(bad_urls)} samples in a row were unusable (LoaderConfig.max_bad_in_a_row), "
                                  f"the last because: {counter.last_reason}; shards: {shard_names(bad_urls)}")


def _prompt_embeds(sample: dict, length: int | None, dim: int | None) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(embeds (L, D) float32, mask (L,)) from the sample's emb.npy [+ mask.npy], padded/cut to `length`, D == `dim`
    when given; or the reason."""
    if "emb.npy" not in sample:
        return "no prompt embedding (emb.npy member) but LoaderConfig.prompt_embeds is on"
    try:
        embeds = torch.from_numpy(np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)).to(torch.float32)
        if "mask.npy" in sample:
            mask = torch.from_numpy(np.load(io.BytesIO(sample["mask.npy"]), allow_pickle=False)).to(torch.int64)
        else:
            mask = torch.ones(embeds.shape[0], dtype=torch.int64)
    except Exception as e:  # noqa: BLE001
        return f"unreadable prompt embedding ({type(e).__name__}: {e})"
    if embeds.dim() != 2 or mask.shape != embeds.shape[:1]:
        return f"prompt embedding of shape {tuple(embeds.shape)} with mask {tuple(mask.shape)}: want (L, D) and (L,)"
    if embeds.shape[0] == 0 or (dim is not None and embeds.shape[1] != dim):
        return f"prompt embedding of shape {tuple(embeds.shape)}: want (L >= 1, {dim or 'D'})"
    if length is not None:
        embeds, mask = _fit_length(embeds, mask, length)
    return embeds, mask


def _fit_length(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    if embeds.shape[0] >= length:
        return embeds[:length], mask[:length]
    pad = length - embeds.shape[0]
    return (torch.cat([embeds, embeds.new_zeros(pad, embeds.shape[1])]),
            torch.cat([mask, mask.new_zeros(pad)]))  # fmt: skip


def collate(samples: list[dict], skipped: int) -> dict:
    """Stack decoded samples into a batch; "skipped" is the number of bad samples met since the previous batch."""
    batch: dict = {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples]}
    # numpy's stack: torch's uint8 copy is ~100x slower with two threads on a busy machine (measured).
    if samples:
        batch["hq"] = torch.from_numpy(np.stack([s["hq"].transpose(2, 0, 1) for s in samples]))
    for name in ("kernel1", "kernel2", "sinc_kernel"):
        if samples and name in samples[0]:
            batch[name] = torch.from_numpy(np.stack([s[name].numpy() for s in samples]))
    if samples and "prompt_embeds" in samples[0]:
        longest = max(s["prompt_embeds"].shape[0] for s in samples)
        fitted = [_fit_length(s["prompt_embeds"], s["prompt_mask"], longest) for s in samples]
        batch["prompt_embeds"] = torch.stack([e for e, _ in fitted])
        batch["prompt_mask"] = torch.stack([m for _, m in fitted])
    batch["skipped"] = skipped
    return batch


def batches(samples: Iterable[dict], batch_size: int, counter: SkipCounter, partial: bool) -> Iterator[dict]:
    """Group decoded samples into batches. One batch is held back so that bad samples met after the last full
    batch still reach the trainer: they ride on the last batch (or on an empty one if no batch came at all)."""
    held: dict | None = None
    group: list[dict] = []
    for sample in samples:
        group.append(sample)
        if len(group) == batch_size:
            if held is not None:
                yield held
            held, group = collate(group, counter.take()), []
    if partial and group:
        if held is not None:
            yield held
        held = collate(group, counter.take())
    if held is None:
        if counter.pending:
            yield collate([], counter.take())
        return
    held["skipped"] += counter.take()
    yield held
