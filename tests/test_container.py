"""Container: canonical layout, atomic save, and the exact error for every mangled field."""

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import snapfmt
from snapfmt import layout as L
from snapfmt.crc import crc32c
from snapfmt.errors import SnapfmtError

HO, TO = L.HEADER_FIELD_OFFSETS, L.TABLE_FIELD_OFFSETS
FMT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
HSIZE = {sc.name: sc.sizeof() for sc in L.Header.subcons}
TSIZE = {sc.name: sc.sizeof() for sc in L.TableEntry.subcons}


def sample() -> bytes:
    s = snapfmt.new("x86_64", flags=L.HDR_F_TEMPLATE)
    s.add("metadata", fields=dict(created_unix_ns=1700000000 * 10**9, producer="test",
                                  producer_version="1", kernel_release="6.1", cpu_vendor="V",
                                  cpu_model="M", template={"vcpus": "0"}))
    s.add(0xF0000010, 0, data=b"private ancillary bytes", flags=0)
    ram = bytearray(4 * 4096)
    ram[4096:4100] = b"\x01\x02\x03\x04"
    s.add_ram(0x100000, ram)
    return s.to_bytes()


def hget(b, name):
    return struct.unpack_from(FMT[HSIZE[name]], b, HO[name])[0]


def hset(b, name, v):
    b = bytearray(b)
    struct.pack_into(FMT[HSIZE[name]], b, HO[name], v)
    return b


def reseal(b):
    """Recompute table and header CRCs after a deliberate edit."""
    b = bytearray(b)
    toff, cnt = hget(b, "table_offset"), hget(b, "section_count")
    esz = L.TABLE_ENTRY_SIZE
    if toff + cnt * esz <= len(b):
        struct.pack_into("<I", b, HO["table_crc32c"], crc32c(bytes(b[toff:toff + cnt * esz])))
    hl = hget(b, "header_len")
    if 64 <= hl <= len(b):
        struct.pack_into("<I", b, HO["header_crc32c"], 0)
        struct.pack_into("<I", b, HO["header_crc32c"], crc32c(bytes(b[:hl])))
    return bytes(b)


def tset(b, i, name, v):
    b = bytearray(b)
    off = hget(b, "table_offset") + i * L.TABLE_ENTRY_SIZE + TO[name]
    struct.pack_into(FMT[TSIZE[name]], b, off, v)
    return b


def tget(b, i, name):
    off = hget(b, "table_offset") + i * L.TABLE_ENTRY_SIZE + TO[name]
    return struct.unpack_from(FMT[TSIZE[name]], b, off)[0]


def code_of(b, strict=True):
    try:
        snap = snapfmt.loads(b, strict=strict)
    except SnapfmtError as e:
        return e.code
    bad = snap.deep_verify()
    return bad[0].code if bad else "ok"


def test_canonical_layout():
    b = sample()
    snap = snapfmt.loads(b)
    assert hget(b, "header_len") == 64
    assert snap.sections[0].offset == 64
    for s in snap.sections:
        align = snap.page_size if s.bulk else 8
        assert s.offset % align == 0
    last = max(s.offset + s.length for s in snap.sections)
    assert hget(b, "table_offset") == (last + 7) & ~7
    assert hget(b, "file_size") == len(b) == hget(b, "table_offset") + 32 * len(snap.sections)
    assert snap.to_bytes() == b


def test_sample_is_valid():
    assert code_of(sample()) == "ok"
    assert snapfmt.validate(snapfmt.loads(sample())) == [
        f for f in snapfmt.validate(snapfmt.loads(sample())) if f.severity != "error"]


HEADER_CASES = [
    ("magic", lambda b: bytes(b[:0]) + b"SNAPFMX\x00" + bytes(b[8:]), "bad-magic"),
    ("header_len", lambda b: hset(b, "header_len", 60), "bad-header"),
    ("header_len", lambda b: hset(b, "header_len", 4104), "bad-header"),
    ("header_len", lambda b: hset(b, "header_len", 66), "bad-header"),
    ("header_len", lambda b: hset(b, "header_len", 72), "bad-header"),     # trailing non-zero
    ("version_major", lambda b: hset(b, "version_major", 0), "bad-version"),
    ("compat_major", lambda b: hset(b, "compat_major", 2), "bad-version"),
    ("compat_minor", lambda b: hset(b, "compat_minor", 1), "bad-version"),
    ("arch", lambda b: hset(b, "arch", 3), "bad-arch"),
    ("reserved0", lambda b: hset(b, "reserved0", 1), "bad-header"),
    ("page_size", lambda b: hset(b, "page_size", 8192), "bad-header"),
    ("flags", lambda b: hset(b, "flags", 1 << 5), "bad-flags"),
    ("section_count", lambda b: hset(b, "section_count", L.MAX_SECTIONS + 1), "limit"),
    ("section_count", lambda b: hset(b, "section_count", hget(b, "section_count") + 1),
     "bad-offset"),
    ("table_entry_size", lambda b: hset(b, "table_entry_size", 40), "bad-header"),
    ("table_offset", lambda b: hset(b, "table_offset", hget(b, "table_offset") + 4), "bad-align"),
    ("table_offset", lambda b: hset(b, "table_offset", hget(b, "file_size")), "bad-offset"),
    ("table_offset", lambda b: hset(b, "table_offset", 0), "bad-offset"),
    ("table_offset", lambda b: hset(b, "table_offset", 2**64 - 8), "bad-offset"),
    ("file_size", lambda b: hset(b, "file_size", hget(b, "file_size") + 8), "truncated"),
    ("file_size", lambda b: hset(b, "file_size", hget(b, "file_size") - 8), "bad-header"),
]


@pytest.mark.parametrize("field,mangle,code", HEADER_CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(HEADER_CASES)])
def test_header_field_mangled(field, mangle, code):
    b = reseal(mangle(sample()))
    assert code_of(b) == code
    with pytest.raises(SnapfmtError) as ei:
        snapfmt.loads(b)
    if code not in ("bad-magic",) and field != "magic":
        assert ei.value.section in ("header", "table")


@pytest.mark.parametrize("field", [sc.name for sc in L.Header.subcons])
def test_header_field_without_reseal_is_caught(field):
    """Changing any header byte without fixing the CRC is always detected."""
    b = bytearray(sample())
    b[HO[field]] ^= 0x40
    assert code_of(bytes(b)) != "ok"


def test_header_crc_fields():
    b = sample()
    assert code_of(hset(b, "header_crc32c", hget(b, "header_crc32c") ^ 1)) == "bad-crc"
    assert code_of(reseal(b)) == "ok"
    assert code_of(hset(reseal(hset(b, "table_crc32c", 5)), "table_crc32c", 5)) == "bad-crc"


def test_version_rule():
    b = sample()
    # a newer minor that says old readers can read it is accepted
    assert code_of(reseal(hset(b, "version_minor", 7))) == "ok"
    # a newer major whose compat is still 1.0 is accepted too (the writer promises it)
    assert code_of(reseal(hset(b, "version_major", 2))) == "ok"
    # compat newer than the version is malformed
    assert code_of(reseal(hset(hset(b, "compat_minor", 1), "version_minor", 0))) == "bad-version"


def test_informational_flags_ignored():
    b = reseal(hset(sample(), "flags", L.HDR_F_TEMPLATE | (1 << 20)))
    snap = snapfmt.loads(b)
    assert snap.flags & (1 << 20)
    assert any(f.code == "header-info-flags" for f in snapfmt.validate(snap))
    assert snap.to_bytes() == b


def _first(b, name):
    snap = snapfmt.loads(sample())
    return next(s.index for s in snap.sections if s.name == name)


TABLE_CASES = [
    ("type", "memory_layout", lambda b, i: tset(b, i, "type", 0x7777), "unknown-critical"),
    ("type", "metadata", lambda b, i: tset(b, i, "type", 0x7777), "ok"),   # ancillary: skipped
    ("type", "metadata", lambda b, i: tset(b, i, "type", 0x0002), "duplicate"),
    ("instance", "ram", lambda b, i: tset(b, i, "instance", 5), "ok"),     # structurally fine
    ("version", "memory_layout", lambda b, i: tset(b, i, "version", 9), "unknown-critical"),
    ("version", "metadata", lambda b, i: tset(b, i, "version", 9), "ok"),
    ("flags", "metadata", lambda b, i: tset(b, i, "flags", 0x10), "bad-flags"),
    ("flags", "metadata", lambda b, i: tset(b, i, "flags", 0x2), "bad-align"),
    ("crc32c", "metadata", lambda b, i: tset(b, i, "crc32c", tget(b, i, "crc32c") ^ 1), "bad-crc"),
    ("crc32c", "ram", lambda b, i: tset(b, i, "crc32c", tget(b, i, "crc32c") ^ 1), "bad-crc"),
    ("offset", "metadata", lambda b, i: tset(b, i, "offset", 65), "bad-align"),
    ("offset", "metadata", lambda b, i: tset(b, i, "offset", 0), "bad-offset"),
    ("offset", "metadata", lambda b, i: tset(b, i, "offset", 2**64 - 8), "bad-offset"),
    ("offset", "ram", lambda b, i: tset(b, i, "offset", tget(b, i, "offset") + 8), "bad-align"),
    ("offset", "metadata", lambda b, i: tset(b, i, "offset", tget(b, i + 1, "offset")), "overlap"),
    ("offset", "metadata", lambda b, i: tset(b, i, "offset", hget(b, "table_offset")),
     "bad-offset"),
    ("length", "metadata", lambda b, i: tset(b, i, "length", 2**64 - 1), "bad-offset"),
    ("length", "metadata", lambda b, i: tset(b, i, "length", 4096), "overlap"),
    ("length", "ram", lambda b, i: tset(b, i, "length", 100), "bad-align"),
]


@pytest.mark.parametrize("field,target,mangle,code", TABLE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}-{i}" for i, c in enumerate(TABLE_CASES)])
def test_table_field_mangled(field, target, mangle, code):
    b = sample()
    i = _first(b, target)
    assert code_of(reseal(mangle(b, i))) == code


def test_metadata_length_limit():
    b = sample()
    i = _first(b, "metadata")
    big = reseal(tset(b, i, "length", L.MAX_STATE_SECTION_LEN + 8))
    assert code_of(big) in ("bad-offset",)   # outside the file first; the limit is checked after


def test_truncation_at_every_offset():
    b = sample()
    for n in range(len(b)):
        with pytest.raises(snapfmt.TruncatedError):
            snapfmt.loads(b[:n])


def test_every_bit_flip_in_crc_covered_bytes_is_detected():
    b = sample()
    snap = snapfmt.loads(b)
    covered = [(0, 64), (hget(b, "table_offset"), len(b))]
    covered += [(s.offset, s.offset + s.length) for s in snap.sections]
    for lo, hi in covered:
        for off in range(lo, hi):
            for bit in (0, 5) if hi - lo < 8192 else (3,):
                m = bytearray(b)
                m[off] ^= 1 << bit
                assert code_of(bytes(m)) != "ok", (off, bit)


def test_unknown_ancillary_preserved_byte_for_byte(tmp_path):
    b = sample()
    snap = snapfmt.loads(b)
    anc = snap.find(0xF0000010)
    assert anc is not None and not anc.critical and bytes(anc.data) == b"private ancillary bytes"
    snap.replace("metadata", 0, fields=dict(snap.metadata, producer="rewritten"))
    p = tmp_path / "r.snap"
    snap.save(p)
    again = snapfmt.load(p)
    assert bytes(again.find(0xF0000010).data) == b"private ancillary bytes"
    assert again.metadata["producer"] == "rewritten"


def test_save_is_atomic_and_sparse(tmp_path):
    s = snapfmt.new()
    ram = bytearray(64 * 4096)
    ram[10 * 4096] = 1
    s.add_ram(0, ram)
    p = tmp_path / "a.snap"
    s.save(p)
    assert p.read_bytes() == s.to_bytes()
    assert os.stat(p).st_blocks * 512 < 16 * 4096          # zero pages are holes
    assert [x.name for x in tmp_path.iterdir()] == ["a.snap"]  # no temp file left


def test_save_failure_leaves_nothing(tmp_path, monkeypatch):
    s = snapfmt.loads(sample())
    p = tmp_path / "b.snap"
    p.write_bytes(b"old")

    def boom(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(snapfmt.SnapfmtOSError):
        s.save(p)
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b.snap"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_snapfmt_errors(data):
    try:
        snap = snapfmt.loads(b"SNAPFMT\x00" + data)
        snapfmt.validate(snap)
    except SnapfmtError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 255)), min_size=1, max_size=8),
       st.booleans())
def test_mutated_images_only_raise_snapfmt_errors(muts, do_reseal):
    b = bytearray(sample())
    for off, val in muts:
        b[off % len(b)] = val
    b = reseal(b) if do_reseal else bytes(b)
    try:
        snap = snapfmt.loads(b, strict=False)
        snapfmt.validate(snap)
        from snapfmt import jsonio
        jsonio.dump(snap)
    except SnapfmtError:
        pass
