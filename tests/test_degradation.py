"""Real-ESRGAN degradation on real photos: JPEG against libjpeg, the chain's statistics, USM, queue, seeds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from sana_sr.data.degradation import DegradationConfig, RealESRGANDegradation, filter2d, usm_sharpen
from sana_sr.data.jpeg import jpeg_compress, jpeg_kornia
from sana_sr.data.kernels import draw_kernels, gaussian_kernel, pulse_kernel

PHOTOS = Path(__file__).resolve().parents[1] / "sana_sr" / "assets" / "photos"


def photos(size: int = 256, names=("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")) -> torch.Tensor:
    """Centre crops of the bundled real photos, (N, 3, size, size) in [0, 1]."""
    crops = []
    for name in names:
        with Image.open(PHOTOS / name) as im:
            a = np.asarray(im.convert("RGB"))
        top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
        crops.append(torch.from_numpy(a[top : top + size, left : left + size].copy()).permute(2, 0, 1))
    return torch.stack(crops).float() / 255.0


def kernel_batch(n: int, kernel1=None, kernel2=None, sinc=None) -> dict:
    pulse = torch.from_numpy(pulse_kernel(21)).float()
    pick = lambda k: (torch.from_numpy(k).float() if k is not None else pulse).expand(n, 21, 21)  # noqa: E731
    return {"kernel1": pick(kernel1), "kernel2": pick(kernel2), "sinc_kernel": pick(sinc)}


# Only what a test switches on acts: no resize, no noise, no blur, JPEG at 95, scale 1, no queue.
QUIET = DegradationConfig(
    scale=1, resize_prob=(0, 0, 1), resize_prob2=(0, 0, 1), gaussian_noise_prob=1.0, gaussian_noise_prob2=1.0,
    noise_range=(0, 0), noise_range2=(0, 0), jpeg_range=(95, 95), jpeg_range2=(95, 95), second_blur_prob=0.0,
    queue_size=0,
)  # fmt: skip


def run_chain(config: DegradationConfig, hq: torch.Tensor, seed: int = 0, **kernels) -> torch.Tensor:
    batch = {"hq": hq.clone(), **kernel_batch(hq.shape[0], **kernels)}
    lq, _ = RealESRGANDegradation(config)(batch, torch.Generator().manual_seed(seed))
    return lq


def grey(x: torch.Tensor) -> torch.Tensor:
    return (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)


def blockiness(x: torch.Tensor) -> float:
    """Mean jump across 8x8 block borders over the mean jump inside blocks (1 for an image without blocks)."""
    g = grey(x)
    ratios = []
    for d in (g[..., :, 1:] - g[..., :, :-1], (g[..., 1:, :] - g[..., :-1, :]).transpose(-1, -2)):
        d = d.abs()
        border = torch.arange(d.shape[-1]) % 8 == 7
        ratios.append(float(d[..., border].mean() / d[..., ~border].mean()))
    return sum(ratios) / 2


def high_frequency_energy(x: torch.Tensor) -> float:
    laplacian = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])
    return float(filter2d(x, laplacian).pow(2).mean())


@pytest.mark.parametrize("quality", [30, 60, 90])
def test_jpeg_agrees_with_libjpeg(quality):
    hq = photos(256, ("astronaut.png", "coffee.png"))
    ours = jpeg_compress(hq, torch.full((2,), float(quality)))
    kornia = jpeg_kornia(hq, torch.full((2,), float(quality)))
    for i in range(2):
        rgb = (hq[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        ok, encoded = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        ref = torch.from_numpy(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1].copy()).permute(2, 0, 1) / 255.0

        def psnr(a, b):
            return float(-10 * torch.log10(((a - b) ** 2).mean()))

        assert psnr(ours[i], ref) > 38  # the same image as libjpeg's up to rounding and its integer DCT
        assert abs(psnr(ours[i], hq[i]) - psnr(ref, hq[i])) < 0.3  # and the same amount of damage
        assert abs(psnr(kornia[i], hq[i]) - psnr(ref, hq[i])) < 1.0  # kornia's codec holds up too (slower)
    assert torch.equal(ours, (ours * 255).round() / 255)


@pytest.mark.slow
def test_jpeg_q30_leaves_8x8_block_artefacts():
    hq = photos()
    lq = run_chain(replace(QUIET, jpeg_range=(30, 30), jpeg_range2=(30, 30)), hq)
    assert blockiness(hq) < 1.1
    assert blockiness(lq) > 1.3
    assert blockiness(run_chain(QUIET, hq)) < blockiness(lq)


@pytest.mark.slow
def test_blur_removes_high_frequencies():
    hq = photos()
    blurred = run_chain(QUIET, hq, kernel1=gaussian_kernel(21, 2.0))
    control = run_chain(QUIET, hq)
    assert high_frequency_energy(blurred) < 0.1 * high_frequency_energy(hq)
    assert high_frequency_energy(control) > 0.7 * high_frequency_energy(hq)
    # Low frequencies stay: the means of 32x32 blocks barely move.
    pool = torch.nn.functional.avg_pool2d
    assert float((pool(blurred, 32) - pool(hq, 32)).abs().mean()) < 0.01


@pytest.mark.parametrize("kind", ["gaussian", "poisson"])
@pytest.mark.slow
def test_noise_raises_variance_in_flat_regions(kind):
    hq = photos()
    if kind == "gaussian":
        config = replace(QUIET, noise_range=(20, 20), noise_range2=(20, 20), gray_noise_prob=0, gray_noise_prob2=0)
    else:
        config = replace(QUIET, gaussian_noise_prob=0.0, gaussian_noise_prob2=0.0, poisson_scale_range=(3, 3),
                         poisson_scale_range2=(2.5, 2.5))  # fmt: skip
    noisy = run_chain(config, hq)

    def block_variance(x):
        g = grey(x).unfold(-2, 8, 8).unfold(-2, 8, 8)  # (N, 32, 32, 8, 8)
        return g.reshape(*g.shape[:3], 64).var(-1)

    before, after = block_variance(hq), block_variance(noisy)
    flat = before <= before.flatten().quantile(0.2)
    added = float(after[flat].mean() - before[flat].mean())
    assert added > (8 / 255) ** 2  # at least an 8-level standard deviation added where the photo was flat
    if kind == "gaussian":  # two stages of sigma 20 (grey mixes channels, JPEG 95 smooths a little)
        assert (12 / 255) ** 2 < added < (2 * 20**2) / 255**2


@pytest.mark.slow
def test_default_chain_is_reproducible_and_rounded_to_8_bits():
    config = replace(DegradationConfig(), queue_size=0)
    hq = photos()
    rng = np.random.default_rng(0)
    draws = [draw_kernels(rng, config) for _ in range(4)]
    batch = {"hq": hq, **{k: torch.stack([torch.from_numpy(d[k]) for d in draws]) for k in draws[0]}}
    degrade = RealESRGANDegradation(config)
    outs = [degrade(dict(batch), torch.Generator().manual_seed(s))[0] for s in (3, 3, 4)]
    assert outs[0].shape == (4, 3, 64, 64) and outs[0].dtype == torch.float32
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    assert 0 <= float(outs[0].min()) and float(outs[0].max()) <= 1
    assert torch.equal(outs[0], (outs[0] * 255).round() / 255)
    # Degraded, but still the same picture: close to the plain bicubic down-scale at low frequencies.
    bicubic = torch.nn.functional.interpolate(hq, size=(64, 64), mode="bicubic", antialias=True)
    pool = torch.nn.functional.avg_pool2d
    assert float((pool(outs[0], 8) - pool(bicubic, 8)).abs().mean()) < 0.08


def test_bicubic_prob_swaps_whole_rows_for_the_plain_bicubic_downscale():
    hq = photos(64)
    plain = (torch.nn.functional.interpolate(hq, size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1) * 255
             ).round() / 255
    config = replace(DegradationConfig(), queue_size=0)
    draws = [draw_kernels(np.random.default_rng(i), config) for i in range(4)]
    batch = {"hq": hq, **{k: torch.stack([torch.from_numpy(d[k]) for d in draws]) for k in draws[0]}}
    chains = {p: RealESRGANDegradation(replace(config, bicubic_prob=p)) for p in (0.0, 0.5, 1.0)}
    swapped = {p: chain(dict(batch), torch.Generator().manual_seed(1))[0] for p, chain in chains.items()}
    assert torch.equal(swapped[1.0], plain)
    assert not any(torch.equal(swapped[0.0][i], plain[i]) for i in range(4))
    # Each row is either the full chain's LQ or the plain one; the default (0) draws nothing, so old seeds hold.
    mixed = [torch.equal(swapped[0.5][i], plain[i]) for i in range(4)]
    assert all(m or torch.equal(swapped[0.5][i], swapped[0.0][i]) for i, m in enumerate(mixed))
    with pytest.raises(ValueError, match="bicubic_prob"):
        DegradationConfig(bicubic_prob=1.5)


@pytest.mark.slow
def test_separable_usm_equals_the_dense_51x51_one_and_sharpens():
    hq = photos(128)
    fast = usm_sharpen(hq, separable=True)
    dense = usm_sharpen(hq[:2], separable=False)
    assert float((fast[:2] - dense).abs().max()) < 1e-5
    assert high_frequency_energy(fast) > 1.2 * high_frequency_energy(hq)
    config = replace(QUIET, usm=True)
    batch = {"hq": hq.clone(), **kernel_batch(4)}
    lq, gt = RealESRGANDegradation(config)(batch, torch.Generator().manual_seed(0))
    assert torch.allclose(gt, fast, atol=1e-6)
    assert torch.equal(batch["hq"], hq)  # the plain GT stays available to the trainer
    assert high_frequency_energy(lq) > 1.1 * high_frequency_energy(hq)  # the chain started from the sharpened GT
    # Through the queue, the sharpened GT stays with its row.
    degrade = RealESRGANDegradation(replace(QUIET, usm=True, queue_size=8))
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        batch = {"hq": hq.roll(step * 7, dims=-1), **kernel_batch(4), "key": [f"{step}-{i}" for i in range(4)]}
        lq, gt = degrade(batch, gen)
        assert torch.allclose(gt, usm_sharpen(batch["hq"]), atol=1e-6)


def test_paired_random_crop_keeps_lq_and_gt_aligned():
    hq = photos(256)
    config = replace(QUIET, scale=4, gt_size=128)
    batch = {"hq": hq.clone(), **kernel_batch(4)}
    lq, gt = RealESRGANDegradation(config)(batch, torch.Generator().manual_seed(1))
    assert lq.shape == (4, 3, 32, 32) and gt.shape == (4, 3, 128, 128) and torch.equal(batch["hq"], gt)
    full = run_chain(replace(config, gt_size=None), hq, seed=1)
    # Find the window: the crop of the full LQ that equals lq sits at the same place (x4) as gt in hq.
    windows = full.unfold(2, 32, 1).unfold(3, 32, 1)  # (4, 3, 33, 33, 32, 32)
    match = (windows - lq[:, :, None, None]).abs().amax((0, 1, 4, 5)).argmin()
    top, left = divmod(int(match), windows.shape[3])
    assert torch.equal(gt, hq[..., top * 4 : top * 4 + 128, left * 4 : left * 4 + 128])


def test_queue_mixes_batches_and_keeps_each_row_together():
    config = replace(QUIET, scale=4, queue_size=10)  # capacity 8 for batches of 4
    degrade = RealESRGANDegradation(config)
    gen = torch.Generator().manual_seed(0)
    seen_from_earlier = 0
    for step in range(6):
        ids = [step * 4 + i for i in range(4)]
        batch = {
            "hq": torch.stack([torch.full((3, 32, 32), i / 255.0) for i in ids]),
            **kernel_batch(4),
            "key": [f"k{i}" for i in ids],
            "caption": [f"c{i}" for i in ids],
            "prompt_embeds": torch.stack([torch.full((5, 3), float(i)) for i in ids]),
            "skipped": 0,
        }
        lq, gt = degrade(batch, gen)
        assert degrade.queue.capacity == 8
        for row in range(4):
            i = int(batch["key"][row][1:])
            assert batch["caption"][row] == f"c{i}"
            assert torch.all(batch["prompt_embeds"][row] == i)
            assert torch.allclose(gt[row], torch.full((3, 32, 32), i / 255.0))
            assert torch.allclose(lq[row], torch.full((3, 8, 8), i / 255.0), atol=1 / 255)
            seen_from_earlier += i not in ids
        if step < 2:
            assert batch["key"] == [f"k{i}" for i in ids]  # filling: passes through
    assert seen_from_earlier > 8


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="not a multiple of the scale 4"):
        degrade = RealESRGANDegradation(replace(QUIET, scale=4, queue_size=0))
        degrade({"hq": torch.rand(1, 3, 30, 30), **kernel_batch(1)})
    with pytest.raises(ValueError, match="jpeg_range must lie in"):
        DegradationConfig(jpeg_range=(0, 95))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs where one is lent)")
def test_cpu_and_gpu_agree():
    config = replace(DegradationConfig(), queue_size=0)
    hq = photos()
    rng = np.random.default_rng(0)
    draws = [draw_kernels(rng, config) for _ in range(4)]
    batch = {"hq": hq, **{k: torch.stack([torch.from_numpy(d[k]) for d in draws]) for k in draws[0]}}
    for seed in range(4):
        # A CPU generator on both devices: every random draw, noise included, is the same.
        cpu, _ = RealESRGANDegradation(config, "cpu")(dict(batch), torch.Generator().manual_seed(seed))
        gpu, _ = RealESRGANDegradation(config, "cuda")(dict(batch), torch.Generator().manual_seed(seed))
        diff = (cpu - gpu.cpu()).abs()
        # Float differences flip an occasional rounding (8-bit output, JPEG coefficients) by one step.
        assert float(diff.mean()) < 0.5 / 255
        assert float((diff > 2.5 / 255).float().mean()) < 0.01
