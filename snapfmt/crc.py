"""CRC32C (Castagnoli) -- hardware accelerated via the `crc32c` package.

``crc32c_zeros`` extends a CRC over a run of zero bytes in O(log n) without
reading them (the GF(2) operator trick of zlib's crc32_combine), so deep
verification of sparse guest RAM skips the holes.
"""

from __future__ import annotations

import os
from functools import lru_cache

from crc32c import crc32c as _crc32c

_POLY = 0x82F63B78   # reflected Castagnoli polynomial


def crc32c(data, value: int = 0) -> int:
    """CRC32C of ``data`` (bytes-like), continuing from ``value``."""
    return _crc32c(data, value)


def _times(mat: tuple, vec: int) -> int:
    s = 0
    i = 0
    while vec:
        if vec & 1:
            s ^= mat[i]
        vec >>= 1
        i += 1
    return s


def _square(mat: tuple) -> tuple:
    return tuple(_times(mat, mat[n]) for n in range(32))


@lru_cache(maxsize=None)
def _zeros_op(power: int) -> tuple:
    """Operator that feeds 2**power zero BYTES through the raw CRC register."""
    if power == 0:
        # one zero bit operator, squared 3 times -> one zero byte
        odd = [_POLY] + [1 << n for n in range(31)]
        op = tuple(odd)
        for _ in range(3):
            op = _square(op)
        return op
    prev = _zeros_op(power - 1)
    return _square(prev)


_ZEROS = bytes(1 << 20)


def crc32c_zeros(value: int, n: int) -> int:
    """``crc32c(bytes(n), value)`` without touching n bytes."""
    if n <= 0:
        return value
    if n <= len(_ZEROS):          # short runs: the CRC instruction is faster than the algebra
        return _crc32c(memoryview(_ZEROS)[:n], value)
    reg = value ^ 0xFFFFFFFF          # undo the final xor: raw register
    p = 0
    while n:
        if n & 1:
            reg = _times(_zeros_op(p), reg)
        n >>= 1
        p += 1
    return reg ^ 0xFFFFFFFF


def crc32c_file_range(fd: int, buf, offset: int, length: int) -> int:
    """CRC32C of file bytes [offset, offset+length), skipping holes (SEEK_DATA/HOLE).

    ``buf`` is a bytes-like view of the whole file (mmap) used for data extents.
    """
    end = offset + length
    crc = 0
    pos = offset
    mv = memoryview(buf)
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:          # ENXIO: no data after pos -> rest is a hole
            data = end
        data = min(data, end)
        if data > pos:
            crc = crc32c_zeros(crc, data - pos)
            pos = data
            if pos >= end:
                break
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        crc = _crc32c(mv[pos:hole], crc)
        pos = hole
    return crc
