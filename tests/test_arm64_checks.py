"""Each arm64 finding code, triggered by mangling one field of a clean snapshot."""

import copy
import re
import struct
import sys

import pytest

import snapfmt
from snapfmt import arm64 as a
from snapfmt import arm64_checks

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import make_golden_arm64  # noqa: E402

D, R, SYSREGS, LEVEL = 1, 5, 6, 7


def kvm_snap():
    return make_golden_arm64.build()


def hvf_snap():
    s = snapfmt.new("aarch64", page_size=16384)
    for i in range(2):
        s.add("arm64.hvf_vcpu", i, fields={
            "flags": 0, "vtimer_offset": 0x1000,
            "gprs": [{"id": 0, "reserved": 0, "value": i},
                     {"id": a.HV_REG_PC, "reserved": 0, "value": 0xFFFF800008000000},
                     {"id": a.HV_REG_CPSR, "reserved": 0, "value": 0x3C5}],
            "sys_regs": [{"id": a.HV_SYS_REG_MPIDR_EL1, "reserved0": 0, "reserved1": 0,
                          "value": 0x80000000 | i},
                         {"id": 0xC080, "reserved0": 0, "reserved1": 0, "value": 0x30D0198D}],
            "simd": [{"id": 0, "reserved": 0, "value_lo": 1, "value_hi": 0}]})
        s.add("arm64.mp_state", i, fields={"mp_state": 0, "reserved": 0})
    s.add("arm64.gic_blob", 0, fields={
        "icc": [{"vcpu": i, "reg": a.sysreg_encoding(3, 0, 4, 6, 0), "reserved": 0, "value": 0xF0}
                for i in range(2)], "blob": "00112233"})
    return s


def gicv2_snap():
    s = kvm_snap()
    s.remove(s.find("arm64.gicv3"))
    recs = [{"group": 1, "cpuid": 0, "offset": 0x0, "value": 1},
            {"group": 1, "cpuid": 0, "offset": 0x4, "value": 0x1 | 1 << 5},   # 64 INTIDs, 2 CPUs
            {"group": 1, "cpuid": 1, "offset": 0x100, "value": 0xFFFF},       # banked SGI enable
            {"group": 1, "cpuid": 0, "offset": 0x104, "value": 0xF},
            {"group": 2, "cpuid": 0, "offset": 0x4, "value": 0xF0},
            {"group": 2, "cpuid": 1, "offset": 0x4, "value": 0xF0},
            {"group": 3, "cpuid": 0, "offset": 0, "value": 64}]
    s.add("arm64.gicv2", 0, fields={"reserved": 0, "dist_base": 0x08000000,
                                    "cpu_base": 0x08010000, "regs": recs})
    return s


def findings(snap):
    return snapfmt.validate(snapfmt.loads(snap.to_bytes()))


def codes(snap):
    return {f.code for f in findings(snap)}


def edit(snap, name, inst, fn):
    f = copy.deepcopy(snap.find(name, inst).fields)
    fn(f)
    for arr, cnt in (("regs", "count"), ("icc", "icc_count"), ("gprs", "gpr_count"),
                     ("sys_regs", "sys_count"), ("simd", "simd_count")):
        if arr in f and cnt in f:
            f[cnt] = len(f[arr])
    if "blob" in f:
        f["blob_len"] = len(f["blob"]) // 2
    snap.replace(name, inst, fields=f)
    return snap


def reg(f, rid):
    return next(r for r in f["regs"] if r["id"] == rid)


def gic(f, group, attr, mpidr=0):
    return next(r for r in f["regs"]
                if r["group"] == group and r["attr"] == attr and r["mpidr"] == mpidr)


def rm(f, pred):
    f["regs"] = [r for r in f["regs"] if not pred(r)]


def set_(d, **kw):
    d.update(kw)


def move_vcpu(snap, old, new):
    for name in ("arm64.vcpu_init", "arm64.mp_state", "arm64.regs"):
        sec = snap.find(name, old)
        data = bytes(sec.data)
        snap.remove(sec)
        snap.add(name, new, data=data)
    return snap


def add_hvf(snap):
    snap.add("arm64.hvf_vcpu", 0, data=hvf_snap().find("arm64.hvf_vcpu", 0).data)
    return snap


def add_gicv2(snap):
    snap.add("arm64.gicv2", 0, data=gicv2_snap().find("arm64.gicv2").data)
    return snap


V = "arm64.vcpu_init"
M = "arm64.mp_state"
G = "arm64.regs"
G3 = "arm64.gicv3"
G2 = "arm64.gicv2"
H = "arm64.hvf_vcpu"
B = "arm64.gic_blob"
SVE_Z0 = 0x6080000000150000

# (code, base snapshot factory, mutation(snapshot) -> snapshot)
CASES = [
    ("arm64-mixed-backends", kvm_snap, add_hvf),
    ("arm64-vcpu-index-gap", kvm_snap, lambda s: move_vcpu(s, 1, 2)),
    ("arm64-vcpu-sections-differ", kvm_snap, lambda s: (s.remove(s.find(M, 1)), s)[1]),
    ("arm64-vcpu-init-differs", kvm_snap, lambda s: edit(s, V, 1, lambda f: set_(f, target=0))),
    ("arm64-vcpu-init-features", kvm_snap,
     lambda s: edit(s, V, 0, lambda f: f["features"].__setitem__(1, 1))),
    ("arm64-sve-state-missing", kvm_snap,
     lambda s: edit(s, V, 0, lambda f: f["features"].__setitem__(0, f["features"][0] | 16))),
    ("arm64-mp-state-range", kvm_snap, lambda s: edit(s, M, 0, lambda f: set_(f, mp_state=3))),
    ("arm64-mp-state-reserved", kvm_snap, lambda s: edit(s, M, 1, lambda f: set_(f, reserved=1))),
    ("arm64-regs-reserved", kvm_snap, lambda s: edit(s, G, 0, lambda f: set_(f, reserved=1))),
    ("arm64-regs-missing-pc", kvm_snap,
     lambda s: edit(s, G, 1, lambda f: rm(f, lambda r: r["id"] == a.REG_PC))),
    ("arm64-regs-missing-mpidr", kvm_snap,
     lambda s: edit(s, G, 1, lambda f: rm(f, lambda r: r["id"] == a.REG_MPIDR_EL1))),
    ("arm64-reg-duplicate-id", kvm_snap,
     lambda s: edit(s, G, 0, lambda f: f["regs"].append(dict(f["regs"][3])))),
    ("arm64-reg-bad-id", kvm_snap,
     lambda s: edit(s, G, 0, lambda f: set_(f["regs"][0], id=f["regs"][0]["id"] | 1 << 60))),
    ("arm64-reg-bad-id", kvm_snap,            # X0 + 4 bytes: the middle of a 64-bit member
     lambda s: edit(s, G, 0, lambda f: set_(f["regs"][0], id=f["regs"][0]["id"] + 1))),
    ("arm64-reg-size-unsupported", kvm_snap,
     lambda s: edit(s, G, 0, lambda f: f["regs"].append({"id": SVE_Z0, "value_lo": 0,
                                                         "value_hi": 0}))),
    ("arm64-reg-size-mismatch", kvm_snap,     # PC declared U32
     lambda s: edit(s, G, 0, lambda f: set_(reg(f, a.REG_PC), id=0x6020000000100040))),
    ("arm64-reg-size-mismatch", kvm_snap,     # MPIDR_EL1 declared U128
     lambda s: edit(s, G, 0, lambda f: set_(reg(f, a.REG_MPIDR_EL1), id=0x604000000013C005))),
    ("arm64-reg-value-exceeds-size", kvm_snap,
     lambda s: edit(s, G, 0, lambda f: set_(reg(f, a.REG_PC), value_hi=1))),
    ("arm64-reg-value-exceeds-size", kvm_snap,
     lambda s: edit(s, G, 0, lambda f: set_(reg(f, a.core_reg_id("FPSR")), value_lo=1 << 40))),
    ("arm64-pstate-mode", kvm_snap,
     lambda s: edit(s, G, 0, lambda f: set_(reg(f, a.REG_PSTATE), value_lo=0x3C7))),
    ("arm64-pstate-mode", kvm_snap,           # EL2h without KVM_ARM_VCPU_HAS_EL2
     lambda s: edit(s, G, 0, lambda f: set_(reg(f, a.REG_PSTATE), value_lo=0x3C9))),
    ("arm64-pstate-mode", kvm_snap,           # AArch32 SVC without KVM_ARM_VCPU_EL1_32BIT
     lambda s: edit(s, G, 1, lambda f: set_(reg(f, a.REG_PSTATE), value_lo=0x1D3))),
    ("arm64-mpidr-duplicate", kvm_snap,
     lambda s: edit(s, G, 1, lambda f: set_(reg(f, a.REG_MPIDR_EL1), value_lo=0x80000000))),
    # --- HVF vCPU
    ("arm64-hvf-flags", hvf_snap, lambda s: edit(s, H, 0, lambda f: set_(f, flags=0x80))),
    ("arm64-hvf-reserved", hvf_snap,
     lambda s: edit(s, H, 0, lambda f: set_(f["sys_regs"][0], reserved1=1))),
    ("arm64-hvf-unknown-reg", hvf_snap,
     lambda s: edit(s, H, 1, lambda f: set_(f["gprs"][0], id=35))),
    ("arm64-hvf-unknown-reg", hvf_snap,
     lambda s: edit(s, H, 1, lambda f: set_(f["simd"][0], id=32))),
    ("arm64-hvf-duplicate-id", hvf_snap,
     lambda s: edit(s, H, 0, lambda f: f["sys_regs"].append(dict(f["sys_regs"][0])))),
    ("arm64-hvf-missing-pc", hvf_snap,
     lambda s: edit(s, H, 0, lambda f: f.__setitem__("gprs", f["gprs"][:1]))),
    # --- GICv3
    ("arm64-gic-multiple", kvm_snap, add_gicv2),
    ("arm64-gic-reserved", kvm_snap, lambda s: edit(s, G3, 0, lambda f: set_(f, reserved=2))),
    ("arm64-gic-reserved", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(f["regs"][5], reserved=2))),
    ("arm64-gic-bad-group", kvm_snap,         # GRP_CTRL is an action, not state
     lambda s: edit(s, G3, 0, lambda f: set_(f["regs"][0], group=4))),
    ("arm64-gic-bad-group", kvm_snap,         # GICv2's CPU_REGS in a GICv3
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, D, 0x0), group=2))),
    ("arm64-gic-duplicate-attr", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: f["regs"].append(dict(gic(f, D, 0x8))))),
    ("arm64-gic-value-too-wide", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, D, 0x0), value=1 << 32 | 0x52))),
    ("arm64-gic-bad-offset", kvm_snap,        # misaligned
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, D, 0x8), attr=0xA))),
    ("arm64-gic-bad-offset", kvm_snap,        # hole in the GICD map
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, D, 0x8), attr=0x1000))),
    ("arm64-gic-bad-offset", kvm_snap,        # redistributor offset past both frames
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, R, 0x14), attr=0x20014))),
    ("arm64-gic-bad-offset", kvm_snap,        # SPI register in the SGI frame
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, R, 0x10080), attr=0x10084))),
    ("arm64-gic-bad-offset", kvm_snap,        # ITS: half of the 64-bit GITS_TYPER
     lambda s: edit(s, G3, 0, lambda f: f["regs"].append({"group": 8, "mpidr": 0, "attr": 0xC,
                                                          "reserved": 0, "value": 0}))),
    ("arm64-gic-mpidr-unexpected", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, D, 0x8), mpidr=1))),
    ("arm64-gic-dist-private-irq", kvm_snap,  # GICD_IGROUPR0
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, D, 0x84), attr=0x80))),
    ("arm64-gic-dist-private-irq", kvm_snap,  # GICD_IPRIORITYR7 (INTIDs 28-31)
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, D, 0x420), attr=0x41C))),
    ("arm64-gic-dist-private-irq", kvm_snap,  # GICD_IROUTER31
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, D, 0x6100), attr=0x60F8))),
    ("arm64-gic-irq-out-of-range", kvm_snap,  # GICD_ISENABLER2: INTIDs 64-95 of 0-63
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, D, 0x104), attr=0x108))),
    ("arm64-gic-irq-out-of-range", kvm_snap,  # GICD_IROUTER64
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, D, 0x6100), attr=0x6200))),
    ("arm64-gic-irq-out-of-range", kvm_snap,  # LINE_LEVEL for 64..95
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, LEVEL, 32), attr=64))),
    ("arm64-gic-typer-missing", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: rm(f, lambda r: r["group"] == D and r["attr"] == 4))),
    ("arm64-gic-nr-irqs", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, 3, 0), value=100))),
    ("arm64-gic-nr-irqs", kvm_snap,           # consistent alone, not with GICD_TYPER
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, 3, 0), value=96))),
    ("arm64-gic-bad-addr", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, 0, 2), value=0x08001000))),
    ("arm64-gic-bad-addr", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, 0, 3), attr=7))),
    ("arm64-gic-redist-missing", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: rm(f, lambda r: r["group"] == R and r["mpidr"] == 1))),
    ("arm64-gic-unknown-mpidr", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, R, 0x14, 1), mpidr=0x00000005))),
    ("arm64-gic-unknown-mpidr", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, LEVEL, 0, 1), mpidr=0x01000001))),
    ("arm64-gic-redist-typer-mismatch", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, R, 0xC, 1), value=7))),
    ("arm64-gic-bad-sysreg", kvm_snap,        # ICC_IAR1_EL1: not saved state
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, SYSREGS, 0xC230, 1),
                                             attr=a.sysreg_encoding(3, 0, 12, 12, 0)))),
    ("arm64-gic-bad-sysreg", kvm_snap,        # bits 31..16 of the attr must be 0
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, SYSREGS, 0xC230, 1), attr=0x1C230))),
    ("arm64-gic-icc-missing", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: rm(f, lambda r: r["group"] == SYSREGS and r["mpidr"]))),
    ("arm64-gic-bad-level-info", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, LEVEL, 32), attr=33))),
    ("arm64-gic-bad-level-info", kvm_snap,
     lambda s: edit(s, G3, 0, lambda f: set_(gic(f, LEVEL, 32), attr=1 << 10 | 32))),
    # --- GICv2
    ("arm64-gicv2-bad-cpuid", gicv2_snap,
     lambda s: edit(s, G2, 0, lambda f: set_(f["regs"][4], cpuid=5))),
    ("arm64-gic-bad-offset", gicv2_snap,      # GICC_IAR is not saved state
     lambda s: edit(s, G2, 0, lambda f: set_(f["regs"][4], offset=0xC))),
    ("arm64-gic-bad-addr", gicv2_snap, lambda s: edit(s, G2, 0, lambda f: set_(f, cpu_base=0x80))),
    ("arm64-gic-irq-out-of-range", gicv2_snap,
     lambda s: edit(s, G2, 0, lambda f: set_(f["regs"][3], offset=0x108))),
    ("arm64-gic-bad-group", gicv2_snap,
     lambda s: edit(s, G2, 0, lambda f: set_(f["regs"][3], group=6))),
    ("arm64-gic-typer-missing", gicv2_snap,
     lambda s: edit(s, G2, 0, lambda f: f["regs"].pop(1))),
    ("arm64-gic-nr-irqs", gicv2_snap, lambda s: edit(s, G2, 0, lambda f: set_(f["regs"][6],
                                                                              value=2000))),
    ("arm64-gic-duplicate-attr", gicv2_snap,
     lambda s: edit(s, G2, 0, lambda f: f["regs"].append(dict(f["regs"][0])))),
    ("arm64-gic-reserved", gicv2_snap, lambda s: edit(s, G2, 0, lambda f: set_(f, reserved=1))),
    # --- HVF GIC blob
    ("arm64-gic-blob-empty", hvf_snap, lambda s: edit(s, B, 0, lambda f: set_(f, blob=""))),
    ("arm64-gic-bad-sysreg", hvf_snap,
     lambda s: edit(s, B, 0, lambda f: set_(f["icc"][0], reg=0xC080))),
    ("arm64-gic-icc-unknown-vcpu", hvf_snap,
     lambda s: edit(s, B, 0, lambda f: set_(f["icc"][1], vcpu=7))),
    ("arm64-gic-duplicate-attr", hvf_snap,
     lambda s: edit(s, B, 0, lambda f: set_(f["icc"][1], vcpu=0))),
    ("arm64-gic-reserved", hvf_snap, lambda s: edit(s, B, 0, lambda f: set_(f["icc"][0],
                                                                            reserved=1))),
]


@pytest.mark.parametrize("base", [kvm_snap, hvf_snap, gicv2_snap],
                         ids=["kvm", "hvf", "gicv2"])
def test_base_snapshots_are_clean(base):
    fs = findings(base())
    assert not [f for f in fs if f.code.startswith("arm64-")], [str(f) for f in fs]
    assert not snapfmt.has_errors(fs), [str(f) for f in fs]


@pytest.mark.parametrize("code,base,mutate", CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_each_check_triggers(code, base, mutate):
    fs = findings(mutate(base()))
    hits = [f for f in fs if f.code == code]
    assert hits, f"{code} not raised; got {[str(f) for f in fs]}"
    for f in hits:
        assert f.severity in ("error", "warning") and f.location and f.message


def documented_codes():
    doc = arm64_checks.__doc__
    return set(re.findall(r"^(arm64-[a-z0-9-]+)\s", doc, re.M))


def test_every_documented_code_is_tested_and_emitted():
    doc = documented_codes()
    tested = {c for c, _, _ in CASES}
    src = (ROOT / "snapfmt" / "arm64_checks.py").read_text()
    emitted = set(re.findall(r'Finding\(\s*"(arm64-[a-z0-9-]+)"', src))
    assert doc == tested, (doc - tested, tested - doc)
    assert doc == emitted, (doc - emitted, emitted - doc)


def test_severities_match_the_table():
    doc = arm64_checks.__doc__
    table = dict(re.findall(r"^(arm64-[a-z0-9-]+)\s+(error|warning)", doc, re.M))
    for code, base, mutate in CASES:
        for f in findings(mutate(base())):
            if f.code == code:
                assert f.severity == table[code], code


def test_locations_are_precise():
    s = edit(kvm_snap(), G, 1, lambda f: set_(reg(f, a.REG_PC), value_hi=1))
    f = [x for x in findings(s) if x.code == "arm64-reg-value-exceeds-size"][0]
    assert f.location.startswith("arm64.regs[vcpu 1].regs[") and f.location.endswith("value_hi")
    s = edit(kvm_snap(), G3, 0, lambda f: set_(gic(f, D, 0x84), attr=0x80))
    f = [x for x in findings(s) if x.code == "arm64-gic-dist-private-irq"][0]
    assert f.location.startswith("arm64.gicv3[0].regs[") and "0..31" in f.message


def test_malformed_regs_section_is_a_load_error_not_a_crash():
    s = kvm_snap()
    s.replace(G, 0, data=struct.pack("<II", 5, 0) + bytes(24))
    with pytest.raises(snapfmt.FormatError) as e:
        snapfmt.loads(s.to_bytes())
    assert e.value.code == "bad-length" and e.value.section == "arm64.regs[vcpu 0]"
    fs = snapfmt.validate(snapfmt.loads(s.to_bytes(), strict=False))
    assert "bad-length" in {f.code for f in fs}


def test_vcpu_mpidrs_helper():
    assert arm64_checks.vcpu_mpidrs(kvm_snap()) == {0: 0x80000000, 1: 0x80000001}
    assert arm64_checks.vcpu_mpidrs(hvf_snap()) == {0: 0x80000000, 1: 0x80000001}
