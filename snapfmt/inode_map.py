"""``virtiofs.inode_map``: the passthrough virtio-fs server's inode table.

A template VM's guest kernel caches FUSE nodeids (and open file handles); a
restored child must find the same nodeids in its server.  The server cannot
keep its O_PATH fds across the snapshot, so the section records, for every
live nodeid, how to re-open it (parent nodeid + name, relative to the shared
directory) and the identity it had (ino, dev, mnt_id, file type), so a
restore can tell whether the host tree still matches (``snapfmt fs-check``,
``shim/snapfmt_fs.c``).

Layout (scope device, instance = device index; little-endian)::

    InodeMapHeader      64 bytes
    entries[]           entry_count  x 72 bytes  (InodeEntry)
    handles[]           handle_count x 24 bytes  (HandleRecord)
    mounts[]            mount_count  x 16 bytes  (MountRecord)
    strtab              strtab_len bytes
    pad                 (-strtab_len) % 8 zero bytes

String table: CANONICAL layout -- the names of the entries in entry order,
then the mount paths in mount order, back to back with no gaps and no
sharing, so ``entries[0].name_off == 0``, every next offset is the previous
offset + length, and the last one ends at ``strtab_len``.  That makes bounds
checks trivial (C and numpy) and lets JSON carry names instead of offsets
while keeping ``encode(decode(b)) == b``.

Names are bytes (not assumed UTF-8).  In JSON a name is a string when it is
valid UTF-8, else ``{"hex": "..."}``.

Structural rules (FormatError at load, same in the C shim): header length,
limits (``entry_count <= MAX_ENTRIES``, ``handle_count <= MAX_HANDLES``,
``mount_count <= MAX_MOUNTS``), counts consistent with the length
("bad-length"), canonical string offsets ("bad-offset"), zero tail padding
("bad-value").  Everything else (root present, parents exist, no cycles,
unique (parent, name), legal names, live handles, next_inode / next_handle)
is a validation Finding computed with vectorised numpy (a 1,000,000-entry map
validates in a few hundred milliseconds).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat as _stat
from dataclasses import dataclass

import construct as c
import numpy as np

from . import typeids
from .decl import HexBytes, dtype_of
from .errors import EncodeError, FormatError, LimitError
from .findings import ERROR, WARNING, Finding, check
from .registry import SCOPE_DEVICE, SectionKind, register

u32 = c.Int32ul
u64 = c.Int64ul

SECTION = "virtiofs.inode_map"

FUSE_ROOT_ID = 1
MAX_ENTRIES = 1 << 23          # 8 Mi entries (576 MiB of records: below the 1 GiB section cap)
MAX_HANDLES = 1 << 20
MAX_MOUNTS = 4096
NAME_MAX = 255
PATH_MAX = 4096
MAX_DEPTH = PATH_MAX // 2      # "a/" per component: no deeper path fits in PATH_MAX

# header flags
INOMAP_F_MNT_ID = 1 << 0          # mnt_id fields are real (statx STATX_MNT_ID), not 0
INOMAP_F_HARDLINK_DEDUP = 1 << 1  # one nodeid per (dev, ino, mnt_id): hard links share it
INOMAP_F_KNOWN = INOMAP_F_MNT_ID | INOMAP_F_HARDLINK_DEDUP
FLAG_NAMES = {0: "MNT_ID", 1: "HARDLINK_DEDUP"}

S_IFMT = 0o170000
FILE_TYPES = {_stat.S_IFDIR: "dir", _stat.S_IFREG: "file", _stat.S_IFLNK: "symlink",
              _stat.S_IFCHR: "chardev", _stat.S_IFBLK: "blockdev", _stat.S_IFIFO: "fifo",
              _stat.S_IFSOCK: "socket"}

InodeMapHeader = c.Struct(
    "entry_count" / u32,      # InodeEntry records
    "handle_count" / u32,     # HandleRecord records
    "mount_count" / u32,      # MountRecord records
    "flags" / u32,            # INOMAP_F_*
    "strtab_len" / u32,       # bytes of string table
    "reserved0" / u32,        # kept as written; writers use 0
    "next_inode" / u64,       # next nodeid the server will hand out (> every nodeid)
    "next_handle" / u64,      # next file handle id (> every handle id)
    "root_dev" / u64,         # identity of the shared directory: st_dev
    "root_ino" / u64,         #   st_ino
    "root_mnt_id" / u64,      #   mount id (statx STATX_MNT_ID; 0 = unknown)
)

InodeEntry = c.Struct(
    "nodeid" / u64,           # FUSE nodeid (1 = root)
    "parent" / u64,           # parent nodeid (0 for the root)
    "name_off" / u32,         # name: offset into the string table (canonical layout)
    "name_len" / u32,         #   length in bytes (0 only for the root)
    "ino" / u64,              # host st_ino at lookup time
    "dev" / u64,              # host st_dev (Linux dev_t encoding)
    "mnt_id" / u64,           # host mount id (0 = unknown)
    "generation" / u64,       # inode generation reported to the guest (0 if unknown)
    "refcount" / u64,         # FUSE lookup count (nlookup)
    "file_type" / u32,        # st_mode & S_IFMT
    "reserved" / u32,         # kept as written; writers use 0
)

HandleRecord = c.Struct(
    "handle" / u64,           # FUSE file handle id
    "nodeid" / u64,           # the inode it is open on
    "open_flags" / u32,       # open(2) flags of the handle
    "reserved" / u32,
)

MountRecord = c.Struct(
    "mnt_id" / u64,           # host mount id
    "path_off" / u32,         # path of the mount inside the shared directory ("/" = the
    "path_len" / u32,         #   shared directory itself), in the string table
)

HEADER_SIZE = InodeMapHeader.sizeof()
ENTRY_SIZE = InodeEntry.sizeof()
HANDLE_SIZE = HandleRecord.sizeof()
MOUNT_SIZE = MountRecord.sizeof()
assert (HEADER_SIZE, ENTRY_SIZE, HANDLE_SIZE, MOUNT_SIZE) == (64, 72, 24, 16)

ENTRY_DTYPE = dtype_of(InodeEntry)
HANDLE_DTYPE = dtype_of(HandleRecord)
MOUNT_DTYPE = dtype_of(MountRecord)
HEADER_DTYPE = dtype_of(InodeMapHeader)

#: The whole section as one construct Struct (documentation, schema, and the
#: "naive" per-record parse the benchmark compares against).
InodeMap = c.Struct(
    *InodeMapHeader.subcons,
    "entries" / c.Array(c.this.entry_count, InodeEntry),
    "handles" / c.Array(c.this.handle_count, HandleRecord),
    "mounts" / c.Array(c.this.mount_count, MountRecord),
    "strtab" / HexBytes(c.this.strtab_len),
    "pad" / HexBytes(lambda ctx: -ctx.strtab_len % 8),
)

_HDR_OFF = {}
_o = 0
for _sc in InodeMapHeader.subcons:
    _HDR_OFF[_sc.name] = _o
    _o += _sc.sizeof()
del _o, _sc
_ENT_OFF = {name: ENTRY_DTYPE.fields[name][1] for name in ENTRY_DTYPE.names}


# ---------------------------------------------------------------------------
# zero-copy parse
# ---------------------------------------------------------------------------

@dataclass
class MapArrays:
    """numpy views of one inode map section (no copy of the section bytes)."""
    header: dict
    entries: np.ndarray       # ENTRY_DTYPE
    handles: np.ndarray       # HANDLE_DTYPE
    mounts: np.ndarray        # MOUNT_DTYPE
    strtab: np.ndarray        # uint8
    entries_offset: int       # byte offsets in the section, for error locations
    handles_offset: int
    mounts_offset: int
    strtab_offset: int

    def name(self, i: int) -> bytes:
        e = self.entries[i]
        off, ln = int(e["name_off"]), int(e["name_len"])
        return self.strtab[off:off + ln].tobytes()

    def mount_path(self, i: int) -> bytes:
        m = self.mounts[i]
        off, ln = int(m["path_off"]), int(m["path_len"])
        return self.strtab[off:off + ln].tobytes()


def parse_arrays(buf, section: str = SECTION) -> MapArrays:
    """Structural checks + numpy views.  Raises FormatError/LimitError."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else memoryview(buf)
    n = len(mv)
    if n < HEADER_SIZE:
        raise FormatError(f"{n} bytes, shorter than its {HEADER_SIZE}-byte header",
                          section=section, field="length", offset=0, code="bad-length")
    h = np.frombuffer(mv, dtype=HEADER_DTYPE, count=1)[0]
    hdr = {name: int(h[name]) for name in HEADER_DTYPE.names}
    ne, nh, nm, slen = (hdr["entry_count"], hdr["handle_count"], hdr["mount_count"],
                        hdr["strtab_len"])
    for name, val, lim in (("entry_count", ne, MAX_ENTRIES), ("handle_count", nh, MAX_HANDLES),
                           ("mount_count", nm, MAX_MOUNTS)):
        if val > lim:
            raise LimitError(f"{name} {val} > limit {lim}", section=section, field=name,
                             offset=_HDR_OFF[name])
    eoff = HEADER_SIZE
    hoff = eoff + ne * ENTRY_SIZE
    moff = hoff + nh * HANDLE_SIZE
    soff = moff + nm * MOUNT_SIZE
    pad = -slen % 8
    want = soff + slen + pad
    if want != n:
        raise FormatError(f"entry_count {ne}, handle_count {nh}, mount_count {nm} and "
                          f"strtab_len {slen} need {want} bytes, section has {n}",
                          section=section, field="strtab_len", offset=_HDR_OFF["strtab_len"],
                          code="bad-length")
    entries = np.frombuffer(mv, dtype=ENTRY_DTYPE, count=ne, offset=eoff)
    handles = np.frombuffer(mv, dtype=HANDLE_DTYPE, count=nh, offset=hoff)
    mounts = np.frombuffer(mv, dtype=MOUNT_DTYPE, count=nm, offset=moff)
    strtab = np.frombuffer(mv, dtype=np.uint8, count=slen, offset=soff)
    # canonical string table: offsets are the running sum of lengths
    lens = np.concatenate((entries["name_len"], mounts["path_len"])).astype(np.int64)
    offs = np.concatenate((entries["name_off"], mounts["path_off"])).astype(np.int64)
    expect = np.zeros(lens.size, dtype=np.int64)
    if lens.size:
        np.cumsum(lens[:-1], out=expect[1:])
    bad = np.flatnonzero(offs != expect)
    if bad.size:
        k = int(bad[0])
        if k < ne:
            where, fld, off = f"entries[{k}]", "name_off", eoff + k * ENTRY_SIZE + _ENT_OFF["name_off"]
        else:
            where, fld, off = f"mounts[{k - ne}]", "path_off", moff + (k - ne) * MOUNT_SIZE + 8
        raise FormatError(f"{where}.{fld} is {int(offs[k])}, the canonical string table "
                          f"layout puts it at {int(expect[k])}", section=section,
                          field=f"{where}.{fld}", offset=off, code="bad-offset")
    total = int(lens.sum()) if lens.size else 0
    if total != slen:
        raise FormatError(f"names and mount paths use {total} bytes, strtab_len is {slen}",
                          section=section, field="strtab_len", offset=_HDR_OFF["strtab_len"],
                          code="bad-length")
    if pad and any(mv[soff + slen:n]):
        raise FormatError("non-zero padding after the string table", section=section,
                          field="pad", offset=soff + slen, code="bad-value")
    return MapArrays(hdr, entries, handles, mounts, strtab, eoff, hoff, moff, soff)


def check_inode_map(buf) -> None:
    """Structural check run at load (FormatError on bad bytes)."""
    parse_arrays(buf)


# ---------------------------------------------------------------------------
# JSON decode / encode
# ---------------------------------------------------------------------------

def name_to_json(b: bytes):
    """Lossless JSON form of a byte name: str if valid UTF-8, else {"hex": ...}."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": b.hex()}


def name_from_json(v, where: str = "name") -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, dict) and set(v) == {"hex"}:
        try:
            return bytes.fromhex(v["hex"])
        except (TypeError, ValueError) as e:
            raise EncodeError(f"bad hex name: {e}", section=SECTION, field=where) from None
    raise EncodeError(f"a name is a string or {{'hex': ...}}, not {v!r}", section=SECTION,
                      field=where)


def show_name(b: bytes) -> str:
    """Human (not lossless) rendering for messages."""
    return b.decode("utf-8", "backslashreplace")


_ENTRY_JSON = ("nodeid", "parent", "ino", "dev", "mnt_id", "generation", "refcount",
               "file_type", "reserved")


def decode_inode_map(buf) -> dict:
    a = parse_arrays(bytes(buf))
    st = a.strtab.tobytes()
    out = {k: a.header[k] for k in HEADER_DTYPE.names}
    ents = []
    cols = {k: a.entries[k].tolist() for k in _ENTRY_JSON + ("name_off", "name_len")}
    for i in range(len(a.entries)):
        off, ln = cols["name_off"][i], cols["name_len"][i]
        d = {"nodeid": cols["nodeid"][i], "parent": cols["parent"][i],
             "name": name_to_json(st[off:off + ln])}
        for k in _ENTRY_JSON[2:]:
            d[k] = cols[k][i]
        ents.append(d)
    out["entries"] = ents
    out["handles"] = [{"handle": int(r["handle"]), "nodeid": int(r["nodeid"]),
                       "open_flags": int(r["open_flags"]), "reserved": int(r["reserved"])}
                      for r in a.handles]
    out["mounts"] = [{"mnt_id": int(r["mnt_id"]),
                      "path": name_to_json(st[int(r["path_off"]):int(r["path_off"]) +
                                              int(r["path_len"])])} for r in a.mounts]
    return out


def build_map(header: dict, entries: np.ndarray, names, handles=None, mounts=None,
              mount_paths=()) -> bytes:
    """Section bytes from numpy records + names (offsets/counts filled in canonically).

    ``entries``: ENTRY_DTYPE array (name_off/name_len are overwritten);
    ``names``: sequence of bytes, one per entry; ``mount_paths`` one per mount.
    """
    entries = np.array(entries, dtype=ENTRY_DTYPE, copy=True)
    handles = np.zeros(0, HANDLE_DTYPE) if handles is None else np.asarray(handles, HANDLE_DTYPE)
    mounts = np.zeros(0, MOUNT_DTYPE) if mounts is None else np.array(mounts, MOUNT_DTYPE,
                                                                        copy=True)
    if len(names) != len(entries) or len(mount_paths) != len(mounts):
        raise EncodeError("one name per entry and one path per mount", section=SECTION)
    for name, val, lim in (("entry_count", len(entries), MAX_ENTRIES),
                           ("handle_count", len(handles), MAX_HANDLES),
                           ("mount_count", len(mounts), MAX_MOUNTS)):
        if val > lim:
            raise EncodeError(f"{name} {val} > limit {lim}", section=SECTION, field=name)
    strings = list(names) + list(mount_paths)
    blob = b"".join(strings)
    lens = np.fromiter((len(s) for s in strings), dtype=np.int64, count=len(strings))
    offs = np.zeros(len(strings), dtype=np.int64)
    if len(strings):
        np.cumsum(lens[:-1], out=offs[1:])
    if len(blob) > 0xFFFFFFFF:
        raise EncodeError(f"string table of {len(blob)} bytes > 4 GiB", section=SECTION)
    ne = len(entries)
    entries["name_off"] = offs[:ne]
    entries["name_len"] = lens[:ne]
    mounts["path_off"] = offs[ne:]
    mounts["path_len"] = lens[ne:]
    hdr = np.zeros(1, HEADER_DTYPE)
    for k in HEADER_DTYPE.names:
        hdr[k] = header.get(k, 0)
    hdr["entry_count"], hdr["handle_count"], hdr["mount_count"] = ne, len(handles), len(mounts)
    hdr["strtab_len"] = len(blob)
    return b"".join((hdr.tobytes(), entries.tobytes(), handles.tobytes(), mounts.tobytes(),
                     blob, bytes(-len(blob) % 8)))


def encode_inode_map(fields: dict) -> bytes:
    try:
        ents = fields["entries"]
        handles = fields.get("handles", [])
        mounts = fields.get("mounts", [])
        for cnt, lst in (("entry_count", ents), ("handle_count", handles),
                         ("mount_count", mounts)):
            if cnt in fields and fields[cnt] != len(lst):
                raise EncodeError(f"{cnt} {fields[cnt]} != {len(lst)} records", section=SECTION,
                                  field=cnt)
        arr = np.zeros(len(ents), ENTRY_DTYPE)
        names = []
        for i, e in enumerate(ents):
            names.append(name_from_json(e.get("name", ""), f"entries[{i}].name"))
            for k in _ENTRY_JSON:
                arr[i][k] = e.get(k, 0) if k in ("generation", "reserved", "mnt_id") else e[k]
        harr = np.zeros(len(handles), HANDLE_DTYPE)
        for i, hd in enumerate(handles):
            harr[i] = (hd["handle"], hd["nodeid"], hd.get("open_flags", 0), hd.get("reserved", 0))
        marr = np.zeros(len(mounts), MOUNT_DTYPE)
        paths = []
        for i, m in enumerate(mounts):
            marr[i]["mnt_id"] = m["mnt_id"]
            paths.append(name_from_json(m["path"], f"mounts[{i}].path"))
        out = build_map(fields, arr, names, harr, marr, paths)
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
        if isinstance(e, EncodeError):
            raise
        raise EncodeError(f"cannot encode: {' '.join(str(e).split())}", section=SECTION) from None
    if "strtab_len" in fields and fields["strtab_len"] != int.from_bytes(out[16:20], "little"):
        raise EncodeError(f"strtab_len {fields['strtab_len']} does not match the names",
                          section=SECTION, field="strtab_len")
    return out


def _annotate_inode_map(f: dict) -> dict:
    types: dict[str, int] = {}
    for e in f["entries"]:
        t = FILE_TYPES.get(e["file_type"], f"0o{e['file_type']:o}")
        types[t] = types.get(t, 0) + 1
    return {"flags": [FLAG_NAMES.get(b, f"bit{b}") for b in range(32) if f["flags"] >> b & 1],
            "file_types": types, "open_handles": len(f["handles"])}


INODE_MAP_KIND = register(SectionKind(
    typeids.VIRTIOFS_INODE_MAP, SECTION, SCOPE_DEVICE, InodeMap,
    "virtio-fs passthrough server state: FUSE nodeid -> (parent, name, host identity), "
    "open handles, mount ids; re-opened and verified against the shared directory at restore.",
    decode_fn=decode_inode_map, encode_fn=encode_inode_map, annotate_fn=_annotate_inode_map,
    check_fn=check_inode_map,
    extra={"header": InodeMapHeader, "entry": InodeEntry, "handle": HandleRecord,
           "mount": MountRecord, "max_entries": MAX_ENTRIES,
           "length_rule": (
               ("min", HEADER_SIZE),
               ("limit", _HDR_OFF["entry_count"], 4, MAX_ENTRIES),
               ("limit", _HDR_OFF["handle_count"], 4, MAX_HANDLES),
               ("limit", _HDR_OFF["mount_count"], 4, MAX_MOUNTS),
               ("exact", HEADER_SIZE, ((_HDR_OFF["entry_count"], 4, ENTRY_SIZE),
                                       (_HDR_OFF["handle_count"], 4, HANDLE_SIZE),
                                       (_HDR_OFF["mount_count"], 4, MOUNT_SIZE),
                                       (_HDR_OFF["strtab_len"], 4, 1, 8))),
               ("strtab", HEADER_SIZE, _HDR_OFF["strtab_len"],
                ((_HDR_OFF["entry_count"], 4, ENTRY_SIZE, _ENT_OFF["name_off"],
                  _ENT_OFF["name_len"]),
                 (_HDR_OFF["handle_count"], 4, HANDLE_SIZE, None, None),
                 (_HDR_OFF["mount_count"], 4, MOUNT_SIZE, 8, 12))))}))


# ---------------------------------------------------------------------------
# vectorised validation
# ---------------------------------------------------------------------------

MAX_FINDINGS_PER_CODE = 50
_HASH_MUL = np.uint64(0x100000001B3)         # FNV prime (odd): position powers
_MIX1 = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xC2B2AE3D27D4EB4F)


class MapIndex:
    """nodeid -> entry index lookups (sorted ids; fast path when already ascending)."""

    def __init__(self, nodeids: np.ndarray):
        self.n = len(nodeids)
        if self.n < 2 or bool(np.all(nodeids[1:] > nodeids[:-1])):
            self.order = None
            self.sorted = nodeids
        else:
            self.order = np.argsort(nodeids, kind="stable")
            self.sorted = nodeids[self.order]

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index, found) for each key (index meaningless where not found)."""
        if self.n == 0:
            return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
        pos = np.searchsorted(self.sorted, keys)
        np.minimum(pos, self.n - 1, out=pos)
        found = self.sorted[pos] == keys
        idx = pos if self.order is None else self.order[pos]
        return idx, found

    def duplicates(self) -> np.ndarray:
        """Entry indices whose nodeid appeared earlier (in sorted order)."""
        if self.n < 2:
            return np.zeros(0, np.int64)
        d = np.flatnonzero(self.sorted[1:] == self.sorted[:-1]) + 1
        return d if self.order is None else self.order[d]


def name_hashes(a: MapArrays) -> np.ndarray:
    """64-bit polynomial hash of every entry name (vectorised over the string table)."""
    e = a.entries
    ne = len(e)
    lens = e["name_len"].astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(ne, np.uint64)
    maxlen = int(lens.max())
    pw = np.empty(maxlen, np.uint64)
    pw[0] = 1
    if maxlen > 1:
        pw[1:] = _HASH_MUL
        np.cumprod(pw, out=pw)          # wraps mod 2**64 (intended)
    starts = e["name_off"].astype(np.int64)
    pos = np.arange(total, dtype=np.int64)
    pos -= np.repeat(starts, lens)       # position inside its name (names are contiguous)
    contrib = a.strtab[:total].astype(np.uint64)
    contrib += np.uint64(1)
    contrib *= pw[pos]
    csum = np.empty(total + 1, np.uint64)
    csum[0] = 0
    np.cumsum(contrib, out=csum[1:])
    h = csum[starts + lens] - csum[starts]
    h ^= lens.astype(np.uint64) * _MIX2
    return h


class _Reporter:
    def __init__(self, label: str, a: MapArrays, index: MapIndex):
        self.label = label
        self.a = a
        self.index = index
        self.out: list[Finding] = []
        self.counts: dict[str, int] = {}
        self._nid = None

    def path(self, i: int) -> str:
        """'/a/b/c' rebuilt from parent links (cycle- and depth-safe)."""
        e = self.a.entries
        parts = []
        seen = set()
        cur = i
        while True:
            nid = int(e[cur]["nodeid"])
            if nid == FUSE_ROOT_ID:
                break
            if cur in seen or len(parts) > MAX_DEPTH:
                parts.append("<cycle>")
                break
            seen.add(cur)
            parts.append(show_name(self.a.name(cur)))
            par = int(e[cur]["parent"])
            idx, found = self.index.lookup(np.array([par], np.uint64))
            if not found[0]:
                parts.append(f"<missing parent {par}>")
                break
            cur = int(idx[0])
        return "/" + "/".join(reversed(parts))

    def entry_loc(self, i: int, field: str | None = None) -> str:
        nid = int(self.a.entries[i]["nodeid"])
        f = f".{field}" if field else ""
        return f"{self.label}.entries[{i}]{f} (nodeid {nid}, path {self.path(i)})"

    def add(self, code: str, severity: str, location: str, message: str) -> None:
        n = self.counts.get(code, 0)
        self.counts[code] = n + 1
        if n < MAX_FINDINGS_PER_CODE:
            self.out.append(Finding(code, severity, location, message))

    def entries(self, code, severity, idxs, field, msg_fn) -> None:
        for i in np.asarray(idxs)[:MAX_FINDINGS_PER_CODE + 1].tolist():
            self.add(code, severity, self.entry_loc(i, field), msg_fn(i))
        extra = len(idxs) - (MAX_FINDINGS_PER_CODE + 1)
        if extra > 0:
            self.counts[code] += extra

    def finish(self) -> list[Finding]:
        for code, n in self.counts.items():
            if n > MAX_FINDINGS_PER_CODE:
                sev = next(f.severity for f in self.out if f.code == code)
                self.out.append(Finding(code, sev, self.label,
                                        f"{n - MAX_FINDINGS_PER_CODE} more {code} finding(s) "
                                        f"not listed ({n} in all)"))
        return self.out


def validate_map(a: MapArrays, label: str = SECTION) -> list[Finding]:
    """Every semantic rule of the inode map, vectorised.  Returns findings."""
    e = a.entries
    ne = len(e)
    # contiguous copies of the hot columns (strided structured-field access is slow)
    nid = np.ascontiguousarray(e["nodeid"])
    par = np.ascontiguousarray(e["parent"])
    ft = np.ascontiguousarray(e["file_type"])
    index = MapIndex(nid)
    r = _Reporter(label, a, index)
    hdr = a.header

    if hdr["flags"] & ~INOMAP_F_KNOWN:
        r.add("inode-map-flags", WARNING, f"{label}.flags",
              f"unknown flags 0x{hdr['flags'] & ~INOMAP_F_KNOWN:x}")

    # --- nodeids ------------------------------------------------------------
    zero = np.flatnonzero(nid == 0)
    r.entries("inode-nodeid-zero", ERROR, zero, "nodeid", lambda i: "nodeid 0 is not a valid "
              "FUSE nodeid")
    dups = index.duplicates()
    r.entries("inode-duplicate-nodeid", ERROR, dups, "nodeid",
              lambda i: f"nodeid {int(nid[i])} appears more than once")
    ridx, rfound = index.lookup(np.array([FUSE_ROOT_ID], np.uint64))
    root = int(ridx[0]) if rfound[0] else None
    if root is None:
        r.add("inode-root-missing", ERROR, f"{label}.entries",
              f"no entry for the root nodeid {FUSE_ROOT_ID}")
    else:
        if int(par[root]) != 0 or int(e[root]["name_len"]) != 0:
            r.add("inode-root-invalid", ERROR, r.entry_loc(root, "parent"),
                  f"root must have parent 0 and an empty name (parent {int(par[root])}, "
                  f"name {show_name(a.name(root))!r})")
        if int(ft[root]) != _stat.S_IFDIR:
            r.add("inode-root-invalid", ERROR, r.entry_loc(root, "file_type"),
                  f"root is not a directory (file_type 0o{int(ft[root]):o})")
        if (int(e[root]["ino"]), int(e[root]["dev"])) != (hdr["root_ino"], hdr["root_dev"]):
            r.add("inode-root-identity", ERROR, r.entry_loc(root, "ino"),
                  f"root entry identity (ino {int(e[root]['ino'])}, dev {int(e[root]['dev'])}) "
                  f"!= header shared directory (ino {hdr['root_ino']}, dev {hdr['root_dev']})")

    # --- file types ---------------------------------------------------------
    valid_ft = np.isin(ft, np.array(list(FILE_TYPES), np.uint32))
    r.entries("inode-file-type", ERROR, np.flatnonzero(~valid_ft), "file_type",
              lambda i: f"file_type 0o{int(ft[i]):o} is not an S_IFMT file type")

    # --- parents ------------------------------------------------------------
    nonroot = nid != FUSE_ROOT_ID
    pidx, pfound = index.lookup(par)
    missing = nonroot & ~pfound
    r.entries("inode-parent-missing", ERROR, np.flatnonzero(missing), "parent",
              lambda i: f"parent nodeid {int(par[i])} is not in the map")
    linked = nonroot & pfound
    notdir = np.flatnonzero(linked & (ft[np.where(linked, pidx, 0)] != _stat.S_IFDIR))
    r.entries("inode-parent-not-dir", ERROR, notdir, "parent",
              lambda i: f"parent nodeid {int(par[i])} is a "
                        f"{FILE_TYPES.get(int(ft[pidx[i]]), 'non-directory')}, not a directory")

    # --- cycles: pointer jumping on parent indices --------------------------
    if ne:
        ar = np.arange(ne, dtype=np.int64 if ne > 2**31 - 1 else np.int32)
        P = np.where(linked, pidx, ar).astype(ar.dtype)
        terminal = P == ar                      # root, orphans (and self-parented entries)
        selfp = np.flatnonzero(linked & (pidx == ar))
        terminal[selfp] = False                 # a self-parent is a cycle of length 1
        for _ in range(64):
            P2 = P[P]
            if np.array_equal(P2, P):
                break
            P = P2
        looped = np.flatnonzero(~terminal[P])
        if looped.size:
            _report_cycles(r, a, looped, pidx, linked)

    # --- names --------------------------------------------------------------
    lens = np.ascontiguousarray(e["name_len"])
    total = int(lens.sum(dtype=np.int64)) if ne else 0
    S = a.strtab[:total]
    ends = e["name_off"].astype(np.int64) + lens
    badpos = np.flatnonzero((S == 0x2F) | (S == 0))
    if badpos.size:
        owners = np.unique(np.searchsorted(ends, badpos, side="right"))
        r.entries("inode-name-invalid", ERROR, owners, "name_off",
                  lambda i: f"name {show_name(a.name(i))!r} contains "
                            f"{'/' if b'/' in a.name(i) else 'NUL'}")
    empty = np.flatnonzero(nonroot & (lens == 0))
    r.entries("inode-name-empty", ERROR, empty, "name_len", lambda i: "empty name (only the "
              "root has no name)")
    if total:
        first = S[np.minimum(e["name_off"], total - 1)]
        second = S[np.minimum(e["name_off"].astype(np.int64) + 1, total - 1)]
        dots = np.flatnonzero(((lens == 1) & (first == 0x2E)) |
                              ((lens == 2) & (first == 0x2E) & (second == 0x2E)))
        r.entries("inode-name-dot", ERROR, dots, "name_off",
                  lambda i: f"name {show_name(a.name(i))!r} is not a directory entry name")
    long_ = np.flatnonzero(lens > NAME_MAX)
    r.entries("inode-name-too-long", ERROR, long_, "name_len",
              lambda i: f"name is {int(lens[i])} bytes > NAME_MAX {NAME_MAX}")

    # --- (parent, name) unique ------------------------------------------------
    if ne > 1:
        h = name_hashes(a)
        key = h * _MIX1
        key ^= par * _MIX2
        key ^= key >> np.uint64(29)
        order = np.argsort(key)
        sk = key[order]
        dupn = _exact_duplicates(order, sk, lambda i: (int(par[i]), a.name(i)))
        for i, j in dupn[:MAX_FINDINGS_PER_CODE + 1]:
            r.add("inode-duplicate-name", ERROR, r.entry_loc(i, "name_off"),
                  f"(parent {int(par[i])}, name {show_name(a.name(i))!r}) also used by "
                  f"entries[{j}] (nodeid {int(nid[j])})")
        if len(dupn) > MAX_FINDINGS_PER_CODE + 1:
            r.counts["inode-duplicate-name"] += len(dupn) - MAX_FINDINGS_PER_CODE - 1

    # --- identity: one nodeid per (dev, ino, mnt_id) -------------------------
    if ne > 1 and hdr["flags"] & INOMAP_F_HARDLINK_DEDUP:
        ik = e["ino"] * _MIX1
        ik ^= e["dev"] * _MIX2
        ik ^= e["mnt_id"]
        order = np.argsort(ik)
        sk = ik[order]
        dupi = _exact_duplicates(order, sk, lambda i: (int(e[i]["ino"]), int(e[i]["dev"]),
                                                       int(e[i]["mnt_id"])))
        for i, j in sorted(dupi):
            r.add("inode-duplicate-identity", WARNING, r.entry_loc(i, "ino"),
                  f"same host inode (ino {int(e[i]['ino'])}, dev {int(e[i]['dev'])}) as "
                  f"entries[{j}] (nodeid {int(nid[j])}) although the map dedups hard links")

    # --- refcounts ------------------------------------------------------------
    r.entries("inode-refcount-zero", WARNING, np.flatnonzero(e["refcount"] == 0), "refcount",
              lambda i: "lookup count 0: the server would have forgotten this inode")

    # --- counters -------------------------------------------------------------
    if ne:
        mx = int(nid.max())
        if hdr["next_inode"] <= mx:
            r.add("inode-next-inode", ERROR, f"{label}.next_inode",
                  f"next_inode {hdr['next_inode']} <= largest nodeid in use {mx}: "
                  f"the server would reuse a live nodeid")
    hs = a.handles
    if len(hs):
        hmx = int(hs["handle"].max())
        if hdr["next_handle"] <= hmx:
            r.add("inode-next-handle", ERROR, f"{label}.next_handle",
                  f"next_handle {hdr['next_handle']} <= largest handle in use {hmx}")
        hidx, hfound = index.lookup(hs["nodeid"])
        for k in np.flatnonzero(~hfound)[:MAX_FINDINGS_PER_CODE + 1].tolist():
            r.add("inode-handle-dangling", ERROR, f"{label}.handles[{k}].nodeid",
                  f"handle {int(hs[k]['handle'])} is open on nodeid {int(hs[k]['nodeid'])}, "
                  f"which is not in the map")
        sh = np.sort(hs["handle"])
        for v in np.unique(sh[1:][sh[1:] == sh[:-1]])[:MAX_FINDINGS_PER_CODE].tolist():
            k = int(np.flatnonzero(hs["handle"] == v)[1])
            r.add("inode-duplicate-handle", ERROR, f"{label}.handles[{k}].handle",
                  f"handle id {v} appears more than once")

    # --- mounts ---------------------------------------------------------------
    ms = a.mounts
    if len(ms):
        mids = ms["mnt_id"]
        sm = np.sort(mids)
        for v in np.unique(sm[1:][sm[1:] == sm[:-1]]).tolist():
            r.add("inode-duplicate-mount", ERROR, f"{label}.mounts",
                  f"mnt_id {v} listed more than once")
        for k in range(len(ms)):
            p = a.mount_path(k)
            if not p.startswith(b"/") or b"\0" in p or len(p) > PATH_MAX:
                r.add("inode-mount-path", ERROR, f"{label}.mounts[{k}].path",
                      f"mount path {show_name(p)!r} must be absolute within the shared "
                      f"directory, without NUL, at most {PATH_MAX} bytes")
        if hdr["flags"] & INOMAP_F_MNT_ID and ne:
            unknown = np.flatnonzero((e["mnt_id"] != 0) & ~np.isin(e["mnt_id"], mids))
            r.entries("inode-mount-unknown", WARNING, unknown, "mnt_id",
                      lambda i: f"mnt_id {int(e[i]['mnt_id'])} not in the mount table")
    return r.finish()


def _exact_duplicates(order: np.ndarray, sorted_keys: np.ndarray, exact) -> list[tuple[int, int]]:
    """(entry, first entry with the same exact key) for every later duplicate.

    ``sorted_keys`` are hashes in ``order``; runs of equal hashes are candidates,
    confirmed with ``exact(i)`` (hash collisions are not duplicates).
    """
    eq = sorted_keys[1:] == sorted_keys[:-1]
    if not eq.any():
        return []
    out = []
    starts = np.flatnonzero(eq & ~np.concatenate(([False], eq[:-1])))
    for s0 in starts.tolist():
        s1 = s0 + 1
        while s1 < len(eq) and eq[s1]:
            s1 += 1
        first: dict = {}
        for i in sorted(order[s0:s1 + 1].tolist()):
            k = exact(i)
            if k in first:
                out.append((i, first[k]))
            else:
                first[k] = i
    out.sort()
    return out


def _report_cycles(r: _Reporter, a: MapArrays, looped: np.ndarray, pidx, linked) -> None:
    """One finding per distinct cycle (its members), one per entry hanging off one."""
    e = a.entries
    looped_set = set(looped.tolist()) if looped.size <= 100000 else None
    on_cycle: dict[int, int] = {}      # member -> cycle id
    cycles = []
    budget = 0
    for start in looped[:MAX_FINDINGS_PER_CODE + 1].tolist():
        if start in on_cycle:
            continue
        path, pos = [], {}
        cur = start
        while cur not in pos and cur not in on_cycle and budget < 1_000_000:
            pos[cur] = len(path)
            path.append(cur)
            cur = int(pidx[cur]) if linked[cur] else cur
            budget += 1
        if cur in pos:
            members = path[pos[cur]:]
            cid = len(cycles)
            cycles.append(members)
            for m in members:
                on_cycle[m] = cid
    for members in cycles:
        i = min(members)
        ids = ", ".join(str(int(e[m]["nodeid"])) for m in sorted(members)[:16])
        r.add("inode-cycle", ERROR, f"{r.label}.entries[{i}].parent (nodeid "
                                     f"{int(e[i]['nodeid'])}, name "
                                     f"{show_name(a.name(i))!r})",
              f"parent links form a cycle of {len(members)} entr"
              f"{'y' if len(members) == 1 else 'ies'} (nodeids {ids}): not reachable from "
              f"the root")
    hanging = [i for i in looped.tolist() if i not in on_cycle] if looped_set is not None \
        else looped.tolist()
    r.entries("inode-unreachable", ERROR, np.array(hanging, np.int64), "parent",
              lambda i: "ancestor chain runs into a parent cycle: not reachable from the root")


@check("virtiofs-inode-map")
def check_inode_maps(snap):
    for sec in snap.all(typeids.VIRTIOFS_INODE_MAP):
        try:
            a = parse_arrays(sec.data, sec.label)
        except FormatError:
            continue        # reported by validate's decode step
        yield from validate_map(a, sec.label)
    # a virtio-fs device's inode map belongs to a device of type fs
    devs = {s.instance: s for s in snap.all(typeids.VIRTIO_MMIO)}
    for sec in snap.all(typeids.VIRTIOFS_INODE_MAP):
        d = devs.get(sec.instance)
        if d is None:
            yield Finding("inode-map-no-device", WARNING, sec.label,
                          f"no virtio.mmio device {sec.instance} for this inode map")
            continue
        try:
            dt = d.fields["device_type"]
        except FormatError:
            continue
        if dt != 26:
            yield Finding("inode-map-no-device", ERROR, sec.label,
                          f"virtio.mmio device {sec.instance} is type {dt}, not virtio-fs (26)")


# ---------------------------------------------------------------------------
# capture from a real directory
# ---------------------------------------------------------------------------

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
STATX_TYPE = 0x1
STATX_INO = 0x100
STATX_MNT_ID = 0x1000


class _Statx(ctypes.Structure):
    _fields_ = [("stx_mask", ctypes.c_uint32), ("stx_blksize", ctypes.c_uint32),
                ("stx_attributes", ctypes.c_uint64), ("stx_nlink", ctypes.c_uint32),
                ("stx_uid", ctypes.c_uint32), ("stx_gid", ctypes.c_uint32),
                ("stx_mode", ctypes.c_uint16), ("_pad1", ctypes.c_uint16),
                ("stx_ino", ctypes.c_uint64), ("stx_size", ctypes.c_uint64),
                ("stx_blocks", ctypes.c_uint64), ("stx_attributes_mask", ctypes.c_uint64),
                ("_times", ctypes.c_uint8 * 64),
                ("stx_rdev_major", ctypes.c_uint32), ("stx_rdev_minor", ctypes.c_uint32),
                ("stx_dev_major", ctypes.c_uint32), ("stx_dev_minor", ctypes.c_uint32),
                ("stx_mnt_id", ctypes.c_uint64), ("_spare", ctypes.c_uint8 * 104)]


assert ctypes.sizeof(_Statx) == 256 and _Statx.stx_mnt_id.offset == 144

_statx_fn = None
_statx_checked = False


def _get_statx():
    global _statx_fn, _statx_checked
    if not _statx_checked:
        _statx_checked = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.statx
        except (OSError, AttributeError):
            return None
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                       ctypes.POINTER(_Statx)]
        fn.restype = ctypes.c_int
        _statx_fn = fn
    return _statx_fn


def lstat_identity(path: bytes, dir_fd: int = AT_FDCWD) -> tuple[int, int, int, int | None]:
    """(st_ino, st_dev, S_IFMT type, mnt_id or None) of ``path`` without following it.

    Uses statx(2) with STATX_MNT_ID when libc has it (Python 3.11 has no
    os.statx); mnt_id is None when the kernel does not report it.
    """
    fn = _get_statx()
    if fn is not None:
        buf = _Statx()
        rc = fn(dir_fd, path, AT_SYMLINK_NOFOLLOW, STATX_TYPE | STATX_INO | STATX_MNT_ID,
                ctypes.byref(buf))
        if rc == 0:
            mnt = int(buf.stx_mnt_id) if buf.stx_mask & STATX_MNT_ID else None
            return (int(buf.stx_ino), os.makedev(buf.stx_dev_major, buf.stx_dev_minor),
                    buf.stx_mode & S_IFMT, mnt)
        err = ctypes.get_errno()
        if err != 38:       # ENOSYS: fall back to lstat
            raise OSError(err, os.strerror(err), os.fsdecode(path))
    st = os.stat(path, dir_fd=None if dir_fd == AT_FDCWD else dir_fd, follow_symlinks=False)
    return st.st_ino, st.st_dev, _stat.S_IFMT(st.st_mode), None


AT_EMPTY_PATH = 0x1000


def fd_identity(fd: int) -> tuple[int, int, int, int | None]:
    """(st_ino, st_dev, S_IFMT type, mnt_id or None) of an open fd (O_PATH is fine)."""
    fn = _get_statx()
    if fn is not None:
        buf = _Statx()
        rc = fn(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW,
                STATX_TYPE | STATX_INO | STATX_MNT_ID, ctypes.byref(buf))
        if rc == 0:
            mnt = int(buf.stx_mnt_id) if buf.stx_mask & STATX_MNT_ID else None
            return (int(buf.stx_ino), os.makedev(buf.stx_dev_major, buf.stx_dev_minor),
                    buf.stx_mode & S_IFMT, mnt)
        err = ctypes.get_errno()
        if err != 38:
            raise OSError(err, os.strerror(err))
    st = os.fstat(fd)
    return st.st_ino, st.st_dev, _stat.S_IFMT(st.st_mode), None


def capture(root, max_entries: int | None = None) -> bytes:
    """Inode map section bytes for the directory tree at ``root``.

    Mirrors what a passthrough server holds after the guest looked up every
    entry: nodeids are handed out in walk order (depth-first preorder,
    siblings sorted by name bytes), the root is nodeid 1 with lookup count 2
    (as virtiofsd starts it), every other entry has a lookup count equal to
    the number of names the walk reached it by.  Identities come from
    lstat (statx with STATX_MNT_ID when available; else mnt_id 0 and the
    MNT_ID flag clear).  Symlinks are recorded, never followed; mount points
    are crossed (their mnt_id differs).

    Hard links: like the passthrough server's inode dedup by (ino, dev,
    mnt_id), all names of one host inode map to ONE nodeid; the entry keeps
    the first name the walk met (that is the path used to re-open it) and the
    other names only raise its refcount.  The HARDLINK_DEDUP flag says so.

    ``max_entries`` stops the walk after that many entries (the subset is
    still a valid map: parents precede children in preorder).
    """
    root_b = os.fsencode(os.fspath(root))
    if max_entries is not None and max_entries < 1:
        raise ValueError("max_entries must be >= 1")
    limit = MAX_ENTRIES if max_entries is None else min(max_entries, MAX_ENTRIES)
    ino, dev, ftype, mnt = lstat_identity(root_b)
    if ftype != _stat.S_IFDIR:
        raise NotADirectoryError(20, "not a directory", os.fsdecode(root_b))
    have_mnt = mnt is not None
    rows = [(FUSE_ROOT_ID, 0, ino, dev, mnt or 0, 2, ftype)]
    names = [b""]
    seen: dict[tuple[int, int, int], int] = {}
    mounts: dict[int, bytes] = {}
    if have_mnt:
        mounts[mnt] = b"/"
    # iterative DFS preorder; stack holds (dir path, nodeid, rel path, iterator of names)
    stack = [(root_b, FUSE_ROOT_ID, b"", None)]
    next_id = FUSE_ROOT_ID + 1
    full = False
    while stack and not full:
        path, nodeid, rel, it = stack[-1]
        if it is None:
            try:
                with os.scandir(path) as sd:
                    kids = sorted(ent.name for ent in sd)
            except (PermissionError, FileNotFoundError, NotADirectoryError):
                kids = []
            it = iter(kids)
            stack[-1] = (path, nodeid, rel, it)
        name = next(it, None)
        if name is None:
            stack.pop()
            continue
        cpath = path + b"/" + name
        try:
            cino, cdev, ctype, cmnt = lstat_identity(cpath)
        except FileNotFoundError:
            continue            # raced with a delete
        key = (cdev, cino, cmnt or 0)
        if ctype != _stat.S_IFDIR and key in seen:
            k = seen[key]
            r = rows[k]
            rows[k] = r[:5] + (r[5] + 1,) + r[6:]
            continue
        seen[key] = len(rows)
        rows.append((next_id, nodeid, cino, cdev, cmnt or 0, 1, ctype))
        names.append(name)
        crel = rel + b"/" + name
        if have_mnt and cmnt is not None and cmnt not in mounts:
            mounts[cmnt] = crel
        if ctype == _stat.S_IFDIR:
            stack.append((cpath, next_id, crel, None))
        next_id += 1
        if len(rows) >= limit:
            full = True
    arr = np.zeros(len(rows), ENTRY_DTYPE)
    cols = list(zip(*rows))
    for k, fld in enumerate(("nodeid", "parent", "ino", "dev", "mnt_id", "refcount",
                             "file_type")):
        arr[fld] = cols[k]
    marr = np.zeros(len(mounts), MOUNT_DTYPE)
    marr["mnt_id"] = list(mounts)
    header = dict(next_inode=next_id, next_handle=0, root_dev=dev, root_ino=ino,
                  root_mnt_id=mnt or 0,
                  flags=INOMAP_F_HARDLINK_DEDUP | (INOMAP_F_MNT_ID if have_mnt else 0))
    return build_map(header, arr, names, None, marr, list(mounts.values()))


def entry_paths(a: MapArrays) -> list[bytes | None]:
    """Relative path (b'a/b') of every entry; None when not reachable from the root."""
    e = a.entries
    index = MapIndex(e["nodeid"])
    pidx, pfound = index.lookup(e["parent"])
    out: list[bytes | None] = [None] * len(e)
    nid = e["nodeid"].tolist()
    state = [0] * len(e)          # 0 unknown, 1 in progress, 2 done
    pl = pidx.tolist()
    pf = pfound.tolist()
    for start in range(len(e)):
        if state[start] == 2:
            continue
        chain = []
        cur = start
        while True:
            if state[cur] == 2:
                base = out[cur]
                break
            if state[cur] == 1 or nid[cur] == FUSE_ROOT_ID or not pf[cur] or \
                    len(chain) > MAX_DEPTH:
                base = b"" if (nid[cur] == FUSE_ROOT_ID and state[cur] == 0) else None
                if base is not None:
                    state[cur] = 2
                    out[cur] = b""
                break
            state[cur] = 1
            chain.append(cur)
            cur = pl[cur]
        for i in reversed(chain):
            if base is not None:
                nm = a.name(i)
                base = nm if not base else base + b"/" + nm
            out[i] = base
            state[i] = 2
    return out
