"""Bit packing: n-bit unsigned codes (n = 1..8) into a dense little-endian bit stream of bytes, and back.

Value i occupies bits [i·n, (i+1)·n) of the stream, least significant bit first; the last byte is zero-padded.
So 3-bit codes cost exactly 3 bits each (no 4-bit slots), and a 1-bit mask costs 1 bit per weight.
Work is chunked so that a large model never needs more than a few MiB of scratch per step.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 20  # values per step; a multiple of 8, so every chunk ends on a byte boundary


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer `values` (any shape, each in [0, 2^bits)) into a 1-D uint8 tensor of ceil(N·bits/8) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = values.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values in [{int(flat.min())}, {int(flat.max())}] do not fit in {bits} bits")
    flat = flat.to(torch.uint8)
    if 8 % bits == 0:
        return _pack_aligned(flat, bits)
    shifts = torch.arange(bits, dtype=torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.int32))
    out = []
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        stream = ((chunk[:, None] >> shifts) & 1).reshape(-1)
        pad = -stream.numel() % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` values as a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    need = packed_nbytes(count, bits)
    if packed.numel() < need:
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} values of {bits} bits ({need} bytes needed)")
    packed = packed.reshape(-1).to(torch.uint8)
    if 8 % bits == 0:
        return _unpack_aligned(packed[:need], bits, count)
    byte_shifts = torch.arange(8, dtype=torch.uint8)
    value_weights = (1 << torch.arange(bits, dtype=torch.int32))
    out = []
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first_byte = start * bits // 8  # exact: chunk starts are multiples of 8 values
        chunk = packed[first_byte:first_byte + packed_nbytes(n, bits)]
        stream = ((chunk[:, None] >> byte_shifts) & 1).reshape(-1)[: n * bits]
        out.append((stream.view(n, bits).to(torch.int32) * value_weights).sum(1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def _pack_aligned(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """The same stream when a byte holds whole values (1, 2, 4, 8 bits): value m of byte j sits at bit m·bits."""
    per_byte = 8 // bits
    pad = -flat.numel() % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.view(-1, per_byte)
    out = lanes[:, 0].clone()
    for m in range(1, per_byte):
        out |= lanes[:, m] << (m * bits)
    return out


def _unpack_aligned(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per_byte, mask = 8 // bits, (1 << bits) - 1
    lanes = torch.stack([(packed >> (m * bits)) & mask for m in range(per_byte)], dim=1)
    return lanes.reshape(-1)[:count].contiguous()
