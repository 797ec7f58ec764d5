"""Orthonormal Hadamard rotation by a fast Walsh–Hadamard transform (FWHT), with power-of-two padding.

H_n (Sylvester order, scaled by 1/sqrt(n)) is symmetric and orthogonal, so H_n H_n = I: the same transform undoes
itself. A size that is not a power of two is zero-padded to the next one first; the rotation is then an isometry
from R^d into R^n and `unrotate` (transform, then crop) inverts it exactly up to float rounding.
For a matmul, rotating both operands along the contracted dimension leaves the product unchanged:
(x H)(W H)^T = x H H^T W^T = x W^T, which is what lets CompSRT quantize x H and W H instead of x and W.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    if n < 1:
        raise ValueError(f"size must be >= 1, got {n}")
    return 1 << (n - 1).bit_length()


_RADIX_BITS = 4  # 16-point butterflies: log16(n) passes over memory instead of log2(n) (5x faster on a CPU)
_KERNELS: dict[tuple, torch.Tensor] = {}


def _butterfly(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The unnormalised ±1 Hadamard block of one radix stage (at most 16 x 16)."""
    key = (size, dtype, str(device))
    if key not in _KERNELS:
        _KERNELS[key] = (hadamard_matrix(size) * math.sqrt(size)).to(dtype=dtype, device=device)
    return _KERNELS[key]


def fwht(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform along `dim`, whose size must be a power of two; differentiable.

    A mixed-radix fast transform: H_n = H_16 ⊗ H_16 ⊗ … ⊗ H_r (Sylvester's construction is a Kronecker power), so
    the vector is viewed as a small tensor with one axis per factor and each axis gets its 16-point (or smaller)
    butterfly — O(n·16·log16 n) work, never an n x n matrix.
    """
    n = x.shape[dim]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two size along dim {dim}, got {n}: pad first (see `rotate`)")
    moved = x.movedim(dim, -1)
    lead = moved.shape[:-1]
    bits = n.bit_length() - 1
    factors = [1 << _RADIX_BITS] * (bits // _RADIX_BITS) + ([1 << bits % _RADIX_BITS] if bits % _RADIX_BITS else [])
    y = moved.reshape(-1, *factors) if factors else moved.reshape(-1, 1)
    for _ in factors:
        size = y.shape[-1]
        y = (y.reshape(-1, size) @ _butterfly(size, y.dtype, y.device)).view(y.shape)
        if len(factors) > 1:
            # Cycle the axes: the next factor's axis comes last; after all stages the order is the original one.
            y = y.movedim(-1, 1).contiguous()
    return (y.reshape(*lead, n) * (1.0 / math.sqrt(n))).movedim(-1, dim)


def pad_to_pow2(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Zero-pad `dim` up to the next power of two (a no-op when it already is one)."""
    n = x.shape[dim]
    extra = next_pow2(n) - n
    if extra == 0:
        return x
    dim = dim % x.ndim
    # F.pad lists (left, right) pairs from the last dimension backwards.
    pad = [0, 0] * (x.ndim - 1 - dim) + [0, extra]
    return F.pad(x, pad)


def rotate(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Pad `dim` to a power of two n and apply H_n: R^d -> R^n, an isometry."""
    return fwht(pad_to_pow2(x, dim), dim)


def unrotate(y: torch.Tensor, size: int, dim: int = -1) -> torch.Tensor:
    """Inverse of `rotate` for an original size `size`: apply H_n again (it is its own inverse) and crop."""
    return fwht(y, dim).narrow(dim, 0, size)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense orthonormal Sylvester Hadamard matrix (the reference the tests compare `fwht` with)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)
