"""Distributed evaluation: shard the images over the processes, score each exactly once, gather on the main one.

Image i goes to process i mod world_size. Every process runs the same number of steps (the last one may hold no
image) and after each step all of them exchange their rows (and the PNG bytes of their SR images) with one
`gather_object`, so the main process writes results as they come and the collectives never fall out of step.
A bad image becomes a row with the reason, not an exception that would leave the other processes waiting.
"""

from __future__ import annotations

import io
import math
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sana_sr.atomic import atomic_directory, atomic_file, check_output, mark
from sana_sr.distributed import DistConfig, build_accelerator
from sana_sr.dtypes import DTYPES
from sana_sr.evaluation import results
from sana_sr.evaluation.datasets import Dataset, DatasetError, find_layout, lr_only_dataset, paired_dataset
from sana_sr.evaluation.metrics import MetricSuite, parse_metrics, to_8bit_levels
from sana_sr.images import ImageError, load_image

OWNER = "sana-sr evaluate"


@dataclass
class EvalConfig:
    """One evaluation run. Give the data as `root`, as `hr` + `lr`, as `lr` alone, or as `div2k_gt`."""

    output: Path
    """Folder for per_image.csv, summary.json, results.md, grids/ and sr/."""
    model: str = "tiny-sr"
    """Saved pipeline folder, hub id, a shipped model (`tiny-sr`, the default) or `PRESET-random` (random weights)."""
    root: Path | None = None
    """Dataset folder holding an HR/LR pair of sub-folders (test_HR/test_LR, HR/LR, GT/LQ)."""
    hr: Path | None = None
    """HR (ground-truth) folder; needs `lr`."""
    lr: Path | None = None
    """LR (input) folder; alone, only the no-reference metrics apply."""
    div2k_gt: Path | None = None
    """DIV2K-Val GT crops: their LQ is generated once by the Real-ESRGAN degradation and cached in `cache`."""
    cache: Path = Path("runs/eval-cache")
    """Where generated DIV2K-Val LQ sets are kept."""
    seed: int = 0
    """Seed of the DIV2K-Val degradation draws."""
    name: str | None = None
    """Dataset name in the reports (default: from the folder)."""
    scale: int | None = None
    """Upscaling factor (default: the model's, 4 for the presets)."""
    crop_border: int | None = None
    """Pixels removed on each side for PSNR/SSIM (default: the scale)."""
    metrics: tuple[str, ...] = ()
    """Metric names (default: all of them; unavailable ones are reported as such)."""
    device: str = "auto"
    """"cpu", "cuda", or "auto" (cuda when present)."""
    dtype: str = "fp32"
    """DiT precision: fp32, bf16 or fp16 (the DC-AE stays fp32)."""
    prompt: str | None = None
    """Text prompt for every image (default: the model's stored prompt embedding)."""
    color_fix: str = "none"
    """none, adain or wavelet."""
    tile: int = 0
    """DiT/AE tile side in output pixels for large inputs; 0 restores each image whole."""
    grids: int = 4
    """How many LQ | SR | HQ grids to write (the first images in name order)."""
    save_images: bool = True
    """Write every SR image to sr/ (FID needs them)."""
    max_images: int | None = None
    """Evaluate only the first N images in name order (smoke runs)."""
    overwrite: bool = False
    """Replace `output` even when another command (or the user) wrote it; by default only an evaluation's own
    output folder is reused."""

    def __post_init__(self) -> None:
        sources = [s for s, v in (("root", self.root), ("hr", self.hr), ("div2k_gt", self.div2k_gt)) if v is not None]
        if len(sources) > 1:
            raise ValueError(f"give one dataset source, got {' and '.join(sources)}")
        if not sources and self.lr is None:
            raise ValueError("no dataset given: pass --root, --hr with --lr, --lr alone, or --div2k-gt")
        if self.hr is not None and self.lr is None:
            raise ValueError("--hr needs --lr (the matching low-resolution inputs)")
        if (self.root is not None or self.div2k_gt is not None) and self.lr is not None:
            raise ValueError("--lr goes with --hr or alone, not with --root or --div2k-gt")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.scale is not None and self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        self.metrics = parse_metrics(self.metrics or "all")


def _accelerator(device: str):
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    # The trainer's set-up: plain DDP (gloo on CPU), one sample per step, no mixed precision (dtypes are ours).
    return build_accelerator(DistConfig(cpu=use_cpu, mixed_precision="no"), accumulation=1, micro_batch=1,
                             grad_clip=0.0)


def _dataset(config: EvalConfig, scale: int, accelerator) -> Dataset:
    if config.div2k_gt is not None:
        from accelerate.utils import broadcast_object_list

        from sana_sr.evaluation.div2k import cache_folder, prepare_lq

        error = [None]
        if accelerator.is_main_process:  # generate once; the others wait at the broadcast
            try:
                prepare_lq(config.div2k_gt, config.cache, scale, config.seed)
            except DatasetError as e:
                error = [str(e)]
        error = broadcast_object_list(error) if accelerator.num_processes > 1 else error
        if error[0]:
            raise DatasetError(error[0])
        lq_dir = cache_folder(config.cache, config.div2k_gt, scale, config.seed)
        return paired_dataset(config.div2k_gt, lq_dir, scale, config.name or "DIV2K-Val")
    if config.root is not None:
        hr, lr = find_layout(config.root)
        return paired_dataset(hr, lr, scale, config.name or Path(config.root).name)
    if config.hr is not None:
        return paired_dataset(config.hr, config.lr, scale, config.name)
    return lr_only_dataset(config.lr, scale, config.name)


def _restore_one(pipe, config: EvalConfig, suite: MetricSuite, sample, scale: int, device) -> tuple[dict, bytes | None]:
    """Restore and score one sample: (row, SR PNG bytes), or a row with the error and no bytes."""
    from sana_sr.model.tiling import TileSettings

    row: dict = {"name": sample.name, "lq": str(sample.lq), "hq": str(sample.hq) if sample.hq else None}
    try:
        lq = load_image(sample.lq).rgb
        tiling = TileSettings(config.tile, config.tile // 4) if config.tile else None
        start = time.perf_counter()
        sr = pipe(torch.from_numpy(lq).permute(2, 0, 1)[None].to(device), upscale=scale, prompt=config.prompt,
                  tiling=tiling, color_fix=config.color_fix)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["seconds"] = round(time.perf_counter() - start, 4)
        sr = to_8bit_levels(sr[0].permute(1, 2, 0).float().cpu().numpy())
        hr = None
        if sample.hq is not None:
            hr = load_image(sample.hq).rgb[: sr.shape[0], : sr.shape[1]].astype(np.float64)
        row["lq_size"] = f"{lq.shape[1]}x{lq.shape[0]}"
        row["sr_size"] = f"{sr.shape[1]}x{sr.shape[0]}"
        values, problems = suite.score(sr, hr)
        row.update(values)
        row["problems"] = "; ".join(problems) or None
        buffer = io.BytesIO()
        Image.fromarray((sr * 255).round().astype(np.uint8)).save(buffer, format="PNG")
        return row, buffer.getvalue()
    except (ImageError, torch.OutOfMemoryError, ValueError) as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row["problems"] = row["error"]
        return row, None


def _agree_on_metrics(suite: MetricSuite, accelerator) -> None:
    """Keep only the metrics every process can compute, so the CSV columns mean the same for all rows."""
    from accelerate.utils import gather_object

    everywhere = gather_object([suite.available])
    for name in suite.available:
        if not all(name in names for names in everywhere):
            suite.drop(name, "its weights are present on some processes only")


def run(config: EvalConfig) -> int:
    """Evaluate; returns 0, or 1 when some images failed. Raises DatasetError / ValueError for bad input."""
    from tqdm import tqdm

    from sana_sr.model.loading import load_pipeline, resolve_model

    started = time.time()
    out = Path(config.output)
    resolve_model(config.model)  # a bare preset name is refused before the output folder is claimed
    check_output(out, OWNER, overwrite=config.overwrite,
                 inputs=[config.model, config.root, config.hr, config.lr, config.div2k_gt])
    # The data are checked before the process group and the (possibly slow) model load whenever the scale is
    # known without the model; DIV2K-Val needs the processes, as only the main one generates its LQ.
    scale = config.scale or _saved_upscale(config.model)
    dataset = _dataset(config, scale, None) if scale and config.div2k_gt is None else None
    accelerator = _accelerator(config.device)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    if dataset is None and scale:
        dataset = _dataset(config, scale, accelerator)
    pipe = load_pipeline(config.model)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if config.dtype != "fp32":
        pipe.transformer.to(DTYPES[config.dtype])
    if dataset is None:
        scale = pipe.config.upscale
        dataset = _dataset(config, scale, accelerator)
    crop_border = scale if config.crop_border is None else config.crop_border
    samples = dataset.samples[: config.max_images] if config.max_images else dataset.samples
    suite = MetricSuite(config.metrics, device, dataset.has_reference, crop_border)
    if world > 1:
        _agree_on_metrics(suite, accelerator)
    if main:
        print(f"evaluating {len(samples)} images of {dataset.name} ({dataset.kind}) on {world} process(es), "
              f"{device}; metrics: {', '.join(suite.available + suite.set_metrics) or 'none'}", file=sys.stderr)

    from accelerate.utils import gather_object

    rows: list[dict] = []
    if main:  # claimed only now: every process has checked the folder before the process group existed
        out.mkdir(parents=True, exist_ok=True)
        mark(out, OWNER)
    with ExitStack() as stack:
        # SR images and grids appear as whole folders at the end, never as a partial set.
        def folder(name: str, wanted: bool) -> Path | None:
            return stack.enter_context(atomic_directory(out / name, OWNER, overwrite=config.overwrite)) \
                if main and wanted else None

        sr_dir, grid_dir = folder("sr", config.save_images), folder("grids", bool(config.grids))
        progress = tqdm(total=len(samples), desc=f"eval {dataset.name}", unit="img", disable=not main)
        with torch.no_grad():
            for step in range(math.ceil(len(samples) / world)):
                index = step * world + rank
                payload = []
                if index < len(samples):
                    row, png = _restore_one(pipe, config, suite, samples[index], scale, device)
                    row.update(index=index, rank=rank)
                    keep_png = config.save_images or index < config.grids
                    payload.append((row, png if keep_png else None))
                for row, png in gather_object(payload):
                    progress.update(1)
                    if not main:
                        continue
                    rows.append(row)
                    if png is not None and sr_dir is not None:
                        (sr_dir / f"{row['name']}.png").parent.mkdir(parents=True, exist_ok=True)
                        (sr_dir / f"{row['name']}.png").write_bytes(png)
                    if png is not None and grid_dir is not None and row["index"] < config.grids:
                        try:
                            _write_grid(grid_dir, samples[row["index"]], png)
                        except ImageError as e:  # a grid is a picture for people: never worth a failed run
                            tqdm.write(f"warning: no grid for {row['name']}: {e}", file=sys.stderr)
        progress.close()

    try:
        if main:
            _check_once(rows, samples)
            _write_reports(out, config, pipe, dataset, samples, rows, suite, scale, crop_border, world, device, started)
    finally:
        # Reached by every process even when the main one fails here, so that none is left waiting.
        accelerator.wait_for_everyone()
    failed = sum(1 for r in rows if r.get("error")) if main else 0
    return 1 if failed else 0


def _write_reports(out: Path, config: EvalConfig, pipe, dataset: Dataset, samples: list, rows: list[dict],
                   suite: MetricSuite, scale: int, crop_border: int, world: int, device, started: float) -> None:
    """FID (needs the finished sr/ folder), then per_image.csv, summary.json and results.md. Main process only."""
    from sana_sr.model.loading import random_preset

    set_values = suite.score_sets(out / "sr" if config.save_images else None, dataset.hr_dir)
    summary = {
        "model": {"spec": config.model, "preset": random_preset(config.model),
                  "lora": _has_lora(pipe), "dit_dtype": config.dtype, "upscale": scale},
        "dataset": {"name": dataset.name, "kind": dataset.kind, "lr_dir": str(dataset.lr_dir),
                    "hr_dir": str(dataset.hr_dir) if dataset.hr_dir else None, "scale": scale,
                    "crop_border": crop_border, "images": len(samples)},
        "metrics": results.summarize(rows, suite.available, set_values),
        "unavailable": suite.unavailable,
        "failed_images": [r["name"] for r in rows if r.get("error")],
        "run": {"world_size": world, "device": results.device_description(device),
                "seconds": round(time.time() - started, 2), "config": _jsonable(asdict(config))},
        "versions": results.versions(),
    }
    results.write_csv(out / "per_image.csv", rows, suite.available)
    results.write_json(out / "summary.json", summary)
    results.write_markdown(out / "results.md", summary)
    print(f"results: {out.resolve()}/results.md", file=sys.stderr)


def _write_grid(grid_dir: Path, sample, png: bytes) -> None:
    sr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    lq = load_image(sample.lq).rgb
    hq = load_image(sample.hq).rgb if sample.hq is not None else None
    path = grid_dir / f"{sample.name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        Image.fromarray(results.make_grid(lq, sr, hq)).save(tmp, format="PNG")


def _check_once(rows: list[dict], samples: list) -> None:
    """Every image scored exactly once, or a loud error: the whole point of the sharding."""
    rows.sort(key=lambda r: r["index"])
    indices = [r["index"] for r in rows]
    if indices != list(range(len(samples))):
        seen = {i for i in indices}
        raise RuntimeError(
            f"sharding bug: gathered {len(indices)} rows for {len(samples)} images "
            f"({len(indices) - len(seen)} duplicated, {len(samples) - len(seen)} missing)"
        )


def _saved_upscale(model: str) -> int | None:
    """The model's upscale factor when it can be read without loading it (random presets, local folders)."""
    import json

    from sana_sr.model.loading import random_preset, resolve_model

    if random_preset(model) is not None:
        return 4
    index = Path(resolve_model(model)) / "model_index.json"
    if index.is_file():
        return int(json.loads(index.read_text()).get("upscale", 4))
    return None


def _has_lora(pipe) -> bool:
    from sana_sr.model.lora import has_lora

    return has_lora(pipe.transformer)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
