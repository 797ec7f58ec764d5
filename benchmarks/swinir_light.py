"""A SwinIR-light-sized super-resolution transformer, written here for the quantization benchmark.

Same shape as SwinIR-light (Liang et al., 2021): 3x3 conv stem, patch LayerNorm, 4 residual Swin transformer blocks
(RSTB) of 6 Swin layers each (window 8, 6 heads, MLP ratio 2, alternate layers shifted by 4 with the usual
attention mask, relative position bias), a 3x3 conv after each RSTB and after the body, and the "pixelshuffledirect"
upsampler (one 3x3 conv to 3·s² channels + PixelShuffle). Width 60 gives ~0.9M parameters, like the paper's.
One deviation, for training in minutes on a CPU instead of days on GPUs: the network predicts a residual over the
bicubic upscaling of its input (VDSR-style global skip; the upsampler starts at zero, so training starts from
bicubic). Quantization errors then land on the residual; that is true for every method alike.
The two attention matmuls of every window attention are `compress.MatMul` sites, so they can be quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress import MatMul


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B·nW, ws·ws, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B·nW, ws·ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads, self.window, self.scale = heads, window, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1],
                             persistent=False)
        self.scores = MatMul()
        self.mix = MatMul()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.scores(q * self.scale, k.transpose(-2, -1))
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b // nw, nw, self.heads, n, n) + mask[None, :, None]).view(b, self.heads, n, n)
        x = self.mix(attn.softmax(dim=-1), v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class SwinLayer(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self._masks: dict[tuple, torch.Tensor] = {}

    def _mask(self, h: int, w: int, device) -> torch.Tensor | None:
        if not self.shift:
            return None
        key = (h, w, str(device))
        if key not in self._masks:
            img = torch.zeros(1, h, w, 1, device=device)
            cuts = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
            for i, hs in enumerate(cuts):
                for j, wsl in enumerate(cuts):
                    img[:, hs, wsl] = 3 * i + j
            ids = window_partition(img, self.window).squeeze(-1)
            diff = ids[:, None, :] - ids[:, :, None]
            self._masks[key] = torch.zeros_like(diff).masked_fill(diff != 0, -100.0)
        return self._masks[key]

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, self.window), self._mask(h, w, x.device)), self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class RSTB(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.layers = nn.ModuleList(SwinLayer(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
                                    for i in range(depth))
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = x
        for layer in self.layers:
            y = layer(y, size)
        b, _, c = x.shape
        y = self.conv(y.transpose(1, 2).reshape(b, c, *size)).flatten(2).transpose(1, 2)
        return x + y


class SwinIRLight(nn.Module):
    def __init__(self, scale: int = 2, dim: int = 60, depths=(6, 6, 6, 6), heads: int = 6, window: int = 8,
                 mlp_ratio: float = 2.0):
        super().__init__()
        self.scale, self.window = scale, window
        self.register_buffer("mean", torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, dim, 3, padding=1)
        self.patch_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(RSTB(dim, d, heads, window, mlp_ratio) for d in depths)
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, padding=1)
        self.upsample = nn.Conv2d(dim, 3 * scale * scale, 3, padding=1)
        nn.init.zeros_(self.upsample.weight)
        nn.init.zeros_(self.upsample.bias)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        h, w = lr.shape[-2:]
        pad_h, pad_w = -h % self.window, -w % self.window
        x = F.pad(lr, (0, pad_w, 0, pad_h), mode="reflect") - self.mean
        feat = self.conv_first(x)
        b, c, hp, wp = feat.shape
        tokens = self.patch_norm(feat.flatten(2).transpose(1, 2))
        for layer in self.layers:
            tokens = layer(tokens, (hp, wp))
        body = self.norm(tokens).transpose(1, 2).reshape(b, c, hp, wp)
        feat = self.conv_after_body(body) + feat
        residual = self.shuffle(self.upsample(feat))[..., : h * self.scale, : w * self.scale]
        return residual + F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
