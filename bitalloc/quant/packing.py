"""Bit packing of k-bit codes (k = 1..8) into uint8, little-endian within each byte group.

Eight k-bit codes fill exactly k bytes, so a stream of n codes takes ceil(n*k/8) bytes.
Work goes in chunks so that packing a 28672x8192 matrix needs no GB-sized temporaries.
"""

from __future__ import annotations

import math

import torch

_CHUNK_WORDS = 1 << 20  # groups of 8 codes handled at once


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take once packed."""
    return math.ceil(count * bits / 8)


def _word_dtype(bits: int) -> torch.dtype:
    # 8 codes make an 8*bits-bit word; int32 wraps harmlessly up to 32 bits (bits are masked)
    return torch.int32 if bits <= 4 else torch.int64


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor of ceil(n*bits/8) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes: bits must be 1..8")
    flat = codes.reshape(-1).to(torch.uint8)
    count = flat.numel()
    if bits == 8:
        return flat.clone()
    words = math.ceil(count / 8)
    flat = torch.nn.functional.pad(flat, (0, words * 8 - count)).reshape(words, 8)
    out = torch.empty(words, bits, dtype=torch.uint8, device=flat.device)
    wide = _word_dtype(bits)
    shifts = torch.arange(8, device=flat.device, dtype=wide) * bits
    byte_shifts = torch.arange(bits, device=flat.device, dtype=wide) * 8
    for start in range(0, words, _CHUNK_WORDS):
        chunk = flat[start : start + _CHUNK_WORDS].to(wide)
        word = (chunk << shifts).sum(dim=1, dtype=wide)
        out[start : start + _CHUNK_WORDS] = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.reshape(-1)[: packed_size(count, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` codes as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot unpack {bits}-bit codes: bits must be 1..8")
    flat = packed.reshape(-1).to(torch.uint8)
    if flat.numel() < packed_size(count, bits):
        raise ValueError(f"packed buffer too short: {flat.numel()} bytes for {count} {bits}-bit codes")
    if bits == 8:
        return flat[:count].clone()
    words = math.ceil(count / 8)
    flat = torch.nn.functional.pad(flat, (0, words * bits - flat.numel()))[: words * bits]
    flat = flat.reshape(words, bits)
    out = torch.empty(words, 8, dtype=torch.uint8, device=flat.device)
    wide = _word_dtype(bits)
    shifts = torch.arange(8, device=flat.device, dtype=wide) * bits
    byte_shifts = torch.arange(bits, device=flat.device, dtype=wide) * 8
    mask = (1 << bits) - 1
    for start in range(0, words, _CHUNK_WORDS):
        chunk = flat[start : start + _CHUNK_WORDS].to(wide)
        word = (chunk << byte_shifts).sum(dim=1, dtype=wide)
        out[start : start + _CHUNK_WORDS] = ((word.unsqueeze(1) >> shifts) & mask).to(torch.uint8)
    return out.reshape(-1)[:count]
