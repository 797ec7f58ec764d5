"""`DegradationConfig`: every value of Real-ESRGAN's second-order degradation, x4plus values as defaults.

Field names follow Real-ESRGAN's `options/train_realesrgan_x4plus.yml` (a `2` suffix is the second stage), so a
value can be copied across unchanged. Checked on construction: a wrong value is one line naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from sana_sr.data.kernels import KERNEL_TYPES

_X4PLUS_KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_X4PLUS_KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


@dataclass
class DegradationConfig:
    """Real-ESRGAN second-order degradation (x4plus defaults). Probabilities in [0, 1]; ranges are (low, high)."""

    scale: int = 4
    """HQ side / LQ side."""
    blur_kernel_size: int = 21
    """Largest blur kernel (odd); every kernel is zero-padded to this size so that a batch stacks."""
    min_kernel_size: int = 7
    """Smallest blur kernel (odd); sizes are drawn uniformly from the odd sizes in [min, max] (Real-ESRGAN: 7..21)."""

    kernel_list: tuple[str, ...] = _X4PLUS_KERNELS
    """First-stage blur kernel types (of iso, aniso, generalized_iso, generalized_aniso, plateau_iso, plateau_aniso)."""
    kernel_prob: tuple[float, ...] = _X4PLUS_KERNEL_PROB
    """Probability of each of `kernel_list`."""
    sinc_prob: float = 0.1
    """First stage: probability of a sinc (ringing) kernel instead of a blur kernel."""
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    """First-stage kernel sigma range (pixels), per axis for anisotropic kernels."""
    betag_range: tuple[float, float] = (0.5, 4.0)
    """First-stage generalized-Gaussian shape range (half the draws below 1, half above)."""
    betap_range: tuple[float, float] = (1.0, 2.0)
    """First-stage plateau shape range (same rule: with (1, 2), beta = 1 half the time)."""

    kernel_list2: tuple[str, ...] = _X4PLUS_KERNELS
    """Second-stage blur kernel types."""
    kernel_prob2: tuple[float, ...] = _X4PLUS_KERNEL_PROB
    """Probability of each of `kernel_list2`."""
    sinc_prob2: float = 0.1
    """Second stage: probability of a sinc kernel instead of a blur kernel."""
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    """Second-stage kernel sigma range."""
    betag_range2: tuple[float, float] = (0.5, 4.0)
    """Second-stage generalized-Gaussian shape range."""
    betap_range2: tuple[float, float] = (1.0, 2.0)
    """Second-stage plateau shape range."""
    final_sinc_prob: float = 0.8
    """Probability that the final resize to the LQ size is followed by a sinc filter (else the identity)."""

    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    """First stage: probabilities of scaling up, down, or keeping the size (one choice per batch)."""
    resize_range: tuple[float, float] = (0.15, 1.5)
    """First-stage scale range: down draws in [low, 1], up draws in [1, high]."""
    gaussian_noise_prob: float = 0.5
    """First stage: probability of Gaussian noise (else Poisson), one choice per batch."""
    noise_range: tuple[float, float] = (1.0, 30.0)
    """First-stage Gaussian noise sigma range, in 8-bit levels, per sample."""
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    """First-stage Poisson noise scale range, per sample."""
    gray_noise_prob: float = 0.4
    """First stage: per-sample probability that the noise is the same on all channels."""
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    """First-stage JPEG quality range, per sample."""

    second_blur_prob: float = 0.8
    """Probability of the second-stage blur (one choice per batch)."""
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    """Second stage: probabilities of up, down, keep (relative to the LQ size)."""
    resize_range2: tuple[float, float] = (0.3, 1.2)
    """Second-stage scale range."""
    gaussian_noise_prob2: float = 0.5
    """Second stage: probability of Gaussian noise (else Poisson)."""
    noise_range2: tuple[float, float] = (1.0, 25.0)
    """Second-stage Gaussian noise sigma range (8-bit levels)."""
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    """Second-stage Poisson noise scale range."""
    gray_noise_prob2: float = 0.4
    """Second stage: per-sample probability of grey noise."""
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    """Second-stage JPEG quality range."""
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    """Interpolation modes, drawn uniformly for each resize."""
    bicubic_prob: float = 0.0
    """Probability that a row's LQ is instead the plain x`scale` downsampling of its GT (antialiased bicubic, 8-bit
    levels): a fine-tune of a model trained on clean bicubic LQ (the shipped `tiny-sr`) then keeps that skill."""

    queue_size: int = 180
    """Training-pair pool that mixes degradations across batches (Real-ESRGAN: 180); 0 turns it off. Rounded down
    to a multiple of the batch size."""
    gt_size: int | None = None
    """Paired random crop of (LQ, GT) after degradation, GT side; None keeps the loader's crop (no crop)."""
    usm: bool = False
    """Sharpen the GT with unsharp masking (x4plus sets this for its L1 and perceptual losses). As in Real-ESRGAN,
    the degradation then starts from the sharpened GT and the returned gt is sharpened; batch["hq"] stays plain."""
    usm_weight: float = 0.5
    """USM strength: sharp = img + weight * (img - blur(img))."""
    usm_radius: int = 50
    """USM Gaussian size (51 taps for 50, sigma from OpenCV's rule: 8)."""
    usm_threshold: float = 10.0
    """USM applies where |img - blur(img)| exceeds this many 8-bit levels (softened by the same blur)."""
    usm_separable: bool = True
    """Blur as two 1-D passes (2k taps per pixel) instead of Real-ESRGAN's dense k x k convolution; same result."""
    jpeg_backend: str = "fast"
    """"fast" (sana_sr.data.jpeg, hard rounding as libjpeg) or "kornia" (kornia's differentiable codec, slower)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # from YAML/JSON
                setattr(self, f.name, tuple(value))
        for name in ("blur_kernel_size", "min_kernel_size"):
            size = getattr(self, name)
            if size < 1 or size % 2 == 0:
                raise ValueError(f"DegradationConfig.{name} must be odd and positive, got {size}")
        if self.min_kernel_size > self.blur_kernel_size:
            raise ValueError(
                f"DegradationConfig.min_kernel_size {self.min_kernel_size} > blur_kernel_size {self.blur_kernel_size}"
            )
        if self.scale < 1:
            raise ValueError(f"DegradationConfig.scale must be >= 1, got {self.scale}")
        for suffix in ("", "2"):
            kinds, probs = getattr(self, "kernel_list" + suffix), getattr(self, "kernel_prob" + suffix)
            unknown = [k for k in kinds if k not in KERNEL_TYPES]
            if unknown:
                raise ValueError(f"DegradationConfig.kernel_list{suffix}: unknown {unknown} (known: {KERNEL_TYPES})")
            if len(kinds) != len(probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(
                    f"DegradationConfig.kernel_prob{suffix} needs {len(kinds)} probabilities summing to 1, got {probs}"
                )
        for name in ("resize_prob", "resize_prob2"):
            probs = getattr(self, name)
            if len(probs) != 3 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6) or min(probs) < 0:
                raise ValueError(f"DegradationConfig.{name} needs 3 probabilities (up, down, keep) summing to 1, "
                                 f"got {probs}")  # fmt: skip
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_prob") or f.name.endswith("_prob2"):
                if isinstance(value, float | int) and not 0 <= value <= 1:
                    raise ValueError(f"DegradationConfig.{f.name} must be in [0, 1], got {value}")
            if f.name.endswith(("range", "range2", "sigma", "sigma2")):
                if len(value) != 2 or value[0] > value[1] or value[0] < 0:
                    raise ValueError(f"DegradationConfig.{f.name} must be (low, high) with 0 <= low <= high, "
                                     f"got {value}")  # fmt: skip
        if not all(low <= 1 <= high for low, high in (self.resize_range, self.resize_range2)):
            raise ValueError("DegradationConfig.resize_range and resize_range2 must contain 1 (down below, up above)")
        for name in ("jpeg_range", "jpeg_range2"):
            low, high = getattr(self, name)
            if low < 1 or high > 100:
                raise ValueError(f"DegradationConfig.{name} must lie in [1, 100], got {(low, high)}")
        if self.jpeg_backend not in ("fast", "kornia"):
            raise ValueError(f"DegradationConfig.jpeg_backend must be 'fast' or 'kornia', got {self.jpeg_backend!r}")
        if self.queue_size < 0:
            raise ValueError(f"DegradationConfig.queue_size must be >= 0, got {self.queue_size}")
        if self.gt_size is not None and self.gt_size % self.scale:
            raise ValueError(f"DegradationConfig.gt_size {self.gt_size} is not a multiple of scale {self.scale}")
        bad_modes = [m for m in self.resize_modes if m not in ("area", "bilinear", "bicubic", "nearest")]
        if bad_modes or not self.resize_modes:
            raise ValueError(f"DegradationConfig.resize_modes: unknown {bad_modes} (use area, bilinear, bicubic)")
