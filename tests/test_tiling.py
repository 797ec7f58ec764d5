"""Tiled restoration: the blending machinery is exact, tiled output matches untiled, memory stays bounded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sana_sr import TileSettings, build_pipeline
from sana_sr.model.pipeline import one_step_restore
from sana_sr.model.prompt_reuse import prompt_modules, reuse_prompt_projections
from sana_sr.model.tiling import gaussian_window, tile_starts, tiled_apply

from .conftest import load_photo

# Growth of the peak resident memory while restoring 512x512 -> 2048x2048 with the tiny preset on CPU, above what the
# interpreter, torch and the loaded model already hold (that part grows with the torch build: 2.14's CUDA wheel
# loads more than 2.13's CPU one). Measured 0.83 GiB (README); an untiled 2048x2048 restoration would need far more.
PEAK_GROWTH_BOUND_MIB = 1024


@pytest.mark.parametrize("length,tile,overlap", [(10, 4, 1), (64, 32, 8), (100, 32, 16), (32, 32, 8), (5, 8, 2)])
def test_tiles_cover_everything_and_overlap_as_asked(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = set()
    for start in starts:
        covered |= set(range(start, min(start + tile, length)))
    assert covered == set(range(length))
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_blending_is_a_partition_of_unity():
    """With a pointwise function, tiles see no less context than the whole: tiled must equal untiled exactly."""
    latents = torch.randn(2, 5, 37, 53)

    def pointwise(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z) * 3 + z**2

    torch.testing.assert_close(tiled_apply(pointwise, latents, tile=16, overlap=6), pointwise(latents),
                               atol=1e-5, rtol=1e-6)
    window = gaussian_window(16, 16, torch.device("cpu"), torch.float32)
    assert window.min() > 0 and window[8, 8] == window.max()


@pytest.mark.slow
def test_tiling_that_covers_the_image_is_the_untiled_path(tiny_pipe, lq_photo):
    untiled = tiny_pipe(lq_photo)
    tiled = tiny_pipe(lq_photo, tiling=TileSettings(tile=1024, overlap=256, ae_tile=512, ae_overlap=64))
    assert torch.equal(tiled, untiled)


@pytest.mark.slow
def test_tiled_restoration_agrees_with_untiled():
    """Tiles smaller than the image, on the pretrained tiny base (a real, trained DC-AE and DiT).

    The only difference left is context: each tile's global linear attention (DiT and the DC-AE's EfficientViT
    blocks) sees its tile, not the image. Measured on this input (x86_64, torch 2.13 CPU): tiled vs untiled
    56.9 dB; the untiled output re-encoded as JPEG q95 47.7 dB; a hard cut (64 px tiles, no overlap, no blending)
    44.8 dB. We require 50 dB: closer than JPEG q95 changes the image (invisible), with 7 dB of margin for other
    CPUs' float rounding, and a blending bug (a missing tile, wrong weights, a seam) lands near the hard cut, which
    must stay at least 10 dB worse than the blended tiles.
    """
    pipe = build_pipeline("tiny", weights="pretrained")
    pipe.set_progress_bar_config(disable=True)
    lq = load_photo("chelsea.png", (112, 72))  # held back from the base's training
    untiled = pipe(lq)

    def psnr(a, b):
        return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))

    tiled = pipe(lq, tiling=TileSettings(tile=192, overlap=64, ae_tile=128, ae_overlap=32))
    assert psnr(tiled, untiled) > 50.0
    hard_cut = pipe(lq, tiling=TileSettings(tile=64, overlap=0, ae_tile=64, ae_overlap=0))
    assert psnr(hard_cut, untiled) < psnr(tiled, untiled) - 10


@pytest.mark.slow
def test_2048_output_has_bounded_peak_memory():
    """A fresh process restores 512x512 -> 2048x2048 with default tiling; its peak RSS grows by less than the bound."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.memprobe", "--lq", "512", "--tile", "1024"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["output"] == [1, 3, 2048, 2048]
    assert report["peak_rss_mib"] - report["peak_rss_mib_before"] < PEAK_GROWTH_BOUND_MIB, report


def _tile_calls(pipe, latents, embeds, mask, tile):
    """Every tile's DiT call, each on its own (the prompt projected every time)."""
    return tiled_apply(lambda z: one_step_restore(pipe.transformer, z, embeds, mask, pipe.timestep, pipe.sigma),
                       latents, tile, tile // 4)


def test_tiles_share_the_prompt_projections_and_give_the_same_result(tiny_pipe):
    latents = torch.randn(1, tiny_pipe.transformer.config.in_channels, 12, 12, generator=torch.Generator().manual_seed(0))
    embeds, mask = tiny_pipe.encode_prompt(None, 1)
    ratio = tiny_pipe.vae.spatial_compression_ratio
    tiling = TileSettings(tile=8 * ratio, overlap=2 * ratio)
    with torch.no_grad():
        separate = _tile_calls(tiny_pipe, latents, embeds, mask, 8)
        with reuse_prompt_projections(tiny_pipe.transformer) as memos:
            shared = tiled_apply(
                lambda z: one_step_restore(tiny_pipe.transformer, z, embeds, mask, tiny_pipe.timestep, tiny_pipe.sigma),
                latents, 8, 2)
        assert torch.equal(tiny_pipe.restore_latents(latents, embeds, mask, tiling), shared)
    tiles = len(tile_starts(12, 8, 2)) ** 2
    assert tiles == 4
    assert len(memos) == len(prompt_modules(tiny_pipe.transformer)) >= 4
    assert [m.hits for m in memos] == [tiles - 1] * len(memos)  # projected once, reused by the 3 other tiles
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in prompt_modules(tiny_pipe.transformer))  # restored after


def test_prompt_projections_are_made_again_when_the_prompt_changes_or_autograd_is_on(tiny_pipe):
    embeds, mask = tiny_pipe.encode_prompt(None, 1)
    embeds = embeds.clone()
    latents = torch.randn(1, tiny_pipe.transformer.config.in_channels, 4, 4)

    def call():
        return one_step_restore(tiny_pipe.transformer, latents, embeds, mask, tiny_pipe.timestep, tiny_pipe.sigma)

    with reuse_prompt_projections(tiny_pipe.transformer) as memos:
        with torch.no_grad():
            first = call()
            embeds.mul_(2.0)  # in place: same storage, new version
            changed = call()
            again = call()
        with torch.enable_grad():
            call()
    with torch.no_grad():
        expected = call()
    assert not torch.equal(first, changed)
    assert torch.equal(changed, expected) and torch.equal(again, expected)
    assert all(m.hits == 1 for m in memos)  # only the third no-grad call reused; the grad call computed afresh
