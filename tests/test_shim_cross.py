"""C shim vs Python: same bytes written, same view read, same error code for every mangle.

The shim is built once per session with ``make -C shim``; the C reader is
called in-process through ctypes (libsnapfmt.so) for the many mangle cases,
and through ``shim/snapdump`` / ``shim/build/rewrite`` for the tool paths.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import snapfmt
from snapfmt import layout as L
from snapfmt.crc import crc32c
from snapfmt.errors import SnapfmtError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIM = ROOT / "shim"
GOLDEN = ROOT / "tests" / "golden"
HO, TO = L.HEADER_FIELD_OFFSETS, L.TABLE_FIELD_OFFSETS
FMT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
HSIZE = {sc.name: sc.sizeof() for sc in L.Header.subcons}
TSIZE = {sc.name: sc.sizeof() for sc in L.TableEntry.subcons}
CODE_OF = {L.error_code_name(n): -v for n, v, _ in L.ERROR_CODES}   # 'bad-crc' -> -12
NAME_OF = {-v: L.error_code_name(n) for n, v, _ in L.ERROR_CODES}


@pytest.fixture(scope="session")
def shim():
    subprocess.run(["make", "-C", str(SHIM), "-s"], check=True, capture_output=True)
    lib = ctypes.CDLL(str(SHIM / "libsnapfmt.so"))
    lib.snapfmt_open_buffer.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                        ctypes.POINTER(ctypes.c_void_p)]
    lib.snapfmt_close.argtypes = [ctypes.c_void_p]
    lib.snapfmt_strerror.restype = ctypes.c_char_p
    lib.snapfmt_crc32c.restype = ctypes.c_uint32
    lib.snapfmt_crc32c.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
    return lib


def c_code(lib, data: bytes, deep: bool = False) -> int:
    r = ctypes.c_void_p()
    err = lib.snapfmt_open_buffer(data, len(data), 1 if deep else 0, ctypes.byref(r))
    if err == 0:
        lib.snapfmt_close(r)
    return err


def py_code(data: bytes) -> int:
    try:
        snapfmt.loads(data)
    except SnapfmtError as e:
        return CODE_OF[e.code]
    return 0


def agree(lib, data: bytes) -> int:
    c, p = c_code(lib, data), py_code(data)
    assert c == p, f"C says {NAME_OF.get(c, c)}, Python says {NAME_OF.get(p, p)}"
    return c


# --- sample images -------------------------------------------------------------

def sample(n_ancillary: int = 1) -> bytes:
    s = snapfmt.new("x86_64", flags=L.HDR_F_TEMPLATE)
    s.add("metadata", fields=dict(created_unix_ns=1700000000 * 10**9, producer="shim-test",
                                  producer_version="1", kernel_release="6.1", cpu_vendor="V",
                                  cpu_model="M", template={"vcpus": "1"}))
    s.add("x86.regs", 0, data=bytes(range(144)))
    s.add("x86.msrs", 0, data=struct.pack("<II", 2, 0) + struct.pack("<IIQ", 0x10, 0, 5) * 2)
    for i in range(n_ancillary):
        s.add(0xF0000010 + i, i, data=b"private ancillary bytes"[:7 + i], flags=0)
    ram = bytearray(4 * 4096)
    ram[4096:4100] = b"\x01\x02\x03\x04"
    s.add_ram(0x100000, ram)
    return s.to_bytes()


def vectors() -> dict[str, bytes]:
    out = {"sample": sample(), "sample3": sample(3), "empty": snapfmt.new("x86_64").to_bytes()}
    s = snapfmt.new("aarch64", page_size=65536, flags=0xABCD0000)
    s.add("ram", 0, data=bytes(65536) + b"\x07" * 65536 + bytes(65536))
    s.add(0xF00000AA, 3, data=b"", flags=0)
    s.add(0xF00000AB, 3, data=b"", flags=0)
    out["arm64k"] = s.to_bytes()
    for p in sorted(GOLDEN.glob("*.snap")):
        if _tracked(p):
            out["golden-" + p.stem] = p.read_bytes()
    return out


def _tracked(p: pathlib.Path) -> bool:
    r = subprocess.run(["git", "ls-files", "--error-unmatch", str(p)], cwd=ROOT,
                       capture_output=True)
    return r.returncode == 0


VECTORS = vectors()


def fix_crcs(b: bytearray) -> bytearray:
    """Recompute table and header CRCs the way a writer would (after a mangle)."""
    hlen = struct.unpack_from("<I", b, HO["header_len"])[0]
    toff = struct.unpack_from("<Q", b, HO["table_offset"])[0]
    cnt = struct.unpack_from("<I", b, HO["section_count"])[0]
    if toff + 32 * cnt <= len(b):
        struct.pack_into("<I", b, HO["table_crc32c"], crc32c(bytes(b[toff:toff + 32 * cnt])))
    if 64 <= hlen <= len(b):
        struct.pack_into("<I", b, HO["header_crc32c"], 0)
        struct.pack_into("<I", b, HO["header_crc32c"], crc32c(bytes(b[:hlen])))
    return b


# --- byte-identical writer ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VECTORS))
def test_c_rewrite_is_byte_identical(shim, tmp_path, name):
    src = tmp_path / "in.snap"
    src.write_bytes(VECTORS[name])
    out = tmp_path / "out.snap"
    p = subprocess.run([SHIM / "build" / "rewrite", src, out], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == VECTORS[name]
    assert [f.name for f in tmp_path.iterdir()] == sorted(["in.snap", "out.snap"]) or \
        sorted(f.name for f in tmp_path.iterdir()) == ["in.snap", "out.snap"]


def test_c_written_sparse_image_loads_in_python(shim, tmp_path):
    """C writer with zero pages (holes) -> Python load + deep verify + validate."""
    img = VECTORS["sample"]
    (tmp_path / "in.snap").write_bytes(img)
    subprocess.run([SHIM / "build" / "rewrite", tmp_path / "in.snap", tmp_path / "c.snap"],
                   check=True)
    st = os.stat(tmp_path / "c.snap")
    snap = snapfmt.load(tmp_path / "c.snap")
    assert snap.deep_verify() == []
    errors = [f for f in snapfmt.validate(snap) if f.severity == "error"
              and f.code in {n for n in CODE_OF}]
    assert errors == []
    assert st.st_size == len(img)


# --- snapdump's JSON == Python's view -------------------------------------------------

def python_view(data: bytes) -> dict:
    snap = snapfmt.loads(data)
    h = L.Header.parse(data)
    header = {k: h[k] for k in ("header_len", "version_major", "version_minor", "compat_major",
                                "compat_minor", "arch", "page_size", "flags", "section_count",
                                "table_offset", "file_size", "header_crc32c", "table_crc32c")}
    header["arch_name"] = snap.arch
    assert (snap.page_size, snap.flags, len(snap.sections)) == \
        (h.page_size, h.flags, h.section_count)
    secs = [{"index": s.index, "type": s.type_id, "name": s.name, "instance": s.instance,
             "version": s.version, "flags": s.flags, "offset": s.offset, "length": s.length,
             "crc32c": s.crc32c, "crc_ok": s.crc_ok()} for s in snap.sections]
    return {"header": header, "sections": secs}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_snapdump_matches_python(shim, tmp_path, name):
    f = tmp_path / "x.snap"
    f.write_bytes(VECTORS[name])
    p = subprocess.run([SHIM / "snapdump", f], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == python_view(VECTORS[name])


def test_snapdump_bad_file(shim, tmp_path):
    b = bytearray(VECTORS["sample"])
    b[-1] ^= 1
    f = tmp_path / "bad.snap"
    f.write_bytes(bytes(b))
    p = subprocess.run([SHIM / "snapdump", f], capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("snapdump: ") and "CRC32C mismatch" in p.stderr
    assert "table_crc32c" in p.stderr
    p = subprocess.run([SHIM / "snapdump", tmp_path / "missing"], capture_output=True, text=True)
    assert p.returncode == 2 and "I/O error" in p.stderr


# --- mangle every header and table field: same exact code --------------------------------

def _values(old: int, size: int) -> list[int]:
    top = (1 << (8 * size)) - 1
    vals = {0, 1, 2, 3, 7, 8, 63, 64, 65, 4096, 0x8000, old + 1, old - 1, old + 8, old - 8,
            old ^ 0x10000, old * 2, top, top - 7, 1 << (8 * size - 1), old + 4096, old | 4}
    return sorted(v for v in vals if 0 <= v <= top and v != old)


HEADER_FIELDS = [sc.name for sc in L.Header.subcons if sc.name != "magic"]
TABLE_FIELDS = [sc.name for sc in L.TableEntry.subcons]


@pytest.mark.parametrize("field", HEADER_FIELDS)
@pytest.mark.parametrize("fix", [False, True], ids=["raw", "crc-fixed"])
def test_mangle_header_field(shim, field, fix):
    base = VECTORS["sample"]
    size = HSIZE[field]
    old = struct.unpack_from(FMT[size], base, HO[field])[0]
    seen = set()
    for v in _values(old, size):
        b = bytearray(base)
        struct.pack_into(FMT[size], b, HO[field], v)
        if fix and field not in ("header_crc32c",):
            if field == "table_crc32c":
                struct.pack_into("<I", b, HO["header_crc32c"], 0)
                struct.pack_into("<I", b, HO["header_crc32c"], crc32c(bytes(b[:64])))
            else:
                hl = min(struct.unpack_from("<I", b, HO["header_len"])[0], len(b))
                struct.pack_into("<I", b, HO["header_crc32c"], 0)
                struct.pack_into("<I", b, HO["header_crc32c"], crc32c(bytes(b[:max(hl, 64)])))
        seen.add(agree(shim, bytes(b)))
    if not fix:   # header_len is checked before the CRC (rules 3-5)
        assert seen <= {CODE_OF["bad-crc"], CODE_OF["bad-header"], CODE_OF["truncated"]}
        assert field == "header_len" or seen == {CODE_OF["bad-crc"]}
    elif field not in ("version_minor", "flags"):   # 1.x minor bumps, high flag bits: fine
        assert seen - {0}, f"no mangle of {field} was detected"


@pytest.mark.parametrize("field", TABLE_FIELDS)
@pytest.mark.parametrize("index", [0, 1, 3, 4])
def test_mangle_table_field(shim, field, index):
    base = VECTORS["sample"]
    toff = struct.unpack_from("<Q", base, HO["table_offset"])[0]
    at = toff + 32 * index + TO[field]
    size = TSIZE[field]
    old = struct.unpack_from(FMT[size], base, at)[0]
    for v in _values(old, size):
        b = bytearray(base)
        struct.pack_into(FMT[size], b, at, v)
        assert c_code(shim, bytes(b)) == CODE_OF["bad-crc"]   # table CRC first
        agree(shim, bytes(fix_crcs(b)))


def test_mangle_magic_and_truncations(shim):
    base = VECTORS["sample"]
    for i in range(8):
        b = bytearray(base)
        b[i] ^= 0x20
        assert agree(shim, bytes(b)) == CODE_OF["bad-magic"]
    for n in list(range(0, 80)) + list(range(80, len(base), 97)) + [len(base) - 1]:
        assert agree(shim, base[:n]) == CODE_OF["truncated"], n
    assert agree(shim, base + b"\0") == CODE_OF["bad-header"]


def test_header_len_larger_and_trailing_bytes(shim):
    """header_len 72 with zero / non-zero trailing header bytes."""
    s = snapfmt.loads(VECTORS["sample"])
    s.header_len = 72
    good = bytearray(s.to_bytes())
    assert agree(shim, bytes(good)) == 0
    good[68] = 1
    assert agree(shim, bytes(fix_crcs(good))) == CODE_OF["bad-header"]


def test_section_level_codes(shim):
    """unknown critical, bad section CRC, bad fixed length, count over limit."""
    def img(*adds):
        s = snapfmt.new("x86_64")
        for a in adds:
            s.add(*a[:3], **a[3] if len(a) > 3 else {})
        return s.to_bytes()

    assert agree(shim, img((0xF0000001, 0, b"x", {"flags": 1}))) == CODE_OF["unknown-critical"]
    assert agree(shim, img((0xF0000001, 0, b"x", {"flags": 0}))) == 0
    assert agree(shim, img(("x86.regs", 0, bytes(143)))) == CODE_OF["bad-length"]
    assert agree(shim, img(("x86.regs", 0, bytes(144), {"version": 9}))) == \
        CODE_OF["unknown-critical"]
    assert agree(shim, img(("x86.regs", 0, bytes(144), {"version": 9, "flags": 0}))) == 0
    msrs = struct.pack("<II", 3, 0) + bytes(32)
    assert agree(shim, img(("x86.msrs", 0, msrs))) == CODE_OF["bad-length"]
    msrs = struct.pack("<II", 100000, 0) + bytes(32)
    assert agree(shim, img(("x86.msrs", 0, msrs))) == CODE_OF["limit"]
    assert agree(shim, img(("x86.msrs", 0, b"\1\0\0"))) == CODE_OF["bad-length"]
    b = bytearray(img(("x86.regs", 0, bytes(144))))
    b[100] ^= 1
    assert agree(shim, bytes(b)) == CODE_OF["bad-crc"]


def test_deep_verify_bulk(shim):
    b = bytearray(VECTORS["sample"])
    s = snapfmt.loads(bytes(b))
    ram = s.find("ram")
    b[ram.offset + 4096] ^= 0xFF
    assert agree(shim, bytes(b)) == 0
    assert c_code(shim, bytes(b), deep=True) == CODE_OF["bad-crc"]
    assert len(snapfmt.loads(bytes(b)).deep_verify()) == 1


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_mangles_agree(shim, data):
    """Random byte edits (with CRCs fixed up so deeper checks are reached)."""
    base = data.draw(st.sampled_from(["sample", "sample3", "arm64k"]))
    b = bytearray(VECTORS[base])
    toff = struct.unpack_from("<Q", b, HO["table_offset"])[0]
    region = data.draw(st.sampled_from(["header", "table", "any"]))
    lo, hi = {"header": (8, 64), "table": (toff, len(b)), "any": (0, len(b))}[region]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(lo, hi - 1))
        b[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        fix_crcs(b)
    agree(shim, bytes(b))


def test_crc32c_matches_python(shim):
    rnd = os.urandom(100003)
    for n in (0, 1, 7, 8, 9, 4096, 100003):
        assert shim.snapfmt_crc32c(0, rnd[:n], n) == crc32c(rnd[:n])
    assert shim.snapfmt_crc32c(0, b"123456789", 9) == 0xE3069283


def test_strerror_from_generated_table(shim):
    for name, v, msg in L.ERROR_CODES:
        assert shim.snapfmt_strerror(-v).decode() == msg
