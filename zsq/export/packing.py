"""Bit-packing of integer weight codes: what makes a 4-bit checkpoint 8x smaller than FP32.

Codes of width b (2..8 bits) are offset to unsigned (u = q - qmin, so u in [0, 2^b - 1]) and
written as one little-endian bit stream: code i occupies bits [i*b, (i+1)*b) of the stream, least
significant bit first. Two 4-bit codes share a byte (low nibble first); odd widths (3, 5, 6, 7)
straddle byte boundaries, so n codes take exactly ceil(n*b/8) bytes.
"""
from __future__ import annotations

import numpy as np
import torch

from zsq.errors import ZsqError


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by n codes of the given width."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ZsqError(f"can only pack 1..8-bit codes, got bits={bits!r}")


def pack_codes(codes: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Pack integer codes in [qmin, qmin + 2^bits - 1] into a flat uint8 tensor."""
    _check_bits(bits)
    u = codes.detach().reshape(-1).to(torch.int64) - int(qmin)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << bits):
        raise ZsqError(f"codes outside the {bits}-bit range starting at {qmin}: "
                       f"[{int(u.min()) + qmin}, {int(u.max()) + qmin}]")
    u8 = u.to(torch.uint8).numpy()
    if bits == 8:
        return torch.from_numpy(u8.copy())
    # (n, 8) bit matrix, keep the low `bits` columns, then one little-endian stream
    bitmat = np.unpackbits(u8[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(bitmat.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, qmin: int, numel: int) -> torch.Tensor:
    """Inverse of pack_codes: int32 codes (flat, numel long)."""
    _check_bits(bits)
    data = packed.detach().reshape(-1).to(torch.uint8).numpy()
    if data.size != packed_nbytes(numel, bits):
        raise ZsqError(f"packed buffer holds {data.size} bytes, expected {packed_nbytes(numel, bits)} "
                       f"for {numel} codes of {bits} bits")
    if bits == 8:
        u = data.astype(np.int32)
    else:
        stream = np.unpackbits(data, bitorder="little")[: numel * bits].reshape(numel, bits)
        full = np.zeros((numel, 8), dtype=np.uint8)
        full[:, :bits] = stream
        u = np.packbits(full, axis=1, bitorder="little")[:, 0].astype(np.int32)
    return torch.from_numpy(u) + int(qmin)
