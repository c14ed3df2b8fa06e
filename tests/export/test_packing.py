import numpy as np
import pytest
import torch

from zsq.errors import ZsqError
from zsq.export.packing import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_roundtrip_random_lengths(bits, signed):
    """Property-style: random codes of every width, lengths not divisible by the pack factor."""
    g = torch.Generator().manual_seed(bits * 2 + signed)
    qmin = -(2 ** (bits - 1)) if signed else 0
    for n in (1, 2, 3, 5, 7, 8, 9, 15, 17, 63, 1001):
        codes = torch.randint(qmin, qmin + 2 ** bits, (n,), generator=g, dtype=torch.int32)
        packed = pack_codes(codes, bits, qmin)
        assert packed.dtype == torch.uint8
        assert packed.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
        assert torch.equal(unpack_codes(packed, bits, qmin, n), codes)


def test_extremes_and_layout():
    # the full range survives, including qmin and qmax
    for bits in range(2, 9):
        codes = torch.tensor([0, 2 ** bits - 1] * 5, dtype=torch.int32)
        assert torch.equal(unpack_codes(pack_codes(codes, bits, 0), bits, 0, 10), codes)
    # 4-bit: two codes per byte, low nibble first
    assert pack_codes(torch.tensor([1, 2, 15]), 4, 0).tolist() == [0x21, 0x0F]
    # 3-bit stream straddles bytes: codes 5,3,7 -> bits 101|110|111 (LSB first) -> 0b11011101, 0b1
    assert pack_codes(torch.tensor([5, 3, 7]), 3, 0).tolist() == [0b11011101, 0b1]
    # signed codes are stored offset by qmin
    assert pack_codes(torch.tensor([-8, 7]), 4, -8).tolist() == [0xF0]


def test_multidim_input_is_flattened():
    codes = torch.arange(-4, 4, dtype=torch.int32).reshape(2, 2, 2)
    out = unpack_codes(pack_codes(codes, 3, -4), 3, -4, 8)
    assert torch.equal(out.reshape(2, 2, 2), codes)


def test_bad_inputs():
    with pytest.raises(ZsqError, match="outside"):
        pack_codes(torch.tensor([0, 16]), 4, 0)
    with pytest.raises(ZsqError, match="outside"):
        pack_codes(torch.tensor([-9]), 4, -8)
    with pytest.raises(ZsqError, match="expected"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 0, 7)
    with pytest.raises(ZsqError, match="bits"):
        pack_codes(torch.tensor([0]), 9, 0)
