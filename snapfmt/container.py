"""Reading and writing snapfmt containers (spec/FORMAT.md, "Container").

Reading follows the normative check order of the spec, so the first problem
found is the same one the C shim reports, with the same error code.
Sections are parsed lazily; files are read through ``mmap``.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Iterator

import numpy as np

from . import layout as L
from . import registry
from .atomic import atomic_file
from .crc import crc32c, crc32c_file_range
from .decl import dtype_of
from .errors import (ChecksumError, EncodeError, FormatError, LimitError, SnapfmtOSError,
                     TruncatedError, UnknownSectionError, VersionError)

_HDR = struct.Struct("<8sIHHHHHHIIIIQQII")
assert _HDR.size == L.HEADER_SIZE
TABLE_DTYPE = dtype_of(L.TableEntry)
_HO = L.HEADER_FIELD_OFFSETS
_TO = L.TABLE_FIELD_OFFSETS


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def _range_inside(off: int, length: int, lo: int, hi: int) -> bool:
    """[off, off+length) within [lo, hi) -- integers are unbounded here, no overflow."""
    return lo <= off and off + length <= hi


class Section:
    """One entry of the section table plus (lazy) access to its bytes."""

    __slots__ = ("snapshot", "index", "type_id", "instance", "version", "flags",
                 "crc32c", "offset", "length", "_data", "_fields", "_kind")

    def __init__(self, snapshot, index, type_id, instance, version, flags, crc, offset, length,
                 data=None):
        self.snapshot = snapshot
        self.index = index
        self.type_id = type_id
        self.instance = instance
        self.version = version
        self.flags = flags
        self.crc32c = crc
        self.offset = offset
        self.length = length
        self._data = data
        self._fields = None
        self._kind = registry._BY_ID.get(type_id) if registry._loaded else registry.by_id(type_id)

    @property
    def kind(self) -> registry.SectionKind | None:
        return self._kind

    @property
    def name(self) -> str:
        k = self.kind
        return k.name if k else f"unknown-0x{self.type_id:08x}"

    @property
    def label(self) -> str:
        """Human location, e.g. ``x86.regs[vcpu 0]``."""
        k = self.kind
        scope = k.scope if k else "instance"
        word = {"vcpu": "vcpu ", "device": "dev ", "ram": "blob "}.get(scope, "")
        return f"{self.name}[{word}{self.instance}]"

    @property
    def critical(self) -> bool:
        return bool(self.flags & L.SEC_F_CRITICAL)

    @property
    def bulk(self) -> bool:
        return bool(self.flags & L.SEC_F_BULK)

    @property
    def data(self) -> memoryview:
        if self._data is None:
            # a memoryview slice of the mmap: zero-copy (slicing the mmap itself copies)
            self._data = memoryview(self.snapshot._buf)[self.offset:self.offset + self.length]
        return memoryview(self._data)

    @property
    def record(self):
        """Zero-copy numpy structured record of a fixed-size section (kernel field names).

        Much faster than :attr:`fields` for checks; None when the kind has no
        flat dtype (unions) or is unknown.
        """
        k = self.kind
        dt = k.dtype if k is not None else None
        if dt is None or self.length != dt.itemsize:
            return None
        return np.frombuffer(self.data, dtype=dt, count=1)[0]

    def crc_ok(self) -> bool:
        return crc32c(self.data) == self.crc32c

    @property
    def fields(self):
        """Decoded named fields (cached).  Raises FormatError on bad bytes."""
        if self._fields is None:
            k = self.kind
            if k is None:
                raise FormatError("unknown section type: no declaration to decode it",
                                  section=self.label)
            try:
                if k.name == "ram":
                    self._fields = k.decode_fn(bytes(self.data), self.snapshot.page_size)
                else:
                    self._fields = k.decode(self.data)
            except FormatError as e:
                if e.section is None or not e.section.startswith(k.name):
                    e.section = self.label
                elif e.section == k.name:
                    e.section = self.label
                if e.offset is not None and self.offset is not None and not getattr(e, "_abs", False):
                    e.offset += self.offset
                    e._abs = True
                raise
        return self._fields

    def __repr__(self) -> str:
        return (f"<Section {self.label} v{self.version} flags=0x{self.flags:x} "
                f"off={self.offset} len={self.length}>")


class Snapshot:
    """A snapfmt image: header values plus an ordered list of sections."""

    def __init__(self, arch: str = "x86_64", page_size: int = 4096, flags: int = 0,
                 version=L.VERSION, compat_version=L.COMPAT_VERSION):
        if arch not in L.ARCH_IDS:
            raise EncodeError(f"unknown architecture {arch!r} (known: {', '.join(L.ARCH_IDS)})",
                              section="header", field="arch")
        if page_size not in L.PAGE_SIZES:
            raise EncodeError(f"page size {page_size} not one of {L.PAGE_SIZES}",
                              section="header", field="page_size")
        if not isinstance(flags, int) or not 0 <= flags < 1 << 32:
            raise EncodeError(f"flags {flags!r} is not a u32", section="header", field="flags")
        for name, v in (("version", version), ("compat_version", compat_version)):
            if len(tuple(v)) != 2 or not all(isinstance(x, int) and 0 <= x < 1 << 16 for x in v):
                raise EncodeError(f"{name} {v!r} is not (u16, u16)", section="header",
                                  field=name)
        self.arch = arch
        self.page_size = page_size
        self.flags = flags
        self.version = tuple(version)
        self.compat_version = tuple(compat_version)
        self.header_len = L.HEADER_SIZE
        self.sections: list[Section] = []
        self.path: str | None = None
        self.file_size: int | None = None
        self._buf = None      # mmap or bytes when loaded
        self._mmap = None
        self._crc_failures: list[FormatError] = []
        self._fd: int | None = None   # file descriptor kept for SEEK_DATA/SEEK_HOLE

    # ------------------------------------------------------------------ access
    def _index(self) -> dict:
        idx = self.__dict__.get("_idx")
        if idx is None or idx[0] is not self.sections or idx[1] != len(self.sections):
            by_key, by_type = {}, {}
            for s in self.sections:
                by_key[(s.type_id, s.instance)] = s
                by_type.setdefault(s.type_id, []).append(s)
            idx = (self.sections, len(self.sections), by_key, by_type)
            self.__dict__["_idx"] = idx
        return idx

    def find(self, what, instance: int = 0) -> Section | None:
        return self._index()[2].get((_type_id(what), instance))

    def all(self, what) -> list[Section]:
        return list(self._index()[3].get(_type_id(what), ()))

    def __iter__(self) -> Iterator[Section]:
        return iter(self.sections)

    @property
    def vcpu_indices(self) -> list[int]:
        return sorted({s.instance for s in self.sections
                       if s.kind is not None and s.kind.scope == registry.SCOPE_VCPU})

    @property
    def is_template(self) -> bool:
        return bool(self.flags & L.HDR_F_TEMPLATE)

    @property
    def metadata(self) -> dict | None:
        s = self.find("metadata")
        return s.fields if s is not None else None

    def memory_regions(self) -> list[dict]:
        s = self.find("memory_layout")
        return list(s.fields["regions"]) if s is not None else []

    def guest_ram(self, gpa: int, length: int) -> np.ndarray:
        """Zero-copy numpy uint8 view of guest RAM [gpa, gpa+length)."""
        from .sections_core import MEM_BACKING_SECTION
        if self.flags & L.HDR_F_DIFF_LAYER:
            raise FormatError("guest RAM of a diff layer holds only its dirty pages, packed: "
                              "not addressable by guest address", section="ram",
                              hint="`snapfmt rebase` it onto its parent first")
        for r in self.memory_regions():
            base, size = r["guest_phys_addr"], r["memory_size"]
            if base <= gpa and gpa + length <= base + size:
                if r["backing"] != MEM_BACKING_SECTION:
                    raise FormatError(f"guest range [0x{gpa:x}, 0x{gpa + length:x}) is in a "
                                      f"region not stored in this file", section="memory_layout")
                sec = self.find("ram", r["section_instance"])
                if sec is None:
                    raise FormatError(f"RAM section {r['section_instance']} referenced by the "
                                      f"memory layout is missing", section="memory_layout",
                                      field="section_instance", code="notfound")
                start = gpa - base
                if start + length > sec.length:
                    raise FormatError(f"guest range [0x{gpa:x}, 0x{gpa + length:x}) beyond the "
                                      f"{sec.length}-byte RAM blob", section=sec.label,
                                      code="bad-length")
                return np.frombuffer(sec.data, dtype=np.uint8, count=length, offset=start)
        raise FormatError(f"guest range [0x{gpa:x}, 0x{gpa + length:x}) not inside one RAM "
                          f"region", section="memory_layout", code="bad-offset")

    # ---------------------------------------------------------------- building
    def add(self, what, instance: int = 0, data=None, *, fields=None, flags: int | None = None,
            version: int | None = None) -> Section:
        tid = _type_id(what)
        for name, v, bits in (("type", tid, 32), ("instance", instance, 32),
                              ("version", version, 16), ("flags", flags, 16)):
            if v is not None and (not isinstance(v, int) or not 0 <= v < 1 << bits):
                raise EncodeError(f"{name} {v!r} is not a u{bits}", section=str(what),
                                  field=name)
        kind = registry.by_id(tid)
        if (data is None) == (fields is None):
            raise EncodeError("give exactly one of data= or fields=", section=str(what))
        if data is None:
            if kind is None:
                raise EncodeError(f"unknown section type {what!r}: pass raw data=",
                                  section=str(what))
            data = kind.encode(fields)
        data = bytes(data)
        if flags is None:
            flags = 0
            if kind is None or kind.critical:
                flags |= L.SEC_F_CRITICAL
            if kind is not None and kind.bulk:
                flags |= L.SEC_F_BULK
        if version is None:
            version = kind.version if kind else 1
        if self.find(tid, instance) is not None:
            raise EncodeError(f"section ({what}, {instance}) already present",
                              section=str(what), code="duplicate")
        if flags & L.SEC_F_BULK and len(data) % self.page_size:
            raise EncodeError(f"BULK section length {len(data)} is not a multiple of the page "
                              f"size {self.page_size}", section=str(what))
        sec = Section(self, len(self.sections), tid, instance, version, flags, crc32c(data),
                      None, len(data), data)
        self.sections.append(sec)
        return sec

    def add_ram(self, gpa: int, data, *, instance: int | None = None, flags: int = 0) -> Section:
        """Add a RAM blob and its region in the memory layout section."""
        from .sections_core import MEM_BACKING_SECTION
        if instance is None:
            instance = len(self.all("ram"))
        mv = memoryview(data)
        if self.find("memory_layout") is None:    # keep the layout ahead of the bulk data
            self.add("memory_layout", 0, fields={"regions": [], "strings": ""})
        sec = self.add("ram", instance, data=mv)
        layout = self.find("memory_layout")
        regions = list(layout.fields["regions"]) if layout else []
        strings = layout.fields["strings"] if layout else ""
        regions.append(dict(guest_phys_addr=gpa, memory_size=len(mv), backing=MEM_BACKING_SECTION,
                            flags=flags, section_instance=instance, name_len=0, name_offset=0,
                            file_offset=0, file_size=0, reserved=0, sha256="00" * 32))
        self.replace("memory_layout", 0, fields={"regions": regions, "strings": strings})
        return sec

    def replace(self, what, instance: int, data=None, *, fields=None) -> Section:
        """Replace (or add) a section's bytes, keeping its position and flags."""
        old = self.find(what, instance)
        if old is None:
            return self.add(what, instance, data, fields=fields)
        kind = old.kind
        if data is None:
            data = kind.encode(fields)
        data = bytes(data)
        new = Section(self, old.index, old.type_id, old.instance, old.version, old.flags,
                      crc32c(data), None, len(data), data)
        self.sections[old.index] = new
        self.__dict__.pop("_idx", None)
        return new

    def remove(self, section: Section) -> None:
        self.__dict__.pop("_idx", None)
        self.sections.remove(section)
        for i, s in enumerate(self.sections):
            s.index = i

    # ---------------------------------------------------------------- writing
    def _plan(self):
        """Canonical layout: (offsets, table_offset, file_size)."""
        cur = self.header_len
        offs = []
        for s in self.sections:
            cur = _align(cur, self.page_size if s.flags & L.SEC_F_BULK else L.SECTION_ALIGN)
            offs.append(cur)
            cur += s.length
        table_off = _align(cur, L.SECTION_ALIGN)
        return offs, table_off, table_off + L.TABLE_ENTRY_SIZE * len(self.sections)

    def _table_and_header(self, offs, table_off, file_size) -> tuple[bytes, bytes]:
        if len(self.sections) > L.MAX_SECTIONS:
            raise LimitError(f"{len(self.sections)} sections > limit {L.MAX_SECTIONS}")
        table = bytearray()
        for s, off in zip(self.sections, offs):
            table += struct.pack("<IIHHIQQ", s.type_id, s.instance, s.version, s.flags,
                                 s.crc32c, off, s.length)
        tcrc = crc32c(table)
        arch = L.ARCH_IDS[self.arch]
        hdr = bytearray(_HDR.pack(L.MAGIC, self.header_len, self.version[0], self.version[1],
                                  self.compat_version[0], self.compat_version[1], arch, 0,
                                  self.page_size, self.flags, len(self.sections),
                                  L.TABLE_ENTRY_SIZE, table_off, file_size, 0, tcrc))
        hdr += bytes(self.header_len - len(hdr))
        struct.pack_into("<I", hdr, _HO["header_crc32c"], crc32c(hdr))
        return bytes(table), bytes(hdr)

    def to_bytes(self) -> bytes:
        offs, table_off, file_size = self._plan()
        table, hdr = self._table_and_header(offs, table_off, file_size)
        out = bytearray(file_size)
        out[0:len(hdr)] = hdr
        for s, off in zip(self.sections, offs):
            out[off:off + s.length] = s.data
        out[table_off:table_off + len(table)] = table
        return bytes(out)

    def save(self, path: str | os.PathLike, *, mode: int | None = None) -> None:
        """Atomic write: temp file beside the target, fsync, rename, fsync dir.

        Zero pages of BULK sections are left as holes (sparse file).  ``mode``:
        file permissions (default 0666 & ~umask; restore-ready templates use 0444).
        """
        offs, table_off, file_size = self._plan()
        table, hdr = self._table_and_header(offs, table_off, file_size)
        with atomic_file(path, mode) as f:
            f.truncate(file_size)
            for s, off in zip(self.sections, offs):
                if s.flags & L.SEC_F_BULK:
                    _write_sparse(f, off, s.data, self.page_size)
                else:
                    f.seek(off)
                    f.write(s.data)
            f.seek(table_off)
            f.write(table)
            f.seek(0)
            f.write(hdr)

    def close(self) -> None:
        for s in self.sections:
            if isinstance(s._data, memoryview) and self._buf is not None:
                try:
                    s._data.release()
                except BufferError:
                    pass      # exported to a numpy view that is still alive
                s._data = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # numpy views still alive; the mapping goes when they do
            self._mmap = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def deep_verify(self) -> list[FormatError]:
        """Section-level problems found at load, plus the CRC of every BULK section."""
        bad = list(self._crc_failures)
        labels = {e.section for e in bad}
        for s in self.sections:
            if s.bulk and s.label not in labels and s.offset is not None \
                    and self._bulk_crc(s) != s.crc32c:
                bad.append(_crc_error(s))
        return bad

    def _bulk_crc(self, s: Section) -> int:
        if self._fd is not None and s._data is None:
            return crc32c_file_range(self._fd, self._buf, s.offset, s.length)
        return crc32c(s.data)


def _crc_error(s: Section) -> ChecksumError:
    return ChecksumError(f"CRC32C 0x{s.snapshot._bulk_crc(s) if s.bulk else crc32c(s.data):08x} "
                         f"!= table value 0x{s.crc32c:08x}",
                         section=s.label, offset=s.offset,
                         hint="the section bytes were modified or the file is corrupt")


def _write_sparse(f, off: int, data, page_size: int) -> None:
    mv = memoryview(data)
    n = len(mv)
    if n == 0:
        return
    arr = np.frombuffer(mv, dtype=np.uint64).reshape(-1, page_size // 8)
    nonzero = np.flatnonzero(arr.any(axis=1))
    if nonzero.size == 0:
        return
    # coalesce consecutive non-zero pages into runs
    breaks = np.flatnonzero(np.diff(nonzero) != 1)
    starts = np.concatenate(([nonzero[0]], nonzero[breaks + 1]))
    ends = np.concatenate((nonzero[breaks], [nonzero[-1]])) + 1
    for a, b in zip(starts.tolist(), ends.tolist()):
        f.seek(off + a * page_size)
        f.write(mv[a * page_size:b * page_size])


def _type_id(what) -> int:
    if isinstance(what, int):
        return what
    if isinstance(what, registry.SectionKind):
        return what.type_id
    k = registry.by_name(what)
    if k is None:
        raise EncodeError(f"unknown section name {what!r}",
                          hint="see `snapfmt schema` for the known section names")
    return k.type_id


# ====================================================================== reading

def load(path: str | os.PathLike, *, strict: bool = True) -> Snapshot:
    """Open a snapshot file (mmap, read-only) and check its structure.

    ``strict``: section-level problems (CRC, length, unknown critical type)
    raise; with ``strict=False`` they are kept and reported by ``validate``.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                buf = b""
                mm = None
            else:
                mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                buf = mm
            fd = os.dup(f.fileno())
    except OSError as e:
        raise SnapfmtOSError(f"cannot open {path}: {e.strerror}") from None
    try:
        snap = _parse(buf, strict=strict)
    except BaseException:
        os.close(fd)
        raise
    snap._mmap = mm
    snap._fd = fd
    snap.path = path
    return snap


def loads(data: bytes | bytearray | memoryview, *, strict: bool = True) -> Snapshot:
    return _parse(bytes(data) if not isinstance(data, bytes) else data, strict=strict)


def _parse(buf, *, strict: bool) -> Snapshot:
    n = len(buf)
    H = "header"
    if n < L.HEADER_SIZE:
        raise TruncatedError(f"input is {n} bytes, the header alone needs {L.HEADER_SIZE}",
                             section=H, offset=n)
    (magic, hlen, vmaj, vmin, cmaj, cmin, arch, res0, page_size, flags, count, esize,
     table_off, file_size, hcrc, tcrc) = _HDR.unpack_from(buf, 0)
    if magic != L.MAGIC:
        raise FormatError(f"magic {magic!r} != {L.MAGIC!r}: not a snapfmt file",
                          section=H, field="magic", offset=0, code="bad-magic")
    if hlen < L.HEADER_SIZE or hlen > L.MAX_HEADER_LEN or hlen % 8:
        raise FormatError(f"header_len {hlen} not a multiple of 8 in [{L.HEADER_SIZE}, "
                          f"{L.MAX_HEADER_LEN}]", section=H, field="header_len",
                          offset=_HO["header_len"])
    if n < hlen:
        raise TruncatedError(f"input is {n} bytes, header_len says {hlen}", section=H,
                             field="header_len", offset=n)
    hdr = bytearray(buf[0:hlen])
    struct.pack_into("<I", hdr, _HO["header_crc32c"], 0)
    got = crc32c(hdr)
    if got != hcrc:
        raise ChecksumError(f"header CRC32C 0x{got:08x} != stored 0x{hcrc:08x}", section=H,
                            field="header_crc32c", offset=_HO["header_crc32c"])
    ver, compat = (vmaj, vmin), (cmaj, cmin)
    if ver < L.READER_MIN_VERSION or compat > L.VERSION or compat > ver:
        raise VersionError(f"file version {vmaj}.{vmin} (readable by >= {cmaj}.{cmin}); this "
                           f"reader is {L.VERSION[0]}.{L.VERSION[1]} and reads files >= "
                           f"{L.READER_MIN_VERSION[0]}.{L.READER_MIN_VERSION[1]}", section=H,
                           field="version_major", offset=_HO["version_major"],
                           hint="`snapfmt migrate` converts between versions")
    if any(hdr[L.HEADER_SIZE:hlen]):
        i = next(i for i in range(L.HEADER_SIZE, hlen) if hdr[i])
        raise FormatError(f"unknown trailing header byte {i} is non-zero "
                          f"(header bytes [{L.HEADER_SIZE}, {hlen}) must be zero)", section=H,
                          field="trailing", offset=i)
    if res0:
        raise FormatError(f"reserved0 is {res0}, must be 0", section=H, field="reserved0",
                          offset=_HO["reserved0"])
    if arch not in L.ARCH_NAMES:
        raise FormatError(f"architecture {arch} unknown (1 = x86_64, 2 = aarch64)", section=H,
                          field="arch", offset=_HO["arch"], code="bad-arch")
    if page_size not in L.PAGE_SIZES:
        raise FormatError(f"page_size {page_size} not one of {L.PAGE_SIZES}", section=H,
                          field="page_size", offset=_HO["page_size"])
    unknown = flags & L.HDR_F_REQUIRED_MASK & ~L.HDR_F_KNOWN_REQUIRED
    if unknown:
        raise FormatError(f"unknown must-understand flags 0x{unknown:x}", section=H,
                          field="flags", offset=_HO["flags"], code="bad-flags")
    if file_size > n:
        raise TruncatedError(f"file_size {file_size} but the input has only {n} bytes",
                             section=H, field="file_size", offset=n)
    if file_size < n:
        raise FormatError(f"{n - file_size} trailing bytes after file_size {file_size}",
                          section=H, field="file_size", offset=file_size)
    if count > L.MAX_SECTIONS:
        raise LimitError(f"section_count {count} > limit {L.MAX_SECTIONS}", section=H,
                         field="section_count", offset=_HO["section_count"])
    if esize != L.TABLE_ENTRY_SIZE:
        raise FormatError(f"table_entry_size {esize} != {L.TABLE_ENTRY_SIZE}", section=H,
                          field="table_entry_size", offset=_HO["table_entry_size"])
    if table_off % L.SECTION_ALIGN:
        raise FormatError(f"table_offset {table_off} not 8-aligned", section=H,
                          field="table_offset", offset=_HO["table_offset"], code="bad-align")
    tlen = count * esize
    if not _range_inside(table_off, tlen, hlen, file_size + 1) or table_off + tlen > file_size:
        raise FormatError(f"section table [{table_off}, {table_off + tlen}) not inside "
                          f"[{hlen}, {file_size})", section=H, field="table_offset",
                          offset=_HO["table_offset"], code="bad-offset")
    table_bytes = buf[table_off:table_off + tlen]
    got = crc32c(table_bytes)
    if got != tcrc:
        raise ChecksumError(f"table CRC32C 0x{got:08x} != stored 0x{tcrc:08x}", section="table",
                            field="crc32c", offset=table_off)

    snap = Snapshot.__new__(Snapshot)
    Snapshot.__init__(snap, L.ARCH_NAMES[arch], page_size, flags, ver, compat)
    snap.header_len = hlen
    snap.file_size = file_size
    snap._buf = buf

    tab = np.frombuffer(table_bytes, dtype=TABLE_DTYPE, count=count) if count else \
        np.zeros(0, dtype=TABLE_DTYPE)
    types = tab["type"].tolist()
    insts = tab["instance"].tolist()
    vers = tab["version"].tolist()
    sflags = tab["flags"].tolist()
    crcs = tab["crc32c"].tolist()
    offs = tab["offset"].tolist()
    lens = tab["length"].tolist()
    if count and _entries_look_bad(tab, page_size, hlen, file_size, table_off, tlen):
        # something is wrong: walk in table order to report the FIRST failure exactly
        _check_entries_in_order(snap, types, insts, vers, sflags, crcs, offs, lens,
                                page_size, hlen, file_size, table_off, tlen, esize)
    sections = [Section(snap, i, types[i], insts[i], vers[i], sflags[i], crcs[i], offs[i],
                        lens[i]) for i in range(count)]
    snap.sections = sections

    mv = memoryview(buf)
    for s in sections:
        k = s._kind
        if k is not None and not s.flags & L.SEC_F_BULK and s.version <= k.version \
                and k.check_fn is None and (k.decode_fn is not None or k.fixed_size is None
                                            or k.fixed_size == s.length):
            d = s._data = mv[s.offset:s.offset + s.length]
            if crc32c(d) == s.crc32c:
                continue          # the common case, steps 18-20 passed
        problem = _section_problem(s)
        if problem is not None:
            if strict:
                raise problem
            snap._crc_failures.append(problem)
    return snap


def _section_problem(s: Section) -> FormatError | None:
    """Steps 18-20 of the check order for one section (None when fine)."""
    kind = s.kind
    if kind is None or s.version > kind.version:
        if s.critical:
            what = (f"type 0x{s.type_id:08x} unknown" if kind is None
                    else f"version {s.version} newer than supported {kind.version}")
            return UnknownSectionError(f"CRITICAL section: {what}", section=s.label,
                                       offset=s.offset,
                                       hint="a newer snapfmt is needed to read this file")
        kind = None          # ancillary and not understood: CRC only, then skipped
    if s.bulk:
        return None
    if crc32c(s.data) != s.crc32c:
        return _crc_error(s)
    if kind is None:
        return None
    fixed = kind.fixed_size
    if fixed is not None and kind.decode_fn is None and s.length != fixed:
        return FormatError(f"length {s.length} != declared size {fixed}", section=s.label,
                           field="length", offset=s.offset, code="bad-length")
    if kind.check_fn is not None:
        try:
            kind.check_fn(s.data)
        except FormatError as e:
            e.section = s.label
            if e.offset is not None:
                e.offset += s.offset
            return e
    return None


def _entries_look_bad(tab, page_size, hlen, file_size, table_off, tlen) -> bool:
    """Vectorised steps 16-17 over the whole table; True if any entry may fail."""
    fl = tab["flags"].astype(np.uint64)
    off = tab["offset"]
    ln = tab["length"]
    bulk = (fl & np.uint64(L.SEC_F_BULK)) != 0
    bad = (fl & np.uint64(0xFFFF & ~L.SEC_F_KNOWN)) != 0
    bad |= (off % np.where(bulk, np.uint64(page_size), np.uint64(L.SECTION_ALIGN))) != 0
    bad |= bulk & ((ln % np.uint64(page_size)) != 0)
    fs = np.uint64(file_size)
    bad |= (off < np.uint64(hlen)) | (off > fs)
    bad |= ln > fs - np.minimum(off, fs)               # no uint64 wrap-around
    if bad.any():
        return True
    end = off + ln                                      # safe: both are <= file_size now
    bad |= (off < np.uint64(table_off + tlen)) & (np.uint64(table_off) < end)
    bad |= ~bulk & (ln > np.uint64(L.MAX_STATE_SECTION_LEN))
    if bad.any():
        return True
    keys = (tab["type"].astype(np.uint64) << np.uint64(32)) | tab["instance"].astype(np.uint64)
    if np.unique(keys).size != keys.size:
        return True
    order = np.argsort(off, kind="stable")
    so, se = off[order], end[order]
    return bool((so[1:] < se[:-1]).any())


def _check_entries_in_order(snap, types, insts, vers, sflags, crcs, offs, lens, page_size,
                            hlen, file_size, table_off, tlen, esize) -> None:
    """Steps 16-17 entry by entry: raises the error of the first failing entry."""
    sections = []
    for i in range(len(types)):
        eoff = table_off + i * esize
        T = f"table[{i}]"
        f_, off, ln = sflags[i], offs[i], lens[i]
        if f_ & ~L.SEC_F_KNOWN:
            raise FormatError(f"unknown section flags 0x{f_ & ~L.SEC_F_KNOWN:x}", section=T,
                              field="flags", offset=eoff + _TO["flags"], code="bad-flags")
        bulk = f_ & L.SEC_F_BULK
        if off % L.SECTION_ALIGN or (bulk and (off % page_size or ln % page_size)):
            what = "offset" if (off % (page_size if bulk else L.SECTION_ALIGN)) else "length"
            raise FormatError(f"{'BULK ' if bulk else ''}section {what} "
                              f"{off if what == 'offset' else ln} not "
                              f"{page_size if bulk else L.SECTION_ALIGN}-aligned", section=T,
                              field=what, offset=eoff + _TO[what], code="bad-align")
        if not _range_inside(off, ln, hlen, file_size + 1) or off + ln > file_size:
            raise FormatError(f"section [{off}, {off + ln}) not inside [{hlen}, {file_size})",
                              section=T, field="offset", offset=eoff + _TO["offset"],
                              code="bad-offset")
        if off < table_off + tlen and table_off < off + ln:
            raise FormatError(f"section [{off}, {off + ln}) overlaps the table "
                              f"[{table_off}, {table_off + tlen})", section=T, field="offset",
                              offset=eoff + _TO["offset"], code="bad-offset")
        if not bulk and ln > L.MAX_STATE_SECTION_LEN:
            raise LimitError(f"section length {ln} > limit {L.MAX_STATE_SECTION_LEN}",
                             section=T, field="length", offset=eoff + _TO["length"])
        sections.append(Section(snap, i, types[i], insts[i], vers[i], f_, crcs[i], off, ln))

    seen = {}
    for s in sections:
        key = (s.type_id, s.instance)
        if key in seen:
            raise FormatError(f"({s.name}, instance {s.instance}) also at table[{seen[key]}]",
                              section=f"table[{s.index}]", field="type",
                              offset=table_off + s.index * esize, code="duplicate")
        seen[key] = s.index
    order = sorted(sections, key=lambda s: (s.offset, s.index))
    for a, b in zip(order, order[1:]):
        if b.offset < a.offset + a.length:
            raise FormatError(f"[{b.offset}, {b.offset + b.length}) overlaps table[{a.index}] "
                              f"[{a.offset}, {a.offset + a.length})", section=f"table[{b.index}]",
                              field="offset", offset=table_off + b.index * esize + _TO["offset"],
                              code="overlap")
