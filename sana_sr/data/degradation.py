"""Real-ESRGAN's second-order degradation, batched on the training device (the same code on CPU and GPU).

Contract with the loader and the trainer:

- The loader (`sana_sr.data.streaming.make_loader`) yields batches with `"hq"` (B, 3, S, S) float32 in [0, 1] (or
  uint8 0..255 with LoaderConfig.hq_uint8; both are accepted here) and,
  drawn per sample in its workers by `sana_sr.data.kernels.draw_kernels`, `"kernel1"`, `"kernel2"`,
  `"sinc_kernel"` (B, K, K) float32, K = `blur_kernel_size`.
- `RealESRGANDegradation(config, device)(batch, generator)` returns `(lq, gt)` on `device`: lq (B, 3, S/scale,
  S/scale) rounded to 8-bit levels, gt (B, 3, S, S), USM-sharpened when `config.usm`. Every per-batch choice (resize
  scale and mode, noise kind, final order) is Real-ESRGAN's; per-sample values (noise sigma, JPEG quality) are drawn
  per sample. All randomness comes from `generator`: pass a CPU generator for results that do not depend on the
  device (noise is then drawn on the CPU and moved), a generator on the device for speed.
- With the training-pair queue on (`queue_size` > 0, Real-ESRGAN's 180), the rows returned are drawn from a pool of
  earlier batches, so the call also rewrites every other per-row entry of `batch` (`"hq"`, `"caption"`, `"key"`,
  `"prompt_embeds"`, `"prompt_mask"`, ...) to describe the returned rows. `"hq"` then holds the plain (unsharpened)
  GT of the returned rows, so a trainer can use both.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from sana_sr.data.degradation_config import DegradationConfig
from sana_sr.data.jpeg import jpeg_compress, jpeg_kornia
from sana_sr.data.queue import TrainingPairQueue

__all__ = ["DegradationConfig", "RealESRGANDegradation", "filter2d", "usm_sharpen", "gaussian_taps"]


def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Correlate each image (B, C, H, W) with its own kernel (B, k, k) or one shared kernel (k, k); reflect padding
    (as cv2.filter2D and Real-ESRGAN's filter2D)."""
    b, c, h, w = images.shape
    k = kernels.shape[-1]
    # Reflection needs a border thinner than the image; tiny images (a 21-tap kernel on 8 pixels) replicate.
    padded = F.pad(images, (k // 2,) * 4, mode="reflect" if k // 2 < min(h, w) else "replicate")
    # Always as one depthwise convolution over B*C channels: on CPU it is ~5x faster than the same filter run as
    # a batch of B*C one-channel images (which is how Real-ESRGAN applies a shared kernel).
    if kernels.dim() == 2:
        weight = kernels.to(images.dtype).expand(b * c, 1, k, k).contiguous()
    else:
        weight = kernels.to(images.dtype).repeat_interleave(c, dim=0).unsqueeze(1)
    return F.conv2d(padded.reshape(1, b * c, h + k - 1, w + k - 1), weight, groups=b * c).view(b, c, h, w)


def gaussian_taps(size: int, sigma: float = 0.0) -> torch.Tensor:
    """1-D normalised Gaussian of odd `size`; sigma <= 0 picks OpenCV's default 0.3((size-1)/2 - 1) + 0.8, as
    cv2.getGaussianKernel (which Real-ESRGAN's USM uses: size 51 gives sigma 8)."""
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(x**2) / (2 * sigma**2))
    return (taps / taps.sum()).float()


def _gaussian_blur(images: torch.Tensor, taps: torch.Tensor, separable: bool) -> torch.Tensor:
    if not separable:
        # Real-ESRGAN's way: one dense size x size convolution (kept for the benchmark and the equivalence test).
        return filter2d(images, torch.outer(taps, taps).to(images.device))
    b, c, h, w = images.shape
    k = taps.numel()
    taps = taps.to(images.device, images.dtype)
    # Reflect-padding both axes, then a row pass and a column pass, equals the dense 2-D convolution exactly
    # (up to float rounding): a Gaussian is separable, and k^2 -> 2k multiply-adds per pixel.
    mode = "reflect" if k // 2 < min(h, w) else "replicate"
    x = F.pad(images, (k // 2,) * 4, mode=mode).reshape(1, b * c, h + k - 1, w + k - 1)
    x = F.conv2d(x, taps.view(1, 1, 1, k).expand(b * c, 1, 1, k).contiguous(), groups=b * c)
    x = F.conv2d(x, taps.view(1, 1, k, 1).expand(b * c, 1, k, 1).contiguous(), groups=b * c)
    return x.view(b, c, h, w)


def usm_sharpen(
    images: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10, separable: bool = True
) -> torch.Tensor:
    """Unsharp masking as Real-ESRGAN's USMSharp: sharpen where the detail exceeds `threshold` (8-bit levels),
    blending through a blurred mask. radius 50 means a 51-tap Gaussian (sigma 8)."""
    taps = gaussian_taps(radius + 1 if radius % 2 == 0 else radius)
    residual = images - _gaussian_blur(images, taps, separable)
    mask = (residual.abs() * 255 > threshold).to(images.dtype)
    soft_mask = _gaussian_blur(mask, taps, separable)
    sharp = (images + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * images


class RealESRGANDegradation:
    """HQ batch -> (LQ, GT) by Real-ESRGAN's second-order model; see the module docstring for the contract."""

    def __init__(self, config: DegradationConfig | None = None, device: str | torch.device = "cpu"):
        self.config = config or DegradationConfig()
        self.device = torch.device(device)
        self.queue = TrainingPairQueue(self.config.queue_size)

    # ---- random draws: all from one generator, so a seed fixes everything -------------------------------------
    def _uniform(self, gen: torch.Generator | None, low: float, high: float, n: int | None = None) -> torch.Tensor:
        device = gen.device if gen is not None else self.device
        values = torch.rand(n or 1, generator=gen, device=device, dtype=torch.float64) * (high - low) + low
        return values if n is not None else values[0]

    def _choice(self, gen: torch.Generator | None, probs: tuple[float, ...]) -> int:
        device = gen.device if gen is not None else self.device
        weights = torch.tensor(probs, dtype=torch.float64, device=device)
        return int(torch.multinomial(weights, 1, generator=gen).item())

    def _noise_device(self, gen: torch.Generator | None) -> torch.device:
        return gen.device if gen is not None else self.device

    # ---- the chain ----------------------------------------------------------------------------------------------
    def _resize(self, x: torch.Tensor, gen, probs, scale_range, size: tuple[int, int] | None = None) -> torch.Tensor:
        kind = self._choice(gen, probs)  # up, down, keep
        scale = 1.0
        if kind == 0:
            scale = float(self._uniform(gen, 1.0, scale_range[1]))
        elif kind == 1:
            scale = float(self._uniform(gen, scale_range[0], 1.0))
        mode = self.config.resize_modes[self._choice(gen, (1.0,) * len(self.config.resize_modes))]
        if size is not None:
            size = (max(1, int(size[0] * scale)), max(1, int(size[1] * scale)))
            return F.interpolate(x, size=size, mode=mode)
        return F.interpolate(x, scale_factor=scale, mode=mode)

    def _gaussian_noise(self, x: torch.Tensor, gen, sigma_range, gray_prob) -> torch.Tensor:
        b = x.shape[0]
        nd = self._noise_device(gen)
        sigma = self._uniform(gen, *sigma_range, n=b).float()
        gray = self._uniform(gen, 0.0, 1.0, n=b) < gray_prob
        noise = torch.randn(x.shape, generator=gen, device=nd, dtype=torch.float32)
        rows = gray.nonzero().flatten()
        if rows.numel():
            # A grey sample gets one noise field on all three channels: channel 0's draw is as good as a fresh one.
            noise[rows, 1:] = noise[rows, :1]
        noise = noise.to(x.device, x.dtype).mul_(sigma.to(x.device).view(b, 1, 1, 1) / 255.0)
        return noise.add_(x).clamp_(0, 1)

    def _poisson_noise(self, x: torch.Tensor, gen, scale_range, gray_prob) -> torch.Tensor:
        b = x.shape[0]
        nd = self._noise_device(gen)
        scale = self._uniform(gen, *scale_range, n=b).float().to(x.device)
        gray = (self._uniform(gen, 0.0, 1.0, n=b) < gray_prob).to(x.device)
        noise = torch.zeros_like(x)
        for is_gray in (False, True):
            rows = (gray == is_gray).nonzero().flatten()
            if rows.numel() == 0:
                continue
            img = x[rows]
            if is_gray:
                img = (img * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, True)
            img = (img.clamp(0, 1) * 255).round() / 255
            # Photon count per level as Real-ESRGAN: 2^ceil(log2(number of distinct 8-bit levels in the image)).
            levels = _distinct_levels(img)
            vals = torch.exp2(torch.ceil(torch.log2(levels.float()))).view(-1, 1, 1, 1)
            out = torch.poisson((img * vals).to(nd), generator=gen).to(x.device) / vals
            noise[rows] = (out - img).expand(-1, 3, -1, -1)
        return noise.mul_(scale.view(b, 1, 1, 1)).add_(x).clamp_(0, 1)

    def _noise(self, x: torch.Tensor, gen, stage: str) -> torch.Tensor:
        c = self.config
        p, sigma, poisson, gray = (
            (c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob)
            if stage == "1"
            else (c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2)
        )
        if float(self._uniform(gen, 0.0, 1.0)) < p:
            return self._gaussian_noise(x, gen, sigma, gray)
        return self._poisson_noise(x, gen, poisson, gray)

    def _jpeg(self, x: torch.Tensor, gen, quality_range) -> torch.Tensor:
        quality = self._uniform(gen, *quality_range, n=x.shape[0]).float().to(x.device)
        codec = jpeg_kornia if self.config.jpeg_backend == "kornia" else jpeg_compress
        return codec(x, quality)  # both codecs clamp to [0, 1] first, as Real-ESRGAN does before its JPEG

    def _sharpen(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        return usm_sharpen(x, c.usm_weight, c.usm_radius, c.usm_threshold, separable=c.usm_separable)

    @torch.no_grad()
    def degrade(self, hq: torch.Tensor, kernel1, kernel2, sinc_kernel, generator=None) -> torch.Tensor:
        """The chain alone: GT (B, 3, H, W) on the device -> LQ (B, 3, H/scale, W/scale), 8-bit levels."""
        c, gen = self.config, generator
        h, w = hq.shape[-2:]
        if h % c.scale or w % c.scale:
            raise ValueError(f"HQ size {h}x{w} is not a multiple of the scale {c.scale}: crop to a multiple")
        k1, k2, ks = (k.to(self.device, torch.float32) for k in (kernel1, kernel2, sinc_kernel))
        # First stage: blur, resize, noise, JPEG.
        out = filter2d(hq, k1)
        out = self._resize(out, gen, c.resize_prob, c.resize_range)
        out = self._noise(out, gen, "1")
        out = self._jpeg(out, gen, c.jpeg_range)
        # Second stage.
        if float(self._uniform(gen, 0.0, 1.0)) < c.second_blur_prob:
            out = filter2d(out, k2)
        out = self._resize(out, gen, c.resize_prob2, c.resize_range2, size=(h // c.scale, w // c.scale))
        out = self._noise(out, gen, "2")
        # [resize to the LQ size + sinc] and JPEG in random order: other orders give twisted lines (Real-ESRGAN).
        jpeg_last = float(self._uniform(gen, 0.0, 1.0)) < 0.5
        if not jpeg_last:
            out = self._jpeg(out, gen, c.jpeg_range2)
        mode = c.resize_modes[self._choice(gen, (1.0,) * len(c.resize_modes))]
        out = filter2d(F.interpolate(out, size=(h // c.scale, w // c.scale), mode=mode), ks)
        if jpeg_last:
            out = self._jpeg(out, gen, c.jpeg_range2)
        if c.bicubic_prob > 0:  # drawn only when asked, so that the LQ of every existing seed stays the same
            rows = (self._uniform(gen, 0.0, 1.0, n=hq.shape[0]) < c.bicubic_prob).to(out.device)
            plain = F.interpolate(hq, size=(h // c.scale, w // c.scale), mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 1)
            out = torch.where(rows.view(-1, 1, 1, 1), plain, out)
        return (out * 255.0).round().clamp(0, 255) / 255.0

    @torch.no_grad()
    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        hq = batch["hq"].to(self.device, non_blocking=True)
        hq = hq.float().div_(255.0) if hq.dtype == torch.uint8 else hq.float()
        source = self._sharpen(hq) if c.usm else hq
        lq = self.degrade(source, batch["kernel1"], batch["kernel2"], batch["sinc_kernel"], generator)
        # The sharpened GT goes through the queue with its row: Real-ESRGAN sharpens the dequeued GT a second time
        # instead, which costs a second USM per batch for the same result.
        rows = {"lq": lq, "hq": hq, **({"gt": source} if c.usm else {})}
        if c.gt_size is not None and c.gt_size < hq.shape[-1]:
            rows = _paired_random_crop(rows, c.gt_size, c.scale, generator, self.device)
        rows = self.queue.exchange(rows, batch, generator)
        batch["hq"] = rows["hq"]
        return rows["lq"].contiguous(), rows.get("gt", rows["hq"])

    def state_dict(self) -> dict:
        """The configuration and the pair queue's content (for an exact resume)."""
        return {"config": asdict(self.config), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.config):
            changed = sorted(k for k in state["config"] if state["config"][k] != asdict(self.config).get(k))
            raise ValueError(f"the checkpoint's degradation config differs in {', '.join(changed)}")
        self.queue.load_state_dict(state["queue"], self.device)


def _distinct_levels(img: torch.Tensor) -> torch.Tensor:
    """Number of distinct 8-bit values per image of (B, C, H, W) in [0, 1] (a bincount, not a sort per image)."""
    b = img.shape[0]
    index = (img * 255).round().long().clamp(0, 255).reshape(b, -1)
    index = index + 256 * torch.arange(b, device=img.device).view(b, 1)
    counts = torch.bincount(index.flatten(), minlength=256 * b).view(b, 256)
    return (counts > 0).sum(1)


def _paired_random_crop(rows: dict, gt_size: int, scale: int, gen, device) -> dict:
    """Crop lq and hq at matching positions (one position per batch, as Real-ESRGAN's paired_random_crop)."""
    lq = rows["lq"]
    lq_size = gt_size // scale
    h, w = lq.shape[-2:]
    gen_device = gen.device if gen is not None else device
    top = int(torch.randint(0, h - lq_size + 1, (1,), generator=gen, device=gen_device))
    left = int(torch.randint(0, w - lq_size + 1, (1,), generator=gen, device=gen_device))
    out = {"lq": lq[..., top : top + lq_size, left : left + lq_size]}
    for name, value in rows.items():
        if name != "lq":
            out[name] = value[..., top * scale : (top + lq_size) * scale, left * scale : (left + lq_size) * scale]
    return out



def degrade_images(hq: torch.Tensor, seed: int, config: DegradationConfig | None = None) -> torch.Tensor:
    """LQ for a fixed evaluation set: every random draw (kernels and on-device ops) comes from `seed`.

    `hq` is (B, 3, H, W) in [0, 1] with H, W multiples of the scale; no pair queue (rows stay with their HQ).
    """
    import numpy as np

    from sana_sr.data.kernels import draw_kernels

    config = replace(config or DegradationConfig(), queue_size=0, gt_size=None, usm=False)
    rng = np.random.default_rng(seed)
    draws = [draw_kernels(rng, config) for _ in range(hq.shape[0])]
    batch = {"hq": hq, **{k: torch.from_numpy(np.stack([d[k] for d in draws])) for k in draws[0]}}
    degradation = RealESRGANDegradation(config, hq.device)
    lq, _ = degradation(batch, torch.Generator(hq.device).manual_seed(seed))
    return lq
