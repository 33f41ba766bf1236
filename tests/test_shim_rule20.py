"""Rule 20 parity: the C reader's length rules == Python's check_fn / decoder.

Every kind with ``extra["length_rule"]`` (compiled by snapfmt.codegen into
SNAPFMT_LENGTH_RULE_ROWS) is exercised three ways:

* whole files (goldens and synthetic images, CRCs re-sealed) whose count,
  limit and value fields are mangled: ``snapfmt_open_buffer`` and
  ``snapfmt.loads`` return the SAME error code;
* section bytes alone: ``snapfmt_section_check`` (the whole rule, also for
  decode-only kinds such as arm64.hvf_vcpu) vs Python's check_fn (at-open
  kinds) or decoder (the others) -- same code whenever C fails, and 0 in
  Python whenever C passes, except for kinds whose rule is declared a prefix
  of the Python check (parent_ref's per-blob records);
* the reference interpreter ``codegen.apply_rule`` agrees with C on every
  mangle, so the rule table and the C interpreter say the same thing.
"""

from __future__ import annotations

import ctypes
import pathlib
import struct
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import snapfmt
from snapfmt import codegen, registry
from snapfmt import layout as L
from snapfmt.crc import crc32c
from snapfmt.errors import SnapfmtError

from test_shim_cross import py_code

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIM = ROOT / "shim"
GOLDEN = ROOT / "tests" / "golden"
HO, TO = L.HEADER_FIELD_OFFSETS, L.TABLE_FIELD_OFFSETS
CODE_OF = {L.error_code_name(n): -v for n, v, _ in L.ERROR_CODES}
NAME_OF = {-v: L.error_code_name(n) for n, v, _ in L.ERROR_CODES}
FMT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}

#: kinds whose rule is a faithful PREFIX of the Python check (C may accept
#: what Python rejects later, never the reverse)
PARTIAL = {"parent_ref"}

RULE_KINDS = [k for k in registry.all_kinds() if codegen.length_rule(k)]


class Section(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("instance", ctypes.c_uint32), ("version", ctypes.c_uint16),
                ("flags", ctypes.c_uint16), ("crc", ctypes.c_uint32),
                ("offset", ctypes.c_uint64), ("length", ctypes.c_uint64),
                ("data", ctypes.c_void_p)]


@pytest.fixture(scope="module")
def shim():
    subprocess.run(["make", "-C", str(SHIM), "-s"], check=True, capture_output=True)
    lib = ctypes.CDLL(str(SHIM / "libsnapfmt.so"))
    lib.snapfmt_open_buffer.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                        ctypes.POINTER(ctypes.c_void_p)]
    lib.snapfmt_close.argtypes = [ctypes.c_void_p]
    lib.snapfmt_section_check.argtypes = [ctypes.POINTER(Section)]
    lib.snapfmt_reader_fd.argtypes = [ctypes.c_void_p]
    return lib


def c_open(lib, data: bytes) -> int:
    r = ctypes.c_void_p()
    err = lib.snapfmt_open_buffer(data, len(data), 0, ctypes.byref(r))
    if err == 0:
        assert lib.snapfmt_reader_fd(r) == -1
        lib.snapfmt_close(r)
    return err


def c_section(lib, kind, buf: bytes) -> int:
    keep = ctypes.create_string_buffer(buf, len(buf) or 1)
    s = Section(0, kind.type_id, 0, kind.version, 0, 0, 0, len(buf),
                ctypes.cast(keep, ctypes.c_void_p))
    return lib.snapfmt_section_check(ctypes.byref(s))


def py_section(kind, buf: bytes) -> int:
    """Python's verdict on section bytes: what load runs (fixed size + check_fn),
    or the decoder for kinds Python checks only when decoding."""
    try:
        if kind.check_fn is not None:
            if kind.decode_fn is None and kind.fixed_size is not None and \
                    len(buf) != kind.fixed_size:
                return CODE_OF["bad-length"]
            kind.check_fn(buf)
        else:
            kind.decode(buf)
    except SnapfmtError as e:
        return CODE_OF[e.code]
    return 0


def ref_code(kind, buf: bytes) -> int:
    if kind.decode_fn is None and kind.fixed_size is not None and len(buf) != kind.fixed_size:
        return CODE_OF["bad-length"]
    c = codegen.apply_rule(kind, buf)
    return CODE_OF[c] if c else 0


# --- valid sections of every rule kind ------------------------------------------------

def _golden_sections() -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for p in sorted(GOLDEN.glob("*.snap")):
        for s in snapfmt.load(p).sections:
            if s.kind is not None and codegen.length_rule(s.kind):
                out.setdefault(s.name, []).append(bytes(s.data))
    return out


def _synthetic() -> dict[str, list[bytes]]:
    k = registry.by_name
    bm = np.zeros(2, "<u8")
    bm[0] = 0b1011
    bm[1] = 1 << 35
    out = {
        "arm64.hvf_vcpu": [k("arm64.hvf_vcpu").encode(dict(
            flags=1, vtimer_offset=5,
            gprs=[{"id": i, "reserved": 0, "value": i * 3} for i in range(3)],
            sys_regs=[{"id": 0xC005, "reserved0": 0, "reserved1": 0, "value": 7}],
            simd=[{"id": 0, "reserved": 0, "value_lo": 1, "value_hi": 2}] * 2))],
        "arm64.gicv2": [k("arm64.gicv2").encode(dict(
            reserved=0, dist_base=0x8000000, cpu_base=0x8010000,
            regs=[{"group": 1, "cpuid": 0, "offset": 4 * i, "value": i} for i in range(3)]))],
        "arm64.gic_blob": [k("arm64.gic_blob").encode(dict(
            icc=[{"vcpu": 0, "reg": 0xC230, "reserved": 0, "value": 0xF0}] * 2,
            blob="0102030405"))],
        "uart.8250": [bytes(11) + bytes([3, 2]) + bytes(67)],
        "parent_ref": [k("parent_ref").encode(dict(
            page_size=4096, parent_file_size=1 << 20, parent_digest="ab" * 32,
            parent_name="base.snap",
            blobs=[{"instance": 0, "npages": 100, "bitmap": bm.tobytes().hex()},
                   {"instance": 2, "npages": 3, "bitmap": "0300000000000000"}]))],
    }
    im = registry.by_name("virtiofs.inode_map")
    gold = _golden_sections().get("virtiofs.inode_map", [])
    if gold:   # a second map with mounts and handles from the golden one
        f = im.decode(gold[0])
        f["mounts"] = [{"mnt_id": 7, "path": "/"}, {"mnt_id": 9, "path": "sub/dir"}]
        f["handles"] = [{"handle": 1, "nodeid": 1, "open_flags": 0, "reserved": 0}]
        for c in ("entry_count", "handle_count", "mount_count", "strtab_len"):
            f.pop(c, None)
        out["virtiofs.inode_map"] = [im.encode(f)]
    return out


SECTIONS: dict[str, list[bytes]] = {}
for _n, _l in list(_golden_sections().items()) + list(_synthetic().items()):
    SECTIONS.setdefault(_n, []).extend(_l)


def test_every_rule_kind_has_samples():
    assert {k.name for k in RULE_KINDS} <= set(SECTIONS), \
        {k.name for k in RULE_KINDS} - set(SECTIONS)
    for name, bufs in SECTIONS.items():
        kind = registry.by_name(name)
        for b in bufs:
            assert py_section(kind, b) == 0 and ref_code(kind, b) == 0, name


def test_rule_is_consistent_with_declared_layout():
    """exact rules of counted kinds match the construct declaration's linear shape."""
    for k in RULE_KINDS:
        sh = codegen.kind_shape(k)
        if sh["shape"] != "linear":
            continue
        exact = [s for s in codegen.length_rule(k) if s[0] == "exact"]
        assert exact, k.name
        base, terms = exact[0][1], exact[0][2]
        assert base == sh["prefix"], k.name
        assert sorted((t[0], t[1], t[2]) for t in terms) == \
            sorted((o, w, e) for _, o, w, e in sh["terms"]), k.name


# --- mangles ---------------------------------------------------------------------------

def _fields_read(kind, buf: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every field the rule reads, plus the string fields."""
    out = set()
    for step in codegen.length_rule(kind):
        if step[0] in ("limit", "value_max", "value_in"):
            out.add((step[1], step[2]))
        elif step[0] in ("exact", "atleast"):
            out.update((t[0], t[1]) for t in step[2])
        elif step[0] == "strtab":
            _, base, len_off, arrays = step
            out.add((len_off, 4))
            pos = base
            for cnt_off, w, rec, so, sl in arrays:
                cnt = int.from_bytes(buf[cnt_off:cnt_off + w], "little")
                out.add((cnt_off, w))
                if so is not None:
                    for i in list(range(min(cnt, 3))) + ([cnt - 1] if cnt > 3 else []):
                        out.add((pos + i * rec + so, 4))
                        out.add((pos + i * rec + sl, 4))
                pos += cnt * rec
    return sorted(out)


def _limits(kind) -> set[int]:
    return {s[3] for s in codegen.length_rule(kind) if s[0] in ("limit", "value_max")}


def mangles(kind, buf: bytes):
    """(label, mangled section bytes) for every field the rule reads."""
    for off, w in _fields_read(kind, buf):
        if off + w > len(buf):
            continue
        old = int.from_bytes(buf[off:off + w], "little")
        top = (1 << 8 * w) - 1
        vals = {0, 1, 2, 3, old + 1, old - 1, old + 2, old * 2, old + 8, old - 8, top,
                top // 2, 1 << (8 * w - 1), 4096, 16384, 65536}
        for lim in _limits(kind):
            vals |= {lim, lim + 1, lim - 1}
        for v in sorted(x for x in vals if 0 <= x <= top and x != old):
            b = bytearray(buf)
            b[off:off + w] = v.to_bytes(w, "little")
            yield f"{off}:{w}={v}", bytes(b)
    for cut in (1, 4, 8, 16):
        if cut <= len(buf):
            yield f"len-{cut}", buf[:len(buf) - cut]
    yield "len+8", buf + bytes(8)
    yield "len+8ff", buf + b"\xff" * 8


def _check_section(shim, kind, label, b):
    c, p, r = c_section(shim, kind, b), py_section(kind, b), ref_code(kind, b)
    assert c == r, f"{kind.name} {label}: C {NAME_OF.get(c, c)} != rule {NAME_OF.get(r, r)}"
    if c:
        assert p == c, f"{kind.name} {label}: C {NAME_OF[c]}, Python {NAME_OF.get(p, p)}"
    elif kind.name not in PARTIAL:
        assert p == 0, f"{kind.name} {label}: C accepts, Python {NAME_OF[p]}"
    return c


@pytest.mark.parametrize("name", sorted(k.name for k in RULE_KINDS))
def test_section_mangles_same_code(shim, name):
    kind = registry.by_name(name)
    seen = set()
    for buf in SECTIONS[name]:
        for label, b in mangles(kind, buf):
            seen.add(_check_section(shim, kind, label, b))
    assert seen - {0}, f"no mangle of {name} was detected"


def _image(name: str, buf: bytes) -> bytes:
    kind = registry.by_name(name)
    s = snapfmt.new("aarch64" if kind.arch == "aarch64" else "x86_64")
    s.add(name, 0, data=buf)
    s.add("x86.regs" if kind.arch != "aarch64" else "arm64.mp_state", 0,
          data=bytes(144 if kind.arch != "aarch64" else 8))
    return s.to_bytes()


def _reseal(img: bytearray, index: int, new_len: int | None = None) -> bytearray:
    toff = struct.unpack_from("<Q", img, HO["table_offset"])[0]
    cnt = struct.unpack_from("<I", img, HO["section_count"])[0]
    e = toff + 32 * index
    off = struct.unpack_from("<Q", img, e + TO["offset"])[0]
    if new_len is not None:
        struct.pack_into("<Q", img, e + TO["length"], new_len)
    ln = struct.unpack_from("<Q", img, e + TO["length"])[0]
    struct.pack_into("<I", img, e + TO["crc32c"], crc32c(bytes(img[off:off + ln])))
    struct.pack_into("<I", img, HO["table_crc32c"], crc32c(bytes(img[toff:toff + 32 * cnt])))
    struct.pack_into("<I", img, HO["header_crc32c"], 0)
    struct.pack_into("<I", img, HO["header_crc32c"], crc32c(bytes(img[:64])))
    return img


def _file_mangles(img: bytes):
    """Mangle, in place, each rule section of a whole file (section CRC, table CRC and
    header CRC re-sealed); shrink its length too."""
    snap = snapfmt.loads(img)
    for s in snap.sections:
        kind = s.kind
        if kind is None or not codegen.length_rule(kind) or s.bulk:
            continue
        buf = bytes(s.data)
        for label, b in mangles(kind, buf):
            if len(b) > len(buf):
                continue
            out = bytearray(img)
            out[s.offset:s.offset + len(b)] = b
            yield f"{s.label} {label}", bytes(_reseal(out, s.index, len(b)))


@pytest.mark.parametrize("src", sorted(p.name for p in GOLDEN.glob("*.snap")) +
                         ["synthetic-" + k.name for k in RULE_KINDS])
def test_file_mangles_same_code(shim, src):
    if src.startswith("synthetic-"):
        name = src[len("synthetic-"):]
        imgs = [_image(name, b) for b in SECTIONS[name]]
    else:
        imgs = [(GOLDEN / src).read_bytes()]
    n = 0
    for img in imgs:
        assert c_open(shim, img) == py_code(img) == 0
        for label, b in _file_mangles(img):
            c, p = c_open(shim, b), py_code(b)
            if c == 0 and label.split("[")[0] in PARTIAL:
                continue    # Python's per-record checks beyond the rule's prefix
            assert c == p, f"{label}: C {NAME_OF.get(c, c)}, Python {NAME_OF.get(p, p)}"
            n += 1
    if src.startswith("synthetic-") or "arm64" in src or "x86" in src or "devices" in src:
        assert n, "nothing mangled"


def test_decode_only_kind_passes_open_but_fails_check(shim):
    """arm64.hvf_vcpu: Python checks it at decode, not at load; so does C."""
    kind = registry.by_name("arm64.hvf_vcpu")
    buf = bytearray(SECTIONS["arm64.hvf_vcpu"][0])
    buf[0] = 200                              # gpr_count > 64
    img = _image("arm64.hvf_vcpu", bytes(buf))
    assert c_open(shim, img) == py_code(img) == 0
    assert c_section(shim, kind, bytes(buf)) == py_section(kind, bytes(buf)) == CODE_OF["limit"]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_section_edits_agree(shim, data):
    name = data.draw(st.sampled_from(sorted(SECTIONS)))
    kind = registry.by_name(name)
    b = bytearray(data.draw(st.sampled_from(SECTIONS[name])))
    hi = min(len(b), data.draw(st.sampled_from([32, 96, len(b)])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, hi - 1))
        b[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        b = b[:data.draw(st.integers(0, len(b)))]
    _check_section(shim, kind, "random", bytes(b))


def test_inode_map_string_table_codes(shim):
    """bad-offset (non-canonical name_off), bad-length (names vs strtab_len), bad-value
    (non-zero padding) come out of the same STRTAB step in C as in parse_arrays."""
    kind = registry.by_name("virtiofs.inode_map")
    seen = set()
    for buf in SECTIONS["virtiofs.inode_map"]:
        slen = struct.unpack_from("<I", buf, 16)[0]
        if slen % 8:
            b = bytearray(buf)
            b[-1] = 0x5A
            seen.add(_check_section(shim, kind, "pad", bytes(b)))
        ne = struct.unpack_from("<I", buf, 0)[0]
        if ne >= 2:
            b = bytearray(buf)
            rec = 64 + 72                  # entries[1]
            struct.pack_into("<I", b, rec + 16, struct.unpack_from("<I", b, rec + 16)[0] + 1)
            seen.add(_check_section(shim, kind, "name_off+1", bytes(b)))
        nh, nm = struct.unpack_from("<II", buf, 4)
        if nm:                             # the last string one byte longer
            b = bytearray(buf)
            at = 64 + ne * 72 + nh * 24 + (nm - 1) * 16 + 12
            struct.pack_into("<I", b, at, struct.unpack_from("<I", b, at)[0] + 1)
            seen.add(_check_section(shim, kind, "path_len+1", bytes(b)))
    assert {CODE_OF["bad-offset"], CODE_OF["bad-length"]} <= seen


def test_rule_compiler_refuses_unproven_reads_and_unknown_steps():
    import construct as c
    from snapfmt.registry import SectionKind

    def kind(rule):
        return SectionKind(0xF00000EF, "test.rule", "vm", c.Struct("n" / c.Int32ul,
                           "d" / c.GreedyBytes), "t", extra={"length_rule": rule})
    assert codegen.compile_rule(kind((("min", 4), ("limit", 0, 4, 9))))
    for bad in ((("limit", 0, 4, 9),), (("min", 2), ("exact", 4, ((0, 4, 1),))),
                (("min", 4), ("bogus", 1)), (("min", 4), ("value_in", 0, 4, (1, 2, 3, 4)))):
        with pytest.raises(RuntimeError):
            codegen.compile_rule(kind(bad))
