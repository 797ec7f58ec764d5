"""Batched JPEG compression artefacts on the training device, one quality per image.

What baseline JPEG (libjpeg, 4:2:0) does to pixels, minus the entropy coding that does not change them:
RGB -> YCbCr (JFIF), chroma averaged over 2x2, 8x8 block DCT, division by the IJG tables scaled for the quality,
rounding, and back (chroma upsampled as libjpeg's "fancy" triangle filter, i.e. bilinear). Rounding is hard, as in
Real-ESRGAN's `DiffJPEG(differentiable=False)`: this is data synthesis, no gradient flows through it.

Why not kornia's `jpeg_codec_differentiable` (the backend `"kornia"` keeps it available): it agrees with libjpeg
as well as this does, but its soft rounding and antialiased chroma resampling make it 10-20x slower on a CPU, which
alone would exceed the whole degradation budget (docs/data.md has the numbers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ITU-T T.81 Annex K, the tables libjpeg scales by quality.
_LUMA_TABLE = [
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
]
_CHROMA_TABLE = [[17, 18, 24, 47] + [99] * 4, [18, 21, 26, 66] + [99] * 4, [24, 26, 56] + [99] * 5,
                 [47, 66] + [99] * 6] + [[99] * 8] * 4  # fmt: skip

_RGB_TO_YCBCR = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
_YCBCR_TO_RGB = [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]]


def quality_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 8, 8) luma and chroma quantisation tables for qualities (B,) in [1, 100], as libjpeg scales them."""
    q = quality.to(torch.float64).clamp(1, 100)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)[:, None, None]
    tables = []
    for base in (_LUMA_TABLE, _CHROMA_TABLE):
        t = torch.tensor(base, dtype=torch.float64, device=quality.device)
        tables.append(torch.floor((t * scale + 50.0) / 100.0).clamp(1, 255).to(torch.float32))
    return tables[0], tables[1]


def _dct_matrix(device: torch.device) -> torch.Tensor:
    """64x64 orthonormal 2-D DCT-II on row-major 8x8 blocks (JPEG's DCT), as one matrix for one GEMM."""
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * 0.5
    d[0] /= math.sqrt(2)
    return torch.kron(d, d).to(device=device, dtype=torch.float32)


def _blockwise(planes: torch.Tensor, tables: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """Quantise planes (B, C, H, W), H and W multiples of 8, in the DCT domain with per-image tables (B, 8, 8)."""
    b, c, h, w = planes.shape
    blocks = planes.reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, -1, 64)
    step = tables.reshape(b, 1, 64)
    # The division by the step and the multiplication back are folded into per-image DCT matrices: two batched
    # GEMMs and one rounding pass instead of five full passes over the coefficients.
    forward = dct.T.unsqueeze(0) / step
    inverse = step.transpose(1, 2) * dct.unsqueeze(0)
    blocks = torch.bmm(torch.round(torch.bmm(blocks, forward)), inverse)
    return blocks.reshape(b, c, h // 8, w // 8, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def _mix_channels(matrix: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """matrix (C_out, C_in) applied to every pixel of planes (B, C_in, H, W).

    A batched GEMM over flattened pixels: on CPU a 1x1 conv2d with 3 channels is ~10x slower."""
    b, c, h, w = planes.shape
    return torch.matmul(matrix, planes.reshape(b, c, h * w)).reshape(b, -1, h, w)


def jpeg_compress(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG-compress and decode images (B, 3, H, W) in [0, 1] (any H, W) at qualities (B,); returns [0, 1].

    Pixels are rounded to 8 bits on the way in and out, as a real codec's input and output are.
    """
    b, _, h, w = images.shape
    dtype, device = images.dtype, images.device
    x = images.float().clamp(0, 1).mul_(255.0).round_()
    # Pad to whole 16x16 MCUs by edge replication, as libjpeg does.
    pad_h, pad_w = (-h) % 16, (-w) % 16
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    # Y is level-shifted by -128 as JPEG does before its DCT; Cb and Cr come out centred on 0.
    ycc = _mix_channels(torch.tensor(_RGB_TO_YCBCR, device=device), x)
    ycc[:, 0] -= 128.0
    luma_table, chroma_table = quality_tables(quality.to(device))
    dct = _dct_matrix(device)
    y = _blockwise(ycc[:, :1], luma_table, dct)
    chroma = _blockwise(F.avg_pool2d(ycc[:, 1:], 2), chroma_table, dct)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    to_rgb = torch.tensor(_YCBCR_TO_RGB, device=device)
    rgb = _mix_channels(to_rgb[:, 1:], chroma).add_(y).add_(128.0)
    rgb = rgb[:, :, :h, :w].round_().clamp_(0, 255) / 255.0
    return rgb.to(dtype)


def jpeg_kornia(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """The same through kornia's differentiable codec (slower on CPU; kept for comparison and gradients)."""
    from kornia.enhance import jpeg_codec_differentiable

    return jpeg_codec_differentiable(images.clamp(0, 1), quality.to(images.device, images.dtype))
