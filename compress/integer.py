"""Integer execution on CPU: finalized quantized layers run through oneDNN's int8 kernels, not as dequantized floats.

Kernels (PyTorch's own, chosen by measurement: docs/compression.md, "Integer execution"):
  Linear             torch.ops.onednn.qlinear_pointwise   u8 activations x s8 weights, fp32 out
  Conv2d (any k, groups, incl. depthwise)  torch.ops.onednn.qconv_pointwise   u8 x s8, channels-last, fp32 out

The activation codes are the fake-quant path's codes, computed by the same operations, so the integer layer sees
exactly the integers the reference rounds to; only the float accumulation order differs. The stored grids do not
fit the kernels' conventions as they are, and three exact corrections make up the difference:
  - activations: x_fq = s·q + z with a float offset z (not an integer zero point), so the kernel gets q with
    zero point 0 and z·Σ W is added: a per-channel constant (folded into the kernel's bias) and, for a padded
    kxk conv, the window taps that fall on the padding (an edge strip, cached per input shape);
  - weights: codes c with a per-channel integer zero code zp; c − zp is the s8 weight when it fits (every width
    below 8 bits); at 8 bits c − 128 is (always s8) and s·s_w·(128 − zp)·Σ q over the window is added, with Σ q
    from one extra all-ones output per group in the same kernel call (linears, grouped convs) or from a second,
    all-ones kernel call with one output per group (dense and depthwise convs, where an extra output is slow);
  - oneDNN ignores per-channel weight zero points (measured: wrong results), hence the above.
A layer with no integer activation (full-precision input, e.g. the boundary layers), per-token activation grids
or an unsupported geometry runs dequantized (the fake-quant layer as it is); `to_integer` says which and why.
Matmul sites (attention) have no integer kernel here and stay fake-quantized.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .hadamard import rotate
from .layers import QuantMatmul, QuantWeightLayer, quant_modules, replace_module
from .quantizer import UniformQuantizer, quant_params

EXECUTIONS = ("fake-quant", "int")
# torch 2.14 deprecates the quantized tensor types (its issue 184982); quantize_per_tensor is still the one fused
# float -> uint8 rounding kernel (25 ms where the reference's elementwise passes take 96, measured at 128x256x256),
# so it is used while it exists, quietly, with the elementwise passes as the fallback once it is gone.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)
_FUSED_ROUNDING = hasattr(torch, "quantize_per_tensor")


def kernels_available() -> bool:
    """Whether this PyTorch build has the oneDNN int8 kernels (x86 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def integer_blocker(layer: QuantWeightLayer) -> str | None:
    """Why `layer` cannot run in integers (None: it can)."""
    if not layer.finalized:
        return "not finalized"
    if layer.aq is None:
        return "input not quantized (full-precision boundary layer)"
    if layer.aq.granularity != "tensor":
        return f"{layer.aq.granularity} activation grid (the kernels take one scale per tensor)"
    if layer.kind == "conv2d" and len(layer.weight_shape) != 4:
        return "not a 2-d convolution"
    if not kernels_available():
        return "no oneDNN int8 kernels in this PyTorch build"
    return None


_SCRATCH = threading.local()
SCRATCH_KEPT_BYTES = 256 * 2**20
"""The largest scratch buffer kept between calls (a 512² decoder tile's widest input is 128 MiB); larger inputs
(an untiled decode of a large image) get a tensor of their own, so no process holds gigabytes after one call."""


def _scratch(shape: torch.Size, channels_last: bool) -> torch.Tensor:
    """A float32 tensor of `shape` (channels-last if asked) on this thread's buffer, reused from call to call: a new
    activation-sized tensor for every layer's shifted input cost more than the add itself (page faults of a fresh
    mapping: 49 vs 9 ms at 1x128x512x512). Its contents live until the next call."""
    numel = math.prod(shape)
    buffer = getattr(_SCRATCH, "buffer", None)
    if numel * 4 > SCRATCH_KEPT_BYTES:
        buffer = torch.empty(numel)
    elif buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH.buffer = torch.empty(numel)
    if channels_last:
        n, c, h, w = shape
        return buffer[:numel].view(n, h, w, c).permute(0, 3, 1, 2)
    return buffer[:numel].view(shape)


class Grid:
    """A per-tensor activation grid (x_fq = s·q + z, q in 0..levels) in the form the fused rounding needs.

    torch.quantize_per_tensor computes round(x/s) + k for an integer k in 0..255; adding (−z/s − k)·s to x first
    makes that round((x − z)/s), the reference's code (a value within float error of a rounding tie may land on
    the other side). Codes clamped to 0..levels clip x to [z, z + levels·s], which is [lo, hi] unless the grid was
    corrected (CompSRT's δs, δz): then x is clipped to [lo, hi] first, as the reference does."""

    def __init__(self, quantizer: UniformQuantizer):
        with torch.no_grad():
            lo, hi = quantizer.bounds()
            ds, dz = quantizer._deltas(lo)
            scale, zero = quant_params(lo, hi, quantizer.bits, ds, dz, quantizer.scale_dtype)
        # The reference's one-element tensors, for the elementwise fallback (the very same operations).
        self.lo, self.hi, self.scale, self.zero = lo.clone(), hi.clone(), scale.clone(), zero.clone()
        self.levels = quantizer.levels
        self.s, self.z = float(scale), float(zero)
        self.k = min(max(round(-self.z / self.s), 0), 255)
        self.shift = (-self.z / self.s - self.k) * self.s
        self.clip_first = (abs(self.z - float(lo)) > 1e-6 * self.s
                           or abs(self.z + self.levels * self.s - float(hi)) > 1e-3 * self.s)

    def _shifted(self, x: torch.Tensor, clip: bool, channels_last: bool = False) -> torch.Tensor:
        """x + shift (after clipping x to [lo, hi] if asked), in the thread's scratch buffer."""
        shifted = _scratch(x.shape, channels_last)
        if clip:
            return torch.clamp(x, self.lo, self.hi, out=shifted).add_(self.shift)
        return torch.add(x, self.shift, out=shifted)

    def _quantized(self, x: torch.Tensor, clip: bool, channels_last: bool = False) -> torch.Tensor:
        return torch.quantize_per_tensor(self._shifted(x, clip, channels_last), self.s, self.k, torch.quint8)

    def codes(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """uint8 codes round((clip(x, lo, hi) − z)/s) in 0..levels (channels-last for a conv's input)."""
        if not _FUSED_ROUNDING:
            codes = torch.clamp(x, self.lo, self.hi).sub_(self.zero).div_(self.scale).round_() \
                .clamp_(0, self.levels).to(torch.uint8)
            return codes.contiguous(memory_format=torch.channels_last) if channels_last else codes
        q = self._quantized(x, self.clip_first, channels_last)
        # The quantized tensor's own bytes, seen as uint8: int_repr() would copy them (3.0 vs 1.2 ms a call).
        codes = torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())
        return codes.clamp_(max=self.levels) if self.levels < 255 else codes

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """s·q + z: the fake-quantized tensor, rounded by the fused quantize kernel and dequantized (0.12 ms on a
        1x16x256x300 tensor, where torch.fake_quantize_per_tensor_affine took 3.6 and the reference's elementwise
        passes 0.19; measured in torch 2.14)."""
        if not _FUSED_ROUNDING:
            return torch.clamp(x, self.lo, self.hi).sub_(self.zero).div_(self.scale).round_() \
                .clamp_(0, self.levels).mul_(self.scale).add_(self.zero)
        q = self._quantized(x, self.clip_first or self.levels < 255)  # within 0..levels once x is in [lo, hi]
        return q.dequantize().add_(self.z + self.k * self.s)


class FusedFakeQuantMatmul(nn.Module):
    """A QuantMatmul site as it is (float matmul of fake-quantized inputs), rounding through the fused kernel."""

    def __init__(self, site: QuantMatmul):
        super().__init__()
        self.rotate, self.abits = site.rotate, site.abits
        self.ga, self.gb = Grid(site.qa), Grid(site.qb)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.rotate:
            a, b = rotate(a, dim=-1), rotate(b, dim=-2)
        return torch.matmul(self.ga.fake_quant(a.float()).to(a.dtype), self.gb.fake_quant(b.float()).to(b.dtype))


def _window_indicator(out_len: int, in_len: int, k: int, stride: int, pad: int, dilation: int) -> torch.Tensor:
    """(out_len, k): 1 where tap a of output position i reads a real input position, 0 where it reads padding."""
    pos = torch.arange(out_len)[:, None] * stride - pad + torch.arange(k)[None] * dilation
    return ((pos >= 0) & (pos < in_len)).float()


class IntegerLayer(nn.Module):
    """A finalized QuantWeightLayer running as u8 x s8 -> fp32 through oneDNN (see the module docstring)."""

    def __init__(self, layer: QuantWeightLayer):
        super().__init__()
        blocker = integer_blocker(layer)
        if blocker is not None:
            raise ValueError(f"this layer cannot run in integers: {blocker}")
        self.kind, self.conv, self.rotate = layer.kind, dict(layer.conv), layer.rotate
        self.weight_shape, self.spec = layer.weight_shape, layer.spec
        out_channels = self.weight_shape[0]
        self.grid = Grid(layer.aq)
        with torch.no_grad():
            s, z = self.grid.s, self.grid.z
            codes, zp, w_scales = layer.codes, layer.zero_codes.long(), layer.scales.float()
            centered = codes.long() - zp[:, None]
            if centered.min() >= -128 and centered.max() <= 127:
                weight = centered.to(torch.int8)
                self.box = None
            else:  # 8-bit codes: c − 128 always fits s8; s·s_w·(128 − zp)·Σ q makes up the rest.
                weight = (codes.long() - 128).to(torch.int8)
                self.box = (w_scales * (128 - zp).float()).contiguous()
            # What z contributes through each tap, z·Σ_in s_w·(c − zp), summed in integers (no float weight made).
            per_tap = codes.view(out_channels, -1, *self.weight_shape[2:]).sum(1, dtype=torch.int64)
            per_tap = per_tap - zp.view(-1, *[1] * (per_tap.ndim - 1)) * self.weight_shape[1]
            taps = z * w_scales.view(-1, *[1] * (per_tap.ndim - 1)) * per_tap.float()  # (out,) or (out, kh, kw)
            bias = layer.bias.detach().float().clone() if layer.bias is not None else torch.zeros(out_channels)
            if self.kind == "linear":
                bias, self.edge_taps = bias + taps, None
            else:
                bias = bias + taps.sum((1, 2))
                padded = any(p > 0 for p in self.conv["padding"])
                self.edge_taps = taps.contiguous() if padded and z != 0 else None
            # Where the 8-bit remainder's code sums come from: one more output per group in the same call (linears,
            # grouped convs), or a separate all-ones call with one output per group (dense and depthwise convs:
            # an extra output took a 512-channel 3x3 conv from 95 to 163 ms and made a depthwise conv a
            # channel-multiplier-2 one, 12 ms instead of 0.26; the separate call costs 2.9 and 0.26 ms).
            separate_sums = self.box is not None and self.kind != "linear" and (self.groups == 1 or self.depthwise)
            self.sum_packed = None
            weight = weight.view(self.weight_shape)
            if self.box is None or separate_sums:
                self.bias = bias
            else:
                weight, w_scales, self.bias = self._with_sum_outputs(weight, w_scales, bias)
            if self.kind == "linear":
                self.packed = torch.ops.onednn.qlinear_prepack(weight, None)
            else:
                self.packed = self._conv_prepack(weight, w_scales, s)
                if separate_sums:
                    ones = torch.ones(self.groups, *weight.shape[1:], dtype=torch.int8)
                    self.sum_packed = self._conv_prepack(ones, torch.ones(self.groups), s)
                    self.sum_scales, self.sum_zero = torch.ones(self.groups), torch.zeros(self.groups, dtype=torch.long)
        self.w_scales = w_scales.contiguous()
        self.w_zero = torch.zeros(len(w_scales), dtype=torch.long)
        self._edges: dict[tuple[int, int], tuple] = {}

    @property
    def groups(self) -> int:
        return 1 if self.kind == "linear" else self.conv["groups"]

    @property
    def depthwise(self) -> bool:
        """One input and one output channel per group."""
        return self.groups > 1 and self.weight_shape[1] == 1 and self.weight_shape[0] == self.groups

    def _conv_prepack(self, weight: torch.Tensor, scales: torch.Tensor, s: float):
        c = self.conv
        # oneDNN picks its weight layout from an input shape: without one, 1x1 convs ran 25x slower (measured); any
        # concrete shape serves every input size (measured at 16..64 px).
        nominal = [1, self.weight_shape[1] * c["groups"], 32, 32]
        return torch.ops.onednn.qconv_prepack(weight, scales, s, 0, list(c["stride"]), list(c["padding"]),
                                              list(c["dilation"]), c["groups"], nominal)

    def _qconv(self, q: torch.Tensor, packed, scales: torch.Tensor, zeros: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        c = self.conv
        return torch.ops.onednn.qconv_pointwise(q, self.grid.s, 0, packed, scales, zeros, bias, list(c["stride"]),
                                                list(c["padding"]), list(c["dilation"]), c["groups"], 1.0, 0,
                                                torch.float32, "none", [], "")

    def _with_sum_outputs(self, weight: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor) -> tuple:
        """With the 8-bit remainder, one more output per group whose weights are all 1 (scale 1, bias 0): the kernel
        then also yields s·Σ q over what each output reads, in the same pass over the codes (with a separate sum of
        the codes, W8A8 ran 35 % (DiT) and 54 % (decoder) slower than W4A8 at sana-0.6b)."""
        if self.box is None:
            return weight, w_scales, bias
        groups = self.groups
        grouped = weight.unflatten(0, (groups, -1))
        ones = torch.ones(groups, 1, *weight.shape[1:], dtype=torch.int8)
        weight = torch.cat([grouped, ones], 1).flatten(0, 1).contiguous()
        w_scales = torch.cat([w_scales.view(groups, -1), torch.ones(groups, 1)], 1).flatten()
        bias = torch.cat([bias.view(groups, -1), torch.zeros(groups, 1)], 1).flatten()
        return weight, w_scales, bias

    def _add_remainder(self, out: torch.Tensor) -> torch.Tensor:
        """The kernel's outputs without the sum outputs, each plus s·Σq·s_w·(128 − zp) (linears, grouped convs)."""
        if self.kind == "linear":
            return torch.addcmul(out[:, :-1], out[:, -1:], self.box)
        parts = out.unflatten(1, (self.groups, -1))
        main, sums, box = parts[:, :, :-1], parts[:, :, -1:], self.box.view(1, self.groups, -1, 1, 1)
        if main.shape[2] == 1:  # the outputs as a strided view, updated in place: no new tensor
            return main.addcmul_(sums, box).flatten(1, 2)
        return torch.addcmul(main, sums, box).flatten(1, 2)

    # -- corrections ---------------------------------------------------------------------------------------------
    def _edge_strips(self, height: int, width: int) -> tuple:
        """(top, bottom, left, right) counts and the z-correction on the output's edge strips (interior: 0)."""
        key = (height, width)
        if key not in self._edges:
            c, (_, _, kh, kw) = self.conv, self.weight_shape
            h_out = (height + 2 * c["padding"][0] - c["dilation"][0] * (kh - 1) - 1) // c["stride"][0] + 1
            w_out = (width + 2 * c["padding"][1] - c["dilation"][1] * (kw - 1) - 1) // c["stride"][1] + 1
            rows = _window_indicator(h_out, height, kh, c["stride"][0], c["padding"][0], c["dilation"][0])
            cols = _window_indicator(w_out, width, kw, c["stride"][1], c["padding"][1], c["dilation"][1])
            full_rows, full_cols = rows.bool().all(1), cols.bool().all(1)
            top = int(full_rows.int().argmax()) if full_rows.any() else h_out
            bottom = h_out - top - int(full_rows.sum()) if full_rows.any() else 0
            left = int(full_cols.int().argmax()) if full_cols.any() else w_out
            right = w_out - left - int(full_cols.sum()) if full_cols.any() else 0
            interior = self.edge_taps.sum((1, 2))
            ring_rows = torch.cat([rows[:top], rows[h_out - bottom:]])
            # Top and bottom strips, full width; then left and right strips of the rows in between.
            horizontal = torch.einsum("ia,nab,jb->nij", ring_rows, self.edge_taps, cols) - interior[:, None, None]
            vertical = torch.einsum("nab,jb->nj", self.edge_taps, torch.cat([cols[:left], cols[w_out - right:]]))
            vertical = vertical - interior[:, None]
            self._edges[key] = (top, bottom, left, right, horizontal, vertical)
            if len(self._edges) > 4:
                self._edges.pop(next(iter(self._edges)))
        return self._edges[key]

    def _add_edges(self, out: torch.Tensor, height: int, width: int) -> None:
        top, bottom, left, right, horizontal, vertical = self._edge_strips(height, width)
        h_out, w_out = out.shape[-2:]
        if top:
            out[:, :, :top].add_(horizontal[:, :top])
        if bottom:
            out[:, :, h_out - bottom:].add_(horizontal[:, top:])
        inner = out[:, :, top:h_out - bottom]
        if left:
            inner[..., :left].add_(vertical[:, None, :left])
        if right:
            inner[..., w_out - right:].add_(vertical[:, None, left:])

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.rotate:
            x = rotate(x, dim=-1 if self.kind == "linear" else 1)
        q = self.grid.codes(x if x.dtype == torch.float32 else x.float(), channels_last=self.kind != "linear")
        s = self.grid.s
        if self.kind == "linear":
            lead = q.shape[:-1]
            q = q.reshape(-1, q.shape[-1])
            out = torch.ops.onednn.qlinear_pointwise(q, s, 0, self.packed, self.w_scales, self.w_zero, self.bias,
                                                     1.0, 0, torch.float32, "none", [], "")
            if self.box is not None:
                out = self._add_remainder(out)
            out = out.view(*lead, out.shape[-1])
            return out if dtype == torch.float32 else out.to(dtype)
        out = self._qconv(q, self.packed, self.w_scales, self.w_zero, self.bias)
        if self.sum_packed is not None:  # s·Σq per group from the all-ones kernel, times s_w·(128 − zp)
            sums = self._qconv(q, self.sum_packed, self.sum_scales, self.sum_zero, None)
            out.addcmul_(sums, self.box.view(1, -1, 1, 1))
        elif self.box is not None:
            out = self._add_remainder(out)
        if self.edge_taps is not None:
            self._add_edges(out, *x.shape[-2:])
        return out if dtype == torch.float32 else out.to(dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{self.kind}, weight={self.weight_shape}, w{s.wbits}a{s.abits}, oneDNN u8xs8, "
                f"rotate={self.rotate}, 8-bit remainder={self.box is not None}")


@dataclass
class IntegerSummary:
    """What `to_integer` did: layers per kernel, layers left dequantized (by reason), matmul sites left as they are."""

    integer: Counter = field(default_factory=Counter)
    dequantized: Counter = field(default_factory=Counter)
    dequantized_layers: list[str] = field(default_factory=list)
    matmuls: int = 0

    def __add__(self, other: IntegerSummary) -> IntegerSummary:
        return IntegerSummary(self.integer + other.integer, self.dequantized + other.dequantized,
                              self.dequantized_layers + other.dequantized_layers, self.matmuls + other.matmuls)

    def line(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.integer.items()))
        rest = "; ".join(f"{n} {why}" for why, n in self.dequantized.items())
        out = f"integer execution: {sum(self.integer.values())} layers on oneDNN int8 kernels ({kinds or 'none'})"
        out += f"; {sum(self.dequantized.values())} layers dequantized" + (f" ({rest})" if rest else "")
        return out + f"; {self.matmuls} matmul sites fake-quantized (no integer batched-matmul kernel here)"


@torch.no_grad()
def to_integer(model: nn.Module) -> IntegerSummary:
    """Swap every finalized QuantWeightLayer of `model` that has an integer kernel for an IntegerLayer (in place);
    the others stay as they are. The layer's codes are dropped as each one is converted: no float weight is made."""
    summary = IntegerSummary()
    for name, module in list(quant_modules(model)):
        if isinstance(module, QuantMatmul):
            summary.matmuls += 1
            if module.qa.granularity == "tensor" and _FUSED_ROUNDING:
                replace_module(model, name, FusedFakeQuantMatmul(module))
            continue
        blocker = integer_blocker(module)
        if blocker is not None:
            summary.dequantized[blocker] += 1
            summary.dequantized_layers.append(name)
            continue
        kind = module.kind if module.kind == "linear" else (
            "depthwise conv" if module.conv["groups"] == module.weight_shape[0] and module.conv["groups"] > 1
            else "conv")
        replace_module(model, name, IntegerLayer(module))
        summary.integer[kind] += 1
    return summary
