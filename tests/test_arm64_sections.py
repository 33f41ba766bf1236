"""arm64 section kinds: byte vectors, parse/build round trips, limits, hypothesis."""

import json
import struct
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snapfmt
from snapfmt import arm64 as a
from snapfmt.errors import EncodeError, FormatError, LimitError, SnapfmtError

from conftest import GOLDEN, ROOT

sys.path.insert(0, str(ROOT / "tools"))
import make_golden_arm64  # noqa: E402

KINDS = [a.VCPU_INIT, a.MP_STATE, a.REGS, a.HVF_VCPU, a.GICV3, a.GICV2, a.GIC_BLOB]
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def test_registered_with_typeids():
    from snapfmt import registry, typeids
    assert registry.by_name("arm64.regs").type_id == typeids.ARM64_VCPU_REGS
    for k in KINDS:
        assert registry.by_id(k.type_id) is k and k.arch == "aarch64"
    assert a.GICV3.scope == "vm" and a.REGS.scope == "vcpu"


# ------------------------------------------------------------------ vectors

def test_vcpu_init_vector():
    raw = struct.pack("<8I", 5, 0x4 | 0x8, 0, 0, 0, 0, 0, 0)
    f = a.VCPU_INIT.decode(raw)
    assert f == {"target": 5, "features": [12, 0, 0, 0, 0, 0, 0]}
    assert a.VCPU_INIT.encode(f) == raw and a.VCPU_INIT.fixed_size == 32
    assert a.VCPU_INIT.annotate(f) == {"target": "GENERIC_V8", "features": ["PSCI_0_2", "PMU_V3"]}


def test_mp_state_vector():
    raw = struct.pack("<II", 5, 0)
    assert a.MP_STATE.decode(raw) == {"mp_state": 5, "reserved": 0}
    assert a.MP_STATE.encode({"mp_state": 5, "reserved": 0}) == raw
    assert a.MP_STATE.annotate({"mp_state": 5, "reserved": 0}) == {"mp_state": "STOPPED"}


def test_regs_vector():
    v0 = 0x0123456789ABCDEF_FEDCBA9876543210
    raw = struct.pack("<II", 2, 0) + struct.pack("<QQQ", a.REG_PC, 0xFFFF800008000000, 0) \
        + struct.pack("<QQQ", a.core_reg_id("V0"), v0 & (2**64 - 1), v0 >> 64)
    f = a.REGS.decode(raw)
    assert f["count"] == 2 and f["regs"][1]["value_hi"] == 0x0123456789ABCDEF
    assert a.reg_value(f["regs"][1]) == v0
    assert a.REGS.encode(f) == raw
    assert a.REGS.encode(a.build_regs([(a.REG_PC, 0xFFFF800008000000),
                                       (a.core_reg_id("V0"), v0)])) == raw
    ann = a.REGS.annotate(f)["regs"]
    assert ann[0]["name"] == "PC" and ann[0]["value"] == "0xffff800008000000"
    assert ann[1]["value"] == "0x0123456789abcdeffedcba9876543210"
    arr = a.regs_array(raw)
    assert arr.dtype == a.ONE_REG_DTYPE and arr["id"].tolist() == [a.REG_PC, a.core_reg_id("V0")]
    assert a.regs_dict(f) == {a.REG_PC: 0xFFFF800008000000, a.core_reg_id("V0"): v0}


def test_regs_value_is_16_bytes_little_endian():
    raw = a.REGS.encode(a.build_regs([(a.core_reg_id("V1"), int.from_bytes(bytes(range(16)),
                                                                            "little"))]))
    assert raw[8 + 8:8 + 24] == bytes(range(16))


def test_regs_limit_and_length():
    with pytest.raises(LimitError) as e:
        a.REGS.decode(struct.pack("<II", a.MAX_ONE_REGS + 1, 0))
    assert e.value.code == "limit" and e.value.field == "count"
    with pytest.raises(FormatError) as e:
        a.REGS.decode(struct.pack("<II", 2, 0) + bytes(24))
    assert e.value.code == "bad-length"
    with pytest.raises(FormatError) as e:
        a.REGS.decode(b"\x01\x00")
    assert e.value.code == "bad-length"
    with pytest.raises(FormatError):
        a.REGS.decode(struct.pack("<II", 0, 0) + b"\0")      # trailing byte
    assert a.REGS.decode(struct.pack("<II", 0, 0)) == {"count": 0, "reserved": 0, "regs": []}
    with pytest.raises(EncodeError):
        a.REGS.encode(a.build_regs([(a.REG_PC, 0)] * (a.MAX_ONE_REGS + 1)))
    with pytest.raises(EncodeError):
        a.REGS.encode({"count": 3, "reserved": 0, "regs": []})
    with pytest.raises(EncodeError):
        a.REGS.encode({"count": 1, "reserved": 0, "regs": [{"id": -1, "value_lo": 0,
                                                           "value_hi": 0}]})


def test_max_count_regs_decode_fast():
    f = a.build_regs([(a.sysreg_id(3, 0, 0, 0, 0), i) for i in range(a.MAX_ONE_REGS)])
    raw = a.REGS.encode(f)
    assert len(raw) == 8 + 24 * a.MAX_ONE_REGS
    assert a.REGS.decode(raw) == f


def gic_rec(group, attr, value, mpidr=0):
    return {"group": group, "mpidr": mpidr, "attr": attr, "reserved": 0, "value": value}


def test_gicv3_vector():
    recs = [gic_rec(1, 0x4, 0x480001), gic_rec(6, 0xC230, 0xF0, mpidr=0x01000002)]
    raw = struct.pack("<II", 2, 0) + struct.pack("<IIIIQ", 1, 0, 4, 0, 0x480001) \
        + struct.pack("<IIIIQ", 6, 0x01000002, 0xC230, 0, 0xF0)
    f = {"count": 2, "reserved": 0, "regs": recs}
    assert a.GICV3.encode(f) == raw and a.GICV3.decode(raw) == f
    ann = a.GICV3.annotate(f)["regs"]
    assert ann[0]["name"] == "GICD_TYPER" and ann[0]["decoded"]["ITLinesNumber"] == 1
    assert ann[0]["decoded"]["max_intid"] == 63 and ann[0]["decoded"]["IDbits"] == 10
    assert ann[1] == {"group": "CPU_SYSREGS", "name": "ICC_PMR_EL1", "value": "0xf0",
                      "affinity": "1.0.0.2"}
    assert a.gic_attrs_array(raw)["value"].tolist() == [0x480001, 0xF0]


def test_gicv2_vector():
    raw = struct.pack("<IIQQ", 1, 0, 0x08000000, 0x08010000) + struct.pack("<IIII", 2, 1, 0x4, 0xF0)
    f = a.GICV2.decode(raw)
    assert f == {"count": 1, "reserved": 0, "dist_base": 0x08000000, "cpu_base": 0x08010000,
                 "regs": [{"group": 2, "cpuid": 1, "offset": 4, "value": 0xF0}]}
    assert a.GICV2.encode(f) == raw
    assert a.GICV2.annotate(f)["regs"][0]["name"] == "GICC_PMR"


def test_gic_blob_vector():
    raw = struct.pack("<II", 3, 1) + struct.pack("<IHHQ", 0, 0xC230, 0, 0xF0) + b"\x01\x02\x03"
    f = a.GIC_BLOB.decode(raw)
    assert f == {"blob_len": 3, "icc_count": 1, "icc": [{"vcpu": 0, "reg": 0xC230, "reserved": 0,
                                                        "value": 0xF0}], "blob": "010203"}
    assert a.GIC_BLOB.encode(f) == raw
    g = dict(f)
    del g["blob_len"], g["icc_count"]
    assert a.GIC_BLOB.encode(g) == raw
    assert a.GIC_BLOB.annotate(f)["icc"][0]["name"] == "ICC_PMR_EL1"
    with pytest.raises(LimitError):
        a.GIC_BLOB.decode(struct.pack("<II", a.MAX_GIC_BLOB + 1, 0))
    with pytest.raises(FormatError):
        a.GIC_BLOB.decode(raw[:-1])


def hvf_fields():
    return {"gpr_count": 2, "sys_count": 1, "simd_count": 1, "flags": a.HVF_F_VTIMER_MASKED,
            "vtimer_offset": 0x1234,
            "gprs": [{"id": 0, "reserved": 0, "value": 7},
                     {"id": a.HV_REG_PC, "reserved": 0, "value": 0xFFFF800008000000}],
            "sys_regs": [{"id": 0xC005, "reserved0": 0, "reserved1": 0, "value": 0x80000000}],
            "simd": [{"id": 31, "reserved": 0, "value_lo": 1, "value_hi": 2}]}


def test_hvf_vcpu_vector():
    raw = struct.pack("<IIIIQ", 2, 1, 1, 1, 0x1234) + struct.pack("<IIQ", 0, 0, 7) \
        + struct.pack("<IIQ", 31, 0, 0xFFFF800008000000) + struct.pack("<HHIQ", 0xC005, 0, 0,
                                                                        0x80000000) \
        + struct.pack("<IIQQ", 31, 0, 1, 2)
    assert a.HVF_VCPU.encode(hvf_fields()) == raw
    assert a.HVF_VCPU.decode(raw) == hvf_fields()
    ann = a.HVF_VCPU.annotate(hvf_fields())
    assert ann["gprs"]["HV_REG_PC"] == "0xffff800008000000"
    assert ann["sys_regs"] == {"HV_SYS_REG_MPIDR_EL1": "0x0000000080000000"}
    assert ann["simd"]["HV_SIMD_FP_REG_Q31"] == "0x00000000000000020000000000000001"
    assert ann["flags"] == ["VTIMER_MASKED"]
    assert a.hvf_mpidr(hvf_fields()) == 0x80000000
    with pytest.raises(LimitError):
        a.HVF_VCPU.decode(struct.pack("<IIIIQ", 0, a.MAX_HVF_SYS_REGS + 1, 0, 0, 0))


# ------------------------------------------------------------------ golden

def golden_snap():
    return snapfmt.load(GOLDEN / "arm64-2vcpu.snap")


def test_golden_values():
    snap = golden_snap()
    assert snap.arch == "aarch64" and snap.vcpu_indices == [0, 1]
    assert [a.mpidr(snap.find("arm64.regs", i).fields) for i in (0, 1)] == [0x80000000, 0x80000001]
    regs = a.regs_dict(snap.find("arm64.regs", 0).fields)
    assert regs[a.REG_PSTATE] & 0x1F == 0x5                         # EL1h
    assert a.pstate_info(regs[a.REG_PSTATE])["mode"] == "EL1h"
    g = snap.find("arm64.gicv3").fields["regs"]
    typer = [r for r in g if r["group"] == 1 and r["attr"] == 4][0]["value"]
    assert a.gicd_typer_info(typer)["max_intid"] == 63
    assert {r["mpidr"] for r in g if r["group"] == 5} == {0, 1}
    assert snapfmt.validate(snap) == []


def test_golden_regenerates_identically():
    assert make_golden_arm64.build().to_bytes() == (GOLDEN / "arm64-2vcpu.snap").read_bytes()


@pytest.mark.parametrize("name", [k.name for k in KINDS if k.name not in
                                  ("arm64.hvf_vcpu", "arm64.gicv2", "arm64.gic_blob")])
def test_golden_sections_round_trip_and_json(name):
    for sec in golden_snap().all(name):
        f = sec.kind.decode(sec.data)
        assert sec.kind.encode(json.loads(json.dumps(f))) == bytes(sec.data)
        json.dumps(sec.kind.annotate(f))


# ------------------------------------------------------------------ hypothesis

@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_snapfmt_errors(kind, data):
    try:
        f = kind.decode(data)
    except SnapfmtError:
        return
    json.dumps(f)
    json.dumps(kind.annotate(f))
    assert kind.encode(f) == data


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(u64, st.integers(0, 2**128 - 1)), max_size=8))
def test_regs_round_trip_any_pairs(pairs):
    raw = a.REGS.encode(a.build_regs(pairs))
    f = a.REGS.decode(raw)
    assert [(r["id"], a.reg_value(r)) for r in f["regs"]] == pairs
    assert a.REGS.encode(f) == raw
    json.dumps(a.REGS.annotate(f))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(u32, u32, u32, u32, u64), max_size=8), u32)
def test_gicv3_round_trip_any_records(recs, reserved):
    raw = struct.pack("<II", len(recs), reserved) + b"".join(struct.pack("<IIIIQ", *r)
                                                             for r in recs)
    f = a.GICV3.decode(raw)
    assert a.GICV3.encode(f) == raw
    json.dumps(a.GICV3.annotate(f))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(u32, u32, u32, u32), max_size=8), u64, u64)
def test_gicv2_round_trip_any_records(recs, d, cpu):
    raw = struct.pack("<IIQQ", len(recs), 0, d, cpu) + b"".join(struct.pack("<IIII", *r)
                                                                 for r in recs)
    f = a.GICV2.decode(raw)
    assert a.GICV2.encode(f) == raw
    json.dumps(a.GICV2.annotate(f))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(u32, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), u64), max_size=4),
       st.binary(max_size=64))
def test_gic_blob_round_trip(icc, blob):
    raw = struct.pack("<II", len(blob), len(icc)) + b"".join(struct.pack("<IHHQ", *r)
                                                             for r in icc) + blob
    f = a.GIC_BLOB.decode(raw)
    assert a.GIC_BLOB.encode(f) == raw
    json.dumps(a.GIC_BLOB.annotate(f))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(u64, u64, u64), max_size=6), st.integers(0, 1))
def test_validate_never_crashes_on_random_regs(recs, vcpu):
    snap = make_golden_arm64.build()
    raw = struct.pack("<II", len(recs), 0) + b"".join(struct.pack("<QQQ", *r) for r in recs)
    snap.replace("arm64.regs", vcpu, data=raw)
    findings = snapfmt.validate(snapfmt.loads(snap.to_bytes()))
    assert all(isinstance(x, snapfmt.Finding) for x in findings)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3), u32, st.integers(0, 1), u64),
                max_size=8))
def test_validate_never_crashes_on_random_gic(recs):
    snap = make_golden_arm64.build()
    raw = struct.pack("<II", len(recs), 0) + b"".join(struct.pack("<IIIIQ", *r) for r in recs)
    snap.replace("arm64.gicv3", 0, data=raw)
    findings = snapfmt.validate(snapfmt.loads(snap.to_bytes()))
    assert all(isinstance(x, snapfmt.Finding) for x in findings)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**20), st.integers(0, 255))
def test_mangled_golden_file_raises_only_snapfmt_errors(pos, byte):
    data = bytearray((GOLDEN / "arm64-2vcpu.snap").read_bytes())
    pos %= len(data)
    data[pos] ^= byte or 1
    try:
        snap = snapfmt.loads(bytes(data))
    except SnapfmtError:
        return
    for f in snapfmt.validate(snap):
        assert isinstance(f, snapfmt.Finding)


def test_numpy_view_matches_decode():
    sec = golden_snap().find("arm64.regs", 1)
    arr = a.regs_array(sec.data)
    f = sec.fields
    assert isinstance(arr, np.ndarray) and len(arr) == f["count"]
    assert arr["id"].tolist() == [r["id"] for r in f["regs"]]
    assert arr["value_lo"].tolist() == [r["value_lo"] for r in f["regs"]]
