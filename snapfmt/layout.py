"""On-disk container layout of snapfmt v1: header and section table.

This module is the single source of truth for the container: the C shim's
``shim/snapfmt_layout.h`` and the byte tables in ``spec/FORMAT.md`` are
generated from it (``make generate``).  All integers are little-endian.
"""

from __future__ import annotations

import construct as c


# --- identity and versions -------------------------------------------------

MAGIC = b"SNAPFMT\x00"
#: Version this code writes.
VERSION = (1, 0)
#: Oldest version a file we write can be read by (written as compat_version).
COMPAT_VERSION = (1, 0)
#: Oldest file version this reader still reads.
READER_MIN_VERSION = (1, 0)

ARCH_X86_64 = 1
ARCH_AARCH64 = 2
ARCH_NAMES = {ARCH_X86_64: "x86_64", ARCH_AARCH64: "aarch64"}
ARCH_IDS = {v: k for k, v in ARCH_NAMES.items()}

PAGE_SIZES = (4096, 16384, 65536)

# --- header flags ------------------------------------------------------------
# Low 16 bits: a reader that does not know a set bit must refuse the file.
# High 16 bits: informational; unknown ones are ignored (and preserved).
HDR_F_TEMPLATE = 1 << 0      # a fork template: the QUIESCED rule applies
HDR_F_DIFF_LAYER = 1 << 1    # RAM holds only dirty pages over a parent (reserved)
HDR_F_KNOWN_REQUIRED = HDR_F_TEMPLATE | HDR_F_DIFF_LAYER
HDR_F_REQUIRED_MASK = 0x0000FFFF

# --- section flags -----------------------------------------------------------
SEC_F_CRITICAL = 1 << 0      # a reader that does not know the type must refuse
SEC_F_BULK = 1 << 1          # page-aligned bulk data (guest RAM); CRC checked on deep verify
SEC_F_KNOWN = SEC_F_CRITICAL | SEC_F_BULK

# --- hard limits -------------------------------------------------------------
HEADER_SIZE = 64             # v1.0 header size; header_len may be larger (must be zero-filled)
MAX_HEADER_LEN = 4096
MAX_SECTIONS = 65536
SECTION_ALIGN = 8
MAX_STATE_SECTION_LEN = 1 << 30      # any non-bulk section
MAX_FILE_SIZE = 1 << 48

Header = c.Struct(
    "magic" / c.Bytes(8),                 # b"SNAPFMT\0"
    "header_len" / c.Int32ul,             # size of this header in bytes (>= 64, multiple of 8, <= 4096)
    "version_major" / c.Int16ul,          # format version of the writer
    "version_minor" / c.Int16ul,
    "compat_major" / c.Int16ul,           # last compatible version: oldest reader version that can read the file
    "compat_minor" / c.Int16ul,
    "arch" / c.Int16ul,                   # 1 = x86_64, 2 = aarch64
    "reserved0" / c.Int16ul,              # must be 0
    "page_size" / c.Int32ul,              # guest page size: 4096, 16384 or 65536
    "flags" / c.Int32ul,                  # HDR_F_*; low 16 bits must-understand
    "section_count" / c.Int32ul,          # entries in the section table (<= 65536)
    "table_entry_size" / c.Int32ul,       # size of one table entry (32 in v1)
    "table_offset" / c.Int64ul,           # byte offset of the section table (8-aligned)
    "file_size" / c.Int64ul,              # total file size in bytes
    "header_crc32c" / c.Int32ul,          # CRC32C of header_len bytes with this field zeroed
    "table_crc32c" / c.Int32ul,           # CRC32C of the section table
)

TableEntry = c.Struct(
    "type" / c.Int32ul,                   # section type id (SECTION TYPES table)
    "instance" / c.Int32ul,               # vCPU index, device index, chip id, RAM blob id; 0 otherwise
    "version" / c.Int16ul,                # section layout version (per type)
    "flags" / c.Int16ul,                  # SEC_F_*
    "crc32c" / c.Int32ul,                 # CRC32C of the section bytes
    "offset" / c.Int64ul,                 # byte offset in the file (8-aligned; page-aligned if BULK)
    "length" / c.Int64ul,                 # length in bytes (multiple of page_size if BULK)
)

TABLE_ENTRY_SIZE = TableEntry.sizeof()
assert Header.sizeof() == HEADER_SIZE and TABLE_ENTRY_SIZE == 32

# Offsets used by readers and error messages.
HEADER_FIELD_OFFSETS = {}
_off = 0
for _sc in Header.subcons:
    HEADER_FIELD_OFFSETS[_sc.name] = _off
    _off += _sc.sizeof()
TABLE_FIELD_OFFSETS = {}
_off = 0
for _sc in TableEntry.subcons:
    TABLE_FIELD_OFFSETS[_sc.name] = _off
    _off += _sc.sizeof()
del _off, _sc

__all__ = [n for n in dir() if not n.startswith("_") and n not in ("c", "annotations")]

# --- error codes shared by the Python reader and the C shim ------------------
# (C: SNAPFMT_ERR_<NAME> = -value; Python: SnapfmtError.code = name.lower() with '_' -> '-')
ERROR_CODES = [
    ("TRUNCATED", 1, "input ends before a structure it declares"),
    ("BADMAGIC", 2, "bad magic: not a snapfmt file"),
    ("BADHEADER", 3, "malformed header field"),
    ("BADVERSION", 4, "format version not supported by this reader"),
    ("BADARCH", 5, "unknown architecture"),
    ("BADFLAGS", 6, "unknown must-understand flag set"),
    ("LIMIT", 7, "count or length exceeds a hard limit"),
    ("BADOFFSET", 8, "offset/length outside the file"),
    ("BADALIGN", 9, "misaligned section"),
    ("OVERLAP", 10, "sections overlap"),
    ("DUPLICATE", 11, "duplicate (type, instance) section"),
    ("BADCRC", 12, "CRC32C mismatch"),
    ("UNKNOWN_CRITICAL", 13, "critical section of unknown type or version"),
    ("BADLENGTH", 14, "section length inconsistent with its declared layout"),
    ("NOTFOUND", 15, "section not found"),
    ("IO", 16, "I/O error (see errno)"),
    ("NOMEM", 17, "out of memory"),
    ("INVAL", 18, "invalid argument"),
    ("CHANGED", 19, "backing file changed since the snapshot or is writable"),
    ("KVM", 20, "KVM ioctl failed (see errno)"),
    ("BADVALUE", 21, "field value out of range"),
]


def error_code_name(name: str) -> str:
    """C enum suffix -> Python error code string (BADCRC -> 'bad-crc')."""
    mapping = {"BADMAGIC": "bad-magic", "BADHEADER": "bad-header", "BADVERSION": "bad-version",
               "BADARCH": "bad-arch", "BADFLAGS": "bad-flags", "BADOFFSET": "bad-offset",
               "BADALIGN": "bad-align", "BADCRC": "bad-crc", "BADLENGTH": "bad-length",
               "BADVALUE": "bad-value"}
    return mapping.get(name, name.lower().replace("_", "-"))
