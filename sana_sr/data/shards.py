"""`sana-sr shards` / `python data/make_shards.py`: image folder trees -> webdataset tar shards.

    sana-sr shards /data/LSDIR/HR /data/FFHQ/images1024x1024 -o /data/shards --max-count 1000 --workers 16

Each sample is `KEY.EXT` (the original encoded bytes, or re-encoded with --reencode), `KEY.json` (source path, size,
format), `KEY.txt` when there is a caption (sidecar `<image>.txt`, or --captions map.json|map.csv) and `KEY.emb.npy`
[+ `KEY.mask.npy`] with --embeddings. The output folder gets the shards, `sizes.json` ({shard: samples}, what the
loader reads) and `manifest.json` (options, per-shard samples/bytes/sha256, and every skipped file with its reason).

Order: files sorted by path, then shuffled with --seed, then dealt into shards of at most --max-count samples and
about --max-bytes of input; so the output is a function of the inputs, the options and the seed. Each shard is
written to a temporary name and renamed, with a record in `.progress/`; a re-run skips every shard whose inputs and
options are unchanged, so an interrupted job resumes where it stopped. Unreadable, corrupt and too-small files
are skipped and listed; an input without a single usable image is an error.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import io
import json
import os
import random
import sys
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sana_sr.atomic import atomic_file
from sana_sr.data.shard_output import MANIFEST_FORMAT, HashingFile, add_member, claim_output
from sana_sr.data.sources import (
    SourceError,
    SourceImage,
    attach_captions,
    attach_embeddings,
    discover,
    load_caption_map,
    read_input,
)
from sana_sr.images import FORMATS as IMAGE_FORMATS
from sana_sr.images import decode_errors

FORMATS = {fmt: suffix[1:] for fmt, suffix in IMAGE_FORMATS.items()}  # PIL format -> shard member extension
REENCODE = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass
class ShardOptions:
    """How a folder tree becomes shards."""

    max_count: int = 1000
    """Most samples per shard."""
    max_bytes: int = 1 << 30
    """A shard is closed before its input files would pass this many bytes (one larger file gets its own shard)."""
    min_size: int = 512
    """Images whose shorter side is below this (the training crop) are skipped; 0 keeps every size."""
    reencode: str | None = None
    """None stores the original bytes; "jpg", "png" or "webp" re-encodes (EXIF orientation applied, RGB)."""
    quality: int = 95
    """JPEG/WebP quality when re-encoding."""
    seed: int = 0
    """Seed of the sample order (the same seed and inputs give byte-identical shards)."""
    workers: int = field(default_factory=lambda: max(1, min(16, os.cpu_count() or 1)))
    """Processes writing shards in parallel (1: in this process)."""
    prefix: str = "shard"
    """Shard file names: PREFIX-000000.tar, ..."""
    captions: str | None = None
    """A caption map (.json {name: caption} or [{path, caption}], or .csv); overrides sidecar .txt files."""
    embeddings: str | None = None
    """Folder of prompt embeddings laid out as the images (<rel path minus suffix>.npy/.npz); every image needs one."""
    progress: bool = True
    """Show a progress bar."""
    max_file_bytes: int = 1 << 30
    """Input files larger than this are skipped unread."""
    max_pixels: int = 100_000_000
    """Images with more pixels are skipped undecoded (decompression bombs)."""


class ShardError(Exception):
    """A shard job that cannot produce anything useful; `str()` is the one-line reason."""


class _Skip(Exception):
    """One input file that cannot become a sample; `str()` is the reason."""


def _encoded_image(image: SourceImage, options: ShardOptions) -> tuple[str, bytes, dict]:
    """(extension, bytes, meta) of a usable image, or _Skip with the reason."""
    try:
        data = read_input(image.path, options.max_file_bytes)
    except SourceError as e:
        raise _Skip(str(e)) from None
    if not data:
        raise _Skip("empty file (0 bytes)")
    with decode_errors(_Skip):
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in FORMATS:
                raise _Skip(f"unsupported format {im.format} (supported: {', '.join(FORMATS)})")
            width, height = im.size
            if min(width, height) < options.min_size:
                raise _Skip(f"smaller than the training crop: {width}x{height}, shorter side < {options.min_size}")
            if width * height > options.max_pixels:
                raise _Skip(f"too many pixels: {width}x{height} > {options.max_pixels} (--max-pixels)")
            im.load()  # a full decode: truncation and corrupt data show up only here
            fmt = im.format
            if options.reencode:
                im = ImageOps.exif_transpose(im).convert("RGB")
                out = io.BytesIO()
                im.save(out, format=REENCODE[options.reencode], quality=options.quality)
                data, fmt = out.getvalue(), REENCODE[options.reencode]
    return FORMATS[fmt], data, {"path": image.rel, "width": width, "height": height, "format": fmt}


def _embedding_members(path: str) -> list[tuple[str, bytes]]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if "prompt_embeds" not in loaded:
                    raise _Skip(f"prompt embedding {path} has no 'prompt_embeds' array (has {list(loaded)})")
                embeds = loaded["prompt_embeds"]
                mask = loaded["prompt_mask"] if "prompt_mask" in loaded else None
        else:
            embeds, mask = loaded, None
    except _Skip:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises several types for bad files
        raise _Skip(f"unreadable prompt embedding {path}: {e}") from None
    if embeds.ndim != 2 or (mask is not None and mask.shape != embeds.shape[:1]):
        raise _Skip(f"prompt embedding {path} has shape {embeds.shape}: want (tokens, dim) and a (tokens,) mask")
    members = []
    for name, array in (("emb.npy", embeds), ("mask.npy", mask)):
        if array is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
            members.append((name, buffer.getvalue()))
    return members


def write_shard(name: str, images: list[SourceImage], out: str, options: ShardOptions) -> dict:
    """Write one shard (atomically) and return its record: samples, bytes, sha256, skipped [{path, reason}]."""
    skipped, samples = [], 0
    target = Path(out) / name
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as raw:
            hashing = HashingFile(raw)
            with tarfile.open(fileobj=hashing, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for image in images:
                    try:
                        ext, data, meta = _encoded_image(image, options)
                        extra = []
                        if options.embeddings:
                            if image.embedding is None:
                                raise _Skip(f"no prompt embedding in {options.embeddings}")
                            extra = _embedding_members(image.embedding)
                    except _Skip as e:
                        skipped.append({"path": image.path, "reason": str(e)})
                        continue
                    add_member(tar, f"{image.key}.{ext}", data)
                    if image.caption is not None:
                        add_member(tar, f"{image.key}.txt", image.caption.encode("utf-8"))
                    add_member(tar, f"{image.key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                    for member, payload in extra:
                        add_member(tar, f"{image.key}.{member}", payload)
                    samples += 1
        if samples == 0:
            raise _EmptyShard(skipped)
    return {"samples": samples, "bytes": hashing.size, "sha256": hashing.sha256.hexdigest(), "skipped": skipped}


class _EmptyShard(Exception):
    """Every input of a shard was skipped: no tar is left behind (atomic_file deletes it)."""

    def __init__(self, skipped: list[dict]):
        super().__init__("empty shard")
        self.skipped = skipped


def _write_or_empty(name: str, images: list[SourceImage], out: str, options: ShardOptions) -> dict:
    try:
        return write_shard(name, images, out, options)
    except _EmptyShard as e:
        (Path(out) / name).unlink(missing_ok=True)  # an older version of this shard must not linger
        return {"samples": 0, "bytes": 0, "sha256": None, "skipped": e.skipped}


def plan_shards(images: list[SourceImage], options: ShardOptions) -> list[tuple[str, list[SourceImage]]]:
    """Shuffle with the seed, then deal into shards by count and input bytes."""
    order = list(images)
    random.Random(options.seed).shuffle(order)
    shards: list[list[SourceImage]] = [[]]
    size = 0
    for image in order:
        full = len(shards[-1]) >= options.max_count or (shards[-1] and size + max(0, image.size) > options.max_bytes)
        if full:
            shards.append([])
            size = 0
        shards[-1].append(image)
        size += max(0, image.size)
    return [(f"{options.prefix}-{i:06d}.tar", files) for i, files in enumerate(shards) if files]


def _signature(files: list[SourceImage], options: ShardOptions) -> str:
    relevant = {k: v for k, v in asdict(options).items()
                if k in ("min_size", "reencode", "quality", "embeddings", "max_file_bytes", "max_pixels")}
    payload = json.dumps([relevant, [asdict(f) for f in files]], sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _finished(out: Path, name: str, signature: str) -> dict | None:
    record_path = out / ".progress" / f"{name}.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("signature") != signature:
        return None
    if record["samples"] and (not (out / name).is_file() or (out / name).stat().st_size != record["bytes"]):
        return None
    return record


def write_shards(inputs: list[str | os.PathLike], out: str | os.PathLike, options: ShardOptions | None = None) -> dict:
    """Write the shards of `inputs` into `out`; returns the manifest. Raises ShardError when nothing is usable."""
    options = options or ShardOptions()
    if options.reencode is not None and options.reencode not in REENCODE:
        raise ShardError(f"--reencode must be one of {', '.join(REENCODE)}, got {options.reencode!r}")
    limits = dict(max_count=options.max_count, max_bytes=options.max_bytes, max_file_bytes=options.max_file_bytes,
                  max_pixels=options.max_pixels)
    if min(limits.values()) < 1:
        raise ShardError(", ".join(f"--{k.replace('_', '-')} {v}" for k, v in limits.items()) + ": each must be >= 1")
    out = Path(out)
    try:
        found = discover(inputs)
        attach_captions(found, load_caption_map(options.captions) if options.captions else None)
        if options.embeddings:
            attach_embeddings(found, options.embeddings)
    except SourceError as e:
        raise ShardError(str(e)) from None
    if not found.images:
        raise ShardError(f"no image files ({', '.join(sorted(FORMATS.values()))}) under {', '.join(map(str, inputs))}")
    claim_output(out, inputs, ShardError)
    for stale in out.glob(f".{options.prefix}-*.tmp-*"):  # left by a killed run (atomic_file cleans up otherwise)
        stale.unlink(missing_ok=True)
    plan = plan_shards(found.images, options)
    records: dict[str, dict] = {}
    todo = []
    for name, files in plan:
        signature = _signature(files, options)
        done = _finished(out, name, signature)
        if done is not None:
            records[name] = done
        else:
            todo.append((name, files, signature))
    pending = sum(len(files) for _, files, _ in todo)
    _run(todo, out, options, records, total=len(found.images), already=len(found.images) - pending)
    return _manifest(inputs, out, options, plan, records, found)


def _run(todo: list, out: Path, options: ShardOptions, records: dict, total: int, already: int) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=already, unit="img", desc="shards", disable=not options.progress)

    def finish(name: str, files: list, signature: str, record: dict) -> None:
        record = {**record, "signature": signature}
        with atomic_file(out / ".progress" / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(record))
        records[name] = record
        bar.update(len(files))

    try:
        if options.workers <= 1:
            for name, files, signature in todo:
                finish(name, files, signature, _write_or_empty(name, files, str(out), options))
            return
        with cf.ProcessPoolExecutor(max_workers=options.workers) as pool:
            futures = {pool.submit(_write_or_empty, name, files, str(out), options): (name, files, signature)
                       for name, files, signature in todo}  # fmt: skip
            for future in cf.as_completed(futures):
                finish(*futures[future], future.result())
    finally:
        bar.close()


def _manifest(inputs, out: Path, options: ShardOptions, plan, records: dict, found) -> dict:
    shards = [{"name": name, **{k: records[name][k] for k in ("samples", "bytes", "sha256")}}
              for name, _ in plan if records[name]["samples"] > 0]  # fmt: skip
    skipped = [s for name, _ in plan for s in records[name]["skipped"]]
    reasons = Counter(s["reason"].split(":")[0] for s in skipped)
    manifest = {
        "format": MANIFEST_FORMAT,
        "inputs": [str(Path(p).absolute()) for p in inputs],
        "options": {k: v for k, v in asdict(options).items() if k not in ("workers", "progress")},
        "num_samples": sum(s["samples"] for s in shards),
        "num_shards": len(shards),
        "num_skipped": len(skipped),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "ignored_other_files": found.ignored,
        "captions": sum(1 for _, files in plan for f in files if f.caption is not None),
        "captions_unmatched": found.captions_unmatched,
        "shards": shards,
        "skipped": skipped,
    }
    with atomic_file(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    if manifest["num_samples"] == 0:
        top = ", ".join(f"{n} {r}" for r, n in reasons.most_common(3))
        raise ShardError(f"no usable image among {len(skipped)} files under {', '.join(map(str, inputs))} ({top}); "
                         f"every file and its reason is in {out / 'manifest.json'}")  # fmt: skip
    with atomic_file(out / "sizes.json") as tmp:
        tmp.write_text(json.dumps({s["name"]: s["samples"] for s in shards}, indent=1))
    planned = {name for name, _ in plan}
    stale = sorted(p.name for p in out.glob(f"{options.prefix}-*.tar") if p.name not in planned)
    if stale:
        print(f"note: {len(stale)} older shards in {out} are not part of this set (e.g. {stale[0]}); sizes.json "
              "lists the current ones", file=sys.stderr)  # fmt: skip
    return manifest


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G, 1000000)") from None


def main(argv: list[str] | None = None) -> int:
    defaults = ShardOptions()
    parser = argparse.ArgumentParser(prog="sana-sr shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="image folders (searched recursively) or files")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--max-count", type=int, default=defaults.max_count, help="most samples per shard")
    parser.add_argument("--max-bytes", type=_bytes, default=defaults.max_bytes, help="target shard size (e.g. 1G)")
    parser.add_argument("--min-size", type=int, default=defaults.min_size,
                        help="skip images whose shorter side is smaller (the training crop; 0: keep all)")
    parser.add_argument("--reencode", choices=sorted(REENCODE), help="re-encode instead of storing the original bytes")
    parser.add_argument("--quality", type=int, default=defaults.quality, help="quality when re-encoding")
    parser.add_argument("--captions", help="caption map: .json {name: caption} or .csv (path, caption)")
    parser.add_argument("--embeddings", help="folder of prompt embeddings laid out as the images (.npy/.npz)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the sample order")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="parallel shard writers")
    parser.add_argument("--prefix", default=defaults.prefix, help="shard name prefix")
    parser.add_argument("--max-file-bytes", type=_bytes, default=defaults.max_file_bytes,
                        help="skip input files larger than this, unread (default 1G)")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="skip images with more pixels than this, undecoded (default 100000000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    options = ShardOptions(
        max_count=args.max_count, max_bytes=args.max_bytes, min_size=args.min_size, reencode=args.reencode,
        quality=args.quality, seed=args.seed, workers=args.workers, prefix=args.prefix, captions=args.captions,
        embeddings=args.embeddings, progress=not args.no_progress, max_file_bytes=args.max_file_bytes,
        max_pixels=args.max_pixels,
    )  # fmt: skip
    try:
        manifest = write_shards(args.inputs, args.out, options)
    except ShardError as e:
        print(f"sana-sr shards: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sana-sr shards: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    except cf.BrokenExecutor as e:  # a writer process died (killed, or a decoder crashed it): finished shards stay
        print(f"sana-sr shards: a shard writer process died ({e}); rerun to resume", file=sys.stderr)
        return 1
    print(f"{manifest['num_samples']} samples in {manifest['num_shards']} shards in {args.out} "
          f"({manifest['num_skipped']} files skipped, listed in manifest.json)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
