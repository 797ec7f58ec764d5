"""`sana-sr embed-captions SHARDS -o OUT --model MODEL`: existing shards -> the same shards with each sample's caption
embedded by the text encoder (Gemma-2 for the real presets), so that training need not run the 2B encoder.

    sana-sr embed-captions /data/lsdir-shards -o /data/lsdir-shards-emb --model sana-0.6b --workers 4
    srun --ntasks=16 sana-sr embed-captions ... --device cuda       # RANK/WORLD_SIZE (or SLURM_PROCID/NTASKS) split

Every member of every sample is copied unchanged and `KEY.emb.npy` is added: the encoder's last hidden state for the
sample's `.txt` caption (the empty prompt when it has none, which is exactly the null prompt a pipeline stores),
SANA's encoding (sana_sr.model.text.encode_prompts), the valid tokens only (the loader pads to
`data.prompt_length` with a zero mask; right padding under a causal encoder leaves the valid tokens unchanged).
Training reads them with `data.prompt_embeds=true data.prompt_length=300`.

Resumable: each shard is written to a temporary name and renamed, with a record in `OUT/.progress/`; a re-run skips
every shard whose input, model and options are unchanged. Parallel: `--workers N` local processes (each loads the
encoder), and a launcher's RANK/WORLD_SIZE (torchrun, accelerate launch) or SLURM_PROCID/SLURM_NTASKS deal the
shards to the processes of several nodes; whichever process finds every shard done writes sizes.json and
manifest.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from sana_sr.atomic import atomic_file
from sana_sr.data.shard_output import HashingFile, add_member
from sana_sr.data.streaming import resolve_shards

EMBED_DTYPES = {"fp16": np.float16, "fp32": np.float32}
_encoder = None  # (tokenizer, encoder, settings) of this worker process


class EmbedError(Exception):
    """A job that cannot run; `str()` is the one-line reason."""


def _load(model: str, device: str, threads: int):
    from sana_sr.model.loading import load_text_encoder

    torch.set_num_threads(threads)
    encoder, tokenizer = load_text_encoder(model)
    return tokenizer, encoder.to(device).eval()


def _init_worker(model: str, device: str, threads: int) -> None:
    global _encoder
    _encoder = _load(model, device, threads)


def _samples(path: Path) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """[(key, [(member name, bytes), ...])] in tar order; emb/mask members from an earlier embedding are dropped."""
    from webdataset.tariterators import base_plus_ext

    out: list[tuple[str, list[tuple[str, bytes]]]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = base_plus_ext(info.name)
            if key is None or ext in ("emb.npy", "mask.npy"):
                continue
            if not out or out[-1][0] != key:
                out.append((key, []))
            out[-1][1].append((info.name, tar.extractfile(info).read()))
    return out


def _caption(members: list[tuple[str, bytes]]) -> str:
    for name, data in members:
        if name.endswith(".txt"):
            return data.decode("utf-8", errors="replace").strip()
    return ""


def embed_shard(source: str, target: str, max_length: int, batch_size: int, dtype: str) -> dict:
    """Write `target`: `source` with an emb.npy per sample. Runs in a worker that holds the encoder."""
    from sana_sr.model.text import encode_prompts

    tokenizer, encoder = _encoder
    samples = _samples(Path(source))
    arrays: list[np.ndarray] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        embeds, mask = encode_prompts(tokenizer, encoder, [_caption(m) for _, m in chunk], max_length)
        for row, valid in zip(embeds.float().cpu(), mask.bool().cpu()):
            array = row[valid].numpy().astype(EMBED_DTYPES[dtype])
            if not np.isfinite(array).all():
                raise EmbedError(f"caption embedding in {source} is not finite as {dtype}: use --dtype fp32")
            arrays.append(array)
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as raw:
            hashing = HashingFile(raw)
            with tarfile.open(fileobj=hashing, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for (key, members), array in zip(samples, arrays, strict=True):
                    for name, data in members:
                        add_member(tar, name, data)
                    buffer = io.BytesIO()
                    np.save(buffer, array, allow_pickle=False)
                    add_member(tar, f"{key}.emb.npy", buffer.getvalue())
    return {"samples": len(samples), "bytes": hashing.size, "sha256": hashing.sha256.hexdigest()}


def _signature(source: Path, options: dict) -> str:
    st = source.stat()
    payload = json.dumps([options, source.name, st.st_size, st.st_mtime_ns], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _record(out: Path, name: str) -> dict | None:
    try:
        return json.loads((out / ".progress" / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _process_slice() -> tuple[int, int]:
    """(index, count) of this process among the launcher's processes (one when not launched)."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def embed_captions(shards: str, out: str | Path, model: str, *, max_length: int = 300, batch_size: int = 16,
                   dtype: str = "fp16", workers: int = 1, device: str = "cpu") -> dict:
    """Embed this process's share of `shards` into `out`; returns {"written", "skipped", "complete"}."""
    if dtype not in EMBED_DTYPES:
        raise EmbedError(f"--dtype must be one of {', '.join(EMBED_DTYPES)}, got {dtype!r}")
    try:
        urls, sizes = resolve_shards(shards)
    except (OSError, ValueError) as e:
        raise EmbedError(str(e)) from None
    if sizes is None or any("://" in u or u.startswith("pipe:") for u in urls):
        raise EmbedError(f"{shards}: want local shards with a sizes.json (written by `sana-sr shards`)")
    out = Path(out)
    sources = [Path(u) for u in urls]
    if len({s.name for s in sources}) != len(sources):
        raise EmbedError(f"{shards}: shard file names repeat; embed each shard folder on its own")
    if any(s.parent.resolve() == out.resolve() for s in sources):
        raise EmbedError(f"-o {out} is the input folder: write the embedded shards to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    options = {"model": model, "max_length": max_length, "dtype": dtype}
    index, count = _process_slice()
    todo = []
    for source in sources[index::count]:
        signature = _signature(source, options)
        done = _record(out, source.name)
        if not (done and done["signature"] == signature and (out / source.name).is_file()):
            todo.append((source, signature))

    def finish(source: Path, signature: str, record: dict) -> None:
        with atomic_file(out / ".progress" / f"{source.name}.json") as tmp:
            tmp.write_text(json.dumps({**record, "signature": signature, "source": str(source)}))

    jobs = [(str(s), str(out / s.name), max_length, batch_size, dtype) for s, _ in todo]
    threads = max(1, (os.cpu_count() or 1) // max(1, workers)) if device == "cpu" else 1
    if todo and workers <= 1:
        _init_worker(model, device, threads)
        for (source, signature), job in zip(todo, jobs):
            finish(source, signature, embed_shard(*job))
    elif todo:
        context = multiprocessing.get_context("spawn")  # torch and a loaded encoder do not survive fork well
        with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                    initargs=(model, device, threads)) as pool:
            futures = {pool.submit(embed_shard, *job): item for job, item in zip(jobs, todo)}
            for future in cf.as_completed(futures):
                finish(*futures[future], future.result())
    complete = _write_index(out, sources, sizes, options)
    return {"written": len(todo), "skipped": len(sources[index::count]) - len(todo), "complete": complete}


def _write_index(out: Path, sources: list[Path], sizes: dict[str, int], options: dict) -> bool:
    """sizes.json and manifest.json once every shard has its record (whichever process sees that writes them)."""
    records = {s.name: _record(out, s.name) for s in sources}
    if any(r is None or not (out / name).is_file() for name, r in records.items()):
        return False
    for source in sources:
        if records[source.name]["samples"] != sizes[str(source)]:
            raise EmbedError(f"{source} holds {records[source.name]['samples']} samples but its sizes.json says "
                             f"{sizes[str(source)]}: re-write the shards with `sana-sr shards`")
    with atomic_file(out / "sizes.json") as tmp:
        tmp.write_text(json.dumps({name: r["samples"] for name, r in records.items()}, indent=1))
    manifest = {"format": "sana-sr caption embeddings 1", "options": options,
                "num_samples": sum(r["samples"] for r in records.values()), "num_shards": len(records),
                "shards": [{"name": n, **{k: r[k] for k in ("samples", "bytes", "sha256", "source")}}
                           for n, r in records.items()]}
    with atomic_file(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sana-sr embed-captions", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="a shard folder written by `sana-sr shards` (or its sizes.json)")
    parser.add_argument("-o", "--out", required=True, help="output folder for the embedded shards")
    parser.add_argument("--model", required=True,
                        help="a preset (its text encoder from the hub), or a folder / hub id with text_encoder/ and "
                             "tokenizer/ (a SANA pipeline repo or a saved SANA-SR pipeline)")
    parser.add_argument("--max-length", type=int, default=300, help="prompt tokens (SANA: 300; the tiny preset: 32)")
    parser.add_argument("--batch-size", type=int, default=16, help="captions per encoder call")
    parser.add_argument("--dtype", choices=tuple(EMBED_DTYPES), default="fp16", help="stored precision")
    parser.add_argument("--workers", type=int, default=1, help="local processes, each with its own encoder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (with a launcher: cuda:LOCAL_RANK)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        result = embed_captions(args.shards, args.out, args.model, max_length=args.max_length,
                                batch_size=args.batch_size, dtype=args.dtype, workers=args.workers, device=device)
    except EmbedError as e:
        print(f"sana-sr embed-captions: {e}", file=sys.stderr)
        return 1
    state = "all shards done" if result["complete"] else "other processes' shards still pending"
    print(f"{result['written']} shards embedded, {result['skipped']} already done, in {args.out} ({state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
