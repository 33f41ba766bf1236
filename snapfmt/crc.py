"""CRC32C (Castagnoli) -- hardware accelerated via the `crc32c` package."""

from crc32c import crc32c as _crc32c


def crc32c(data, value: int = 0) -> int:
    """CRC32C of ``data`` (bytes-like), continuing from ``value``."""
    return _crc32c(data, value)
