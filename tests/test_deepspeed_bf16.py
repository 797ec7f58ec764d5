"""DeepSpeed with bf16 on two CPU processes (gloo, DeepSpeed's CPU accelerator): an EMA that keeps fp32 precision
under ZeRO-2, and ZeRO-3 end to end (train, checkpoint, bitwise resume, EMA and replica check over gathered
weights, LoRA and pipeline saved whole and reloadable)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .slurm_cluster import free_ports
from .train_helpers import REPO, TINY_ARGS, accelerate_launch, final_lora, make_shards, run, write_photo_crops

# After every update an fp32 EMA differs from the float64 reference by fp32 rounding of the shadow, about
# 6e-8 x |w| per update; the tiny LoRA's weights stay below 0.5, so over 40 updates the error stays below
# 40 x 6e-8 x 0.5 = 1.2e-6 even if every rounding went the same way (measured: see docs/training.md).
# A bf16 shadow cannot meet it: its spacing near 0.2 is 1e-3, and at decay 0.999 the updates round to zero.
EMA_TOLERANCE = 2e-6
DECAY = 0.999

BF16_ARGS = [*TINY_ARGS, "dist.strategy=deepspeed", "dist.mixed_precision=bf16", "optim.lr=5e-3",
             "optim.global_batch_size=4", f"optim.ema_decay={DECAY}", "optim.ema_warmup=false",
             "checkpoint.resume=null", "checkpoint.keep_last=5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16-data")
    return make_shards(write_photo_crops(root / "images"), root / "shards")


def _probe(out: Path, *overrides: str) -> str:
    cmd = [*accelerate_launch(2, free_ports(1)[0], module="tests.ema_probe"), "model.preset=tiny", *BF16_ARGS,
           f"output_dir={out}", *overrides]
    return run(cmd, cwd=REPO).stdout


def _lora_key(name: str) -> str:
    return name.replace(".default.", ".")  # PEFT's parameter name -> the key in the adapter file


def ema_error(run_dir: Path) -> tuple[float, float]:
    """(largest |exported EMA - float64 EMA of the recorded fp32 masters|, largest distance the reference moved
    from its first value): the error must be tiny next to the movement, or a frozen EMA would pass."""
    trajectory = torch.load(run_dir / "trajectory.pt", weights_only=True)
    exported = final_lora(run_dir, ema=True)
    reference = {k: v.double() for k, v in trajectory[0].items()}  # the first update copies
    for weights in trajectory[1:]:
        for k, w in weights.items():
            reference[k] -= (1 - DECAY) * (reference[k] - w.double())
    error = max((exported[_lora_key(k)].double() - ref).abs().max().item() for k, ref in reference.items())
    moved = max((ref - trajectory[0][k].double()).abs().max().item() for k, ref in reference.items())
    return error, moved


@pytest.mark.slow
def test_ema_under_deepspeed_bf16_matches_an_fp32_reference(shards, tmp_path):
    out = tmp_path / "zero2"
    stdout = _probe(out, f"data.shards={shards}", "optim.max_steps=40")
    assert "world 2 (DistributedType.DEEPSPEED)" in stdout
    trajectory = torch.load(out / "trajectory.pt", weights_only=True)
    assert len(trajectory) == 40
    error, moved = ema_error(out)
    print(f"ZeRO-2 bf16 EMA: max error {error:.3g} (tolerance {EMA_TOLERANCE}), reference moved {moved:.3g}")
    assert moved > 100 * EMA_TOLERANCE, moved
    assert error <= EMA_TOLERANCE, (error, moved)
    # The adapter files hold the fp32 masters, not the module's bf16 copies.
    last = final_lora(out)
    assert all(last[_lora_key(k)].dtype == torch.float32 and torch.equal(last[_lora_key(k)], w)
               for k, w in trajectory[-1].items())


@pytest.mark.slow
def test_zero3_bf16_trains_checkpoints_resumes_bitwise_and_exports(shards, tmp_path):
    # The regularisers run the unwrapped DiT beside the engine's forward: under ZeRO-3 that must gather too.
    zero3 = [f"data.shards={shards}", "dist.deepspeed_config=deepspeed_zero3.json", "optim.max_steps=10",
             "checkpoint.every_steps=5", "loss.prior_alignment=0.1", "loss.adapter_consistency=0.1",
             "optim.lr=1e-2", "optim.micro_batch_size=1", "optim.global_batch_size=2"]
    first = tmp_path / "a"
    stdout = _probe(first, *zero3)
    assert "world 2 (DistributedType.DEEPSPEED)" in stdout
    assert "32768 trainable parameters" in stdout  # counted whole, not as this rank's partition

    # EMA over the gathered fp32 masters.
    error, moved = ema_error(first)
    print(f"ZeRO-3 bf16 EMA: max error {error:.3g} (tolerance {EMA_TOLERANCE}), reference moved {moved:.3g}")
    assert error <= EMA_TOLERANCE and moved > 100 * EMA_TOLERANCE, (error, moved)

    # Replica check over gathered weights: both ranks, non-trivial, equal.
    ranks = json.loads((first / "replicas.json").read_text())["ranks"]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["data_digest"] != ranks[1]["data_digest"]
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"] and ranks[0]["weights_checksum"][0] != 0

    # The checkpoint's adapter is the gathered fp32 masters at that step.
    trajectory = torch.load(first / "trajectory.pt", weights_only=True)

    at_five = load_file(first / "checkpoint-00000005" / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(at_five[_lora_key(k)], w) for k, w in trajectory[4].items())

    # Resume from the middle checkpoint in a fresh folder: bitwise the same adapter and EMA at the end.
    second = tmp_path / "b"
    stdout = _probe(second, *zero3, f"checkpoint.resume={first / 'checkpoint-00000005'}")
    assert "at step 5" in stdout
    for ema in (False, True):
        a, b = final_lora(first, ema=ema), final_lora(second, ema=ema)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"ema={ema}"

    # The pipeline was saved whole (gathered base + EMA adapter) and restores an image through the CLI.
    from sana_sr import SanaSRPipeline
    from sana_sr.cli import main as cli

    pipe = SanaSRPipeline.from_pretrained(first / "final" / "pipeline")
    assert sum(p.numel() for p in pipe.transformer.parameters()) > 300_000
    adapter = load_file(first / "final" / "pipeline" / "lora" / "pytorch_lora_weights.safetensors")
    ema = final_lora(first, ema=True)
    assert all(torch.equal(adapter[k], ema[k]) for k in ema)
    lq = tmp_path / "lq.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(lq)
    assert cli(["upscale", str(lq), "-o", str(tmp_path / "sr"), "--model", str(first / "final" / "pipeline")]) == 0
    with Image.open(tmp_path / "sr" / "lq.png") as im:
        assert im.size == (96, 64)
