"""x86 semantic checks: a valid 2-vCPU state passes; each mangling gives its code."""

from __future__ import annotations

import copy

import pytest

import snapfmt
from snapfmt import kvm_x86 as kx
from snapfmt import x86_checks  # noqa: F401  (registers the checks)

NVCPU = 2
APIC_BASE = 0xFEE00000 | kx.APIC_BASE_EN
XCR0_X87_SSE_AVX = 0b111
AVX_OFFSET, AVX_SIZE = 576, 256


def _seg(**kw):
    s = dict(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, present=1, dpl=0, db=1, s=1,
             l=0, g=1, avl=0, unusable=0, padding=0)
    s.update(kw)
    return s


def vcpu_fields(i: int) -> dict[str, dict]:
    """Decoded fields of one consistent long-mode vCPU."""
    z = {k.name: k.decode(bytes(k.fixed_size)) for k in kx.VCPU_KINDS if k.fixed_size}
    regs = dict(z["x86.regs"], rax=0x1122334455667788, rip=0xFFFFFFFF81000000, rflags=0x202)
    dt = dict(base=0x1000, limit=0x27, padding=[0, 0, 0])
    sregs = dict(z["x86.sregs"], cs=_seg(selector=8, type=11, l=1, db=0), ds=_seg(), es=_seg(),
                 fs=_seg(), gs=_seg(), ss=_seg(),
                 tr=_seg(selector=0x18, type=11, s=0, db=0, g=0, limit=0x67),
                 ldt=_seg(selector=0, type=2, s=0, db=0, present=0, unusable=1),
                 gdt=dt, idt=dict(dt, base=0x2000, limit=0xFFF),
                 cr0=kx.CR0_PE | kx.CR0_PG | 0x50032, cr3=0x9000, cr4=kx.CR4_PAE | 0x600,
                 efer=kx.EFER_LME | kx.EFER_LMA | 1 | 1 << 11,
                 apic_base=APIC_BASE | (1 << 8 if i == 0 else 0))
    lapic = bytearray(kx.KVM_APIC_REG_SIZE)
    lapic[kx.APIC_ID:kx.APIC_ID + 4] = (i << 24).to_bytes(4, "little")
    lapic[kx.APIC_SPIV:kx.APIC_SPIV + 4] = (0x1FF).to_bytes(4, "little")
    xcrs = copy.deepcopy(z["x86.xcrs"])
    xcrs["nr_xcrs"] = 1
    xcrs["xcrs"][0] = dict(xcr=0, reserved=0, value=XCR0_X87_SSE_AVX)
    region = bytearray(kx.XSAVE_LEGACY_SIZE)
    region[0:2] = (0x37F).to_bytes(2, "little")
    region[24:28] = (0x1F80).to_bytes(4, "little")
    region[512:520] = XCR0_X87_SSE_AVX.to_bytes(8, "little")
    cpuid_entry = lambda fn, idx=0, **r: dict(  # noqa: E731
        dict(function=fn, index=idx, flags=0, eax=0, ebx=0, ecx=0, edx=0, padding=[0, 0, 0]),
        **r)
    cpuid = {"padding": 0, "entries": [
        cpuid_entry(0, eax=0xD, ebx=0x756E6547, edx=0x49656E69, ecx=0x6C65746E),
        cpuid_entry(1, ebx=i << 24),
        cpuid_entry(0xD, 0, flags=1, eax=XCR0_X87_SSE_AVX),
        cpuid_entry(0xD, 2, flags=1, eax=AVX_SIZE, ebx=AVX_OFFSET),
        cpuid_entry(0x80000001, edx=1 << 29)]}
    msrs = {"pad": 0, "entries": [
        dict(index=kx.MSR_IA32_APICBASE, reserved=0, data=sregs["apic_base"]),
        dict(index=0xC0000082, reserved=0, data=0xFFFFFFFF81A00000),
        dict(index=0xC0000081, reserved=0, data=0x0023001000000000)]}
    return {
        "x86.cpuid2": cpuid,
        "x86.mp_state": {"mp_state": 0 if i == 0 else 1},
        "x86.regs": regs,
        "x86.sregs": sregs,
        "x86.xsave": {"region": bytes(region).hex(), "extra": ""},
        "x86.xcrs": xcrs,
        "x86.debugregs": dict(z["x86.debugregs"], dr6=0xFFFF0FF0, dr7=0x400),
        "x86.lapic": {"regs": bytes(lapic).hex()},
        "x86.msrs": msrs,
        "x86.vcpu_events": z["x86.vcpu_events"],
        "x86.tsc_khz": {"tsc_khz": 2_000_000, "reserved": 0},
    }


def vm_fields() -> dict[tuple[str, int], dict]:
    out = {}
    for chip in (0, 1):
        p = kx.PIC.decode(bytes(kx.PIC.fixed_size))
        p["chip_id"] = chip
        out["x86.pic", chip] = p
    io = kx.IOAPIC.decode(bytes(kx.IOAPIC.fixed_size))
    io["chip_id"] = kx.KVM_IRQCHIP_IOAPIC
    io["chip"]["ioapic"]["base_address"] = 0xFEC00000
    io["chip"]["ioapic"]["redirtbl"] = [1 << 16] * kx.KVM_IOAPIC_NUM_PINS
    out["x86.ioapic", 0] = io
    out["x86.pit2", 0] = kx.PIT2.decode(bytes(kx.PIT2.fixed_size))
    out["x86.clock", 0] = dict(kx.CLOCK.decode(bytes(kx.CLOCK.fixed_size)), clock=10**9,
                               flags=2)
    return out


def metadata(vcpus) -> dict:
    return {"created_unix_ns": 0, "producer": "test", "producer_version": "0",
            "kernel_release": "6.0", "cpu_vendor": "GenuineIntel", "cpu_model": "test",
            "template": {"vcpus": str(vcpus)}}


def build(mangle=None, nvcpu: int = NVCPU, meta_vcpus=NVCPU, skip=()):
    """A snapshot built via the public API; ``mangle(vcpus, vm)`` edits fields first."""
    vcpus = [vcpu_fields(i) for i in range(nvcpu)]
    vm = vm_fields()
    if mangle is not None:
        mangle(vcpus, vm)
    snap = snapfmt.new("x86_64")
    if meta_vcpus is not None:
        snap.add("metadata", 0, fields=metadata(meta_vcpus))
    for (name, inst), f in vm.items():
        snap.add(name, inst, fields=f)
    for i, secs in enumerate(vcpus):
        for name, f in secs.items():
            if (name, i) not in skip:
                snap.add(name, i, fields=f)
    return snap


def x86_findings(snap):
    return [f for f in snapfmt.validate(snap) if f.code.startswith("x86-")]


def codes(snap):
    return sorted({f.code for f in x86_findings(snap)})


def test_valid_state_passes():
    snap = build()
    assert x86_findings(snap) == []
    assert not snapfmt.has_errors(snapfmt.validate(snap))


def test_valid_state_passes_after_save_and_load(tmp_path):
    p = tmp_path / "x.snap"
    build().save(p)
    snap = snapfmt.load(p)
    assert x86_findings(snap) == []
    assert len(snap.all("x86.regs")) == NVCPU


def _set(name, i, **kw):
    def mangle(vcpus, vm):
        vcpus[i][name].update(kw)
    return mangle


def _one(snap, code):
    found = x86_findings(snap)
    assert [f.code for f in found] == [code], [str(f) for f in found]
    return found[0]


def test_cr0_pg_without_pe():
    def m(vcpus, vm):
        s = vcpus[1]["x86.sregs"]
        s.update(cr0=s["cr0"] & ~kx.CR0_PE & ~kx.CR0_PG | kx.CR0_PG, efer=0,
                 cs=dict(s["cs"], l=0))
    # PG without PE, not in long mode (so only the CR0 finding)
    f = _one(build(m), "x86-cr0-pg-without-pe")
    assert f.location == "x86.sregs[vcpu 1].cr0" and f.severity == "error"


def test_efer_lma_without_pae_and_pg():
    def m(vcpus, vm):
        s = vcpus[0]["x86.sregs"]
        s.update(cr4=s["cr4"] & ~kx.CR4_PAE)
    f = _one(build(m), "x86-efer-lma-without-paging")
    assert f.location == "x86.sregs[vcpu 0].efer" and "CR4.PAE" in f.message


def test_efer_lme_pg_without_lma():
    def m(vcpus, vm):
        s = vcpus[0]["x86.sregs"]
        s.update(efer=s["efer"] & ~kx.EFER_LMA, cs=dict(s["cs"], l=0))
    _one(build(m), "x86-efer-lme-pg-without-lma")


def test_cs_l_outside_long_mode():
    def m(vcpus, vm):
        s = vcpus[0]["x86.sregs"]
        s.update(efer=0, cr0=kx.CR0_PE)
    f = _one(build(m), "x86-cs-l-outside-long-mode")
    assert f.location == "x86.sregs[vcpu 0].cs.l"


def test_cs_l_and_d_in_long_mode():
    def m(vcpus, vm):
        s = vcpus[1]["x86.sregs"]
        s["cs"] = dict(s["cs"], db=1)
    f = _one(build(m), "x86-cs-l-and-d")
    assert f.location == "x86.sregs[vcpu 1].cs.db"


def test_apic_base_sregs_vs_msr():
    def m(vcpus, vm):
        vcpus[1]["x86.msrs"]["entries"][0]["data"] ^= kx.APIC_BASE_EN
    f = _one(build(m), "x86-apic-base-mismatch")
    assert f.location == "x86.sregs[vcpu 1].apic_base" and "x86.msrs[vcpu 1]" in f.message


def test_lapic_id_vs_vcpu_index():
    def m(vcpus, vm):
        vcpus[0]["x86.lapic"], vcpus[1]["x86.lapic"] = vcpus[1]["x86.lapic"], vcpus[0]["x86.lapic"]
    found = x86_findings(build(m))
    assert {f.code for f in found} == {"x86-lapic-id-mismatch"}
    assert sorted(f.location for f in found) == ["x86.lapic[vcpu 0].regs.id",
                                                 "x86.lapic[vcpu 1].regs.id"]
    assert {f.severity for f in found} == {"warning"}


def test_lapic_id_x2apic_full_width_accepted():
    def m(vcpus, vm):
        s, msrs = vcpus[1]["x86.sregs"], vcpus[1]["x86.msrs"]
        s["apic_base"] |= kx.APIC_BASE_EXTD
        msrs["entries"][0]["data"] = s["apic_base"]
        regs = bytearray.fromhex(vcpus[1]["x86.lapic"]["regs"])
        regs[kx.APIC_ID:kx.APIC_ID + 4] = (1).to_bytes(4, "little")
        vcpus[1]["x86.lapic"]["regs"] = regs.hex()
    assert x86_findings(build(m)) == []


def _xsave_edit(i, fn):
    def m(vcpus, vm):
        r = bytearray.fromhex(vcpus[i]["x86.xsave"]["region"])
        fn(r)
        vcpus[i]["x86.xsave"]["region"] = r.hex()
    return m


def test_xsave_xcomp_bv():
    m = _xsave_edit(0, lambda r: r.__setitem__(slice(520, 528),
                                               (1 << 63 | 0b111).to_bytes(8, "little")))
    f = _one(build(m), "x86-xsave-xcomp-bv")
    assert f.location == "x86.xsave[vcpu 0].region.xcomp_bv"


def test_xsave_header_reserved():
    _one(build(_xsave_edit(1, lambda r: r.__setitem__(560, 1))), "x86-xsave-header-reserved")


def test_xsave_component_beyond_size():
    """XSTATE_BV claims a component CPUID places beyond the 4096-byte buffer."""
    def m(vcpus, vm):
        _xsave_edit(0, lambda r: r.__setitem__(slice(512, 520),
                                               (XCR0_X87_SSE_AVX | 1 << 18).to_bytes(8, "little")))(vcpus, vm)
        vcpus[0]["x86.xcrs"]["xcrs"][0]["value"] |= 1 << 18
        vcpus[0]["x86.cpuid2"]["entries"].append(dict(
            function=0xD, index=18, flags=1, eax=8192, ebx=2816, ecx=0, edx=0, padding=[0] * 3))
    f = _one(build(m), "x86-xsave-too-small")
    assert "XTILEDATA" in f.message and f.location == "x86.xsave[vcpu 0].region.xstate_bv"


def test_xsave_component_fits_with_extra():
    def m(vcpus, vm):
        _xsave_edit(0, lambda r: r.__setitem__(slice(512, 520),
                                               (XCR0_X87_SSE_AVX | 1 << 18).to_bytes(8, "little")))(vcpus, vm)
        vcpus[0]["x86.xsave"]["extra"] = bytes(2816 + 8192 - 4096).hex()
        vcpus[0]["x86.xcrs"]["xcrs"][0]["value"] |= 1 << 18
        vcpus[0]["x86.cpuid2"]["entries"].append(dict(
            function=0xD, index=18, flags=1, eax=8192, ebx=2816, ecx=0, edx=0, padding=[0] * 3))
    assert x86_findings(build(m)) == []


def test_xsave_bv_not_in_xcr0():
    def m(vcpus, vm):
        vcpus[1]["x86.xcrs"]["xcrs"][0]["value"] = 0b11
    f = _one(build(m), "x86-xsave-bv-not-in-xcr0")
    assert "AVX" in f.message


def test_cpuid_duplicate():
    def m(vcpus, vm):
        e = vcpus[0]["x86.cpuid2"]["entries"]
        e.append(dict(e[1], eax=5))
    f = _one(build(m), "x86-cpuid-duplicate")
    assert f.location == "x86.cpuid2[vcpu 0].entries[5]" and "entries[1]" in f.message


def test_cpuid_same_function_other_index_is_fine():
    def m(vcpus, vm):
        e = vcpus[0]["x86.cpuid2"]["entries"]
        e.append(dict(e[3], index=3, eax=0, ebx=0))
    assert x86_findings(build(m)) == []


def test_msr_duplicate_warns():
    def m(vcpus, vm):
        e = vcpus[1]["x86.msrs"]["entries"]
        e.append(dict(e[1]))
    f = _one(build(m), "x86-msr-duplicate")
    assert f.severity == "warning" and "LSTAR" in f.message


@pytest.mark.parametrize("value", [5, 8, 11, 0xFFFFFFFF])
def test_mp_state_out_of_range(value):
    f = _one(build(_set("x86.mp_state", 1, mp_state=value)), "x86-mp-state-range")
    assert f.location == "x86.mp_state[vcpu 1].mp_state"


@pytest.mark.parametrize("value", sorted(kx.MP_STATES_X86))
def test_mp_state_x86_values_accepted(value):
    assert x86_findings(build(_set("x86.mp_state", 1, mp_state=value))) == []


def test_vcpu_missing_section():
    f = _one(build(skip={("x86.lapic", 1)}), "x86-vcpu-sections-differ")
    assert f.location == "vcpu 1" and "x86.lapic" in f.message


def test_vcpu_index_gap():
    snap = build(nvcpu=3, meta_vcpus=2,
                 skip={(k.name, 1) for k in kx.VCPU_KINDS})
    found = x86_findings(snap)
    assert [f.code for f in found] == ["x86-vcpu-index-gap"]
    assert found[0].location == "vcpu 1"


def test_vcpu_count_vs_metadata():
    f = _one(build(meta_vcpus=3), "x86-vcpu-count-metadata")
    assert f.location == "metadata.template.vcpus"
    _one(build(meta_vcpus="two"), "x86-vcpu-count-metadata")


def test_metadata_absent_is_tolerated():
    assert x86_findings(build(meta_vcpus=None)) == []


def test_pic_chip_id_vs_instance():
    def m(vcpus, vm):
        vm["x86.pic", 1]["chip_id"] = 0
    f = _one(build(m), "x86-irqchip-chip-id")
    assert f.location == "x86.pic[1].chip_id"


def test_ioapic_chip_id():
    def m(vcpus, vm):
        vm["x86.ioapic", 0]["chip_id"] = 1
    _one(build(m), "x86-irqchip-chip-id")


def test_tsc_khz_reserved():
    _one(build(_set("x86.tsc_khz", 0, reserved=1)), "x86-tsc-khz-reserved")


def test_undecodable_section_is_reported_once_not_crashing():
    snap = build(skip={("x86.msrs", 0)})
    snap.add("x86.msrs", 0, data=(5).to_bytes(4, "little") + bytes(4))
    raw = snap.to_bytes()
    with pytest.raises(snapfmt.FormatError) as ei:
        snapfmt.loads(raw)
    assert ei.value.code == "bad-length" and ei.value.section == "x86.msrs[vcpu 0]"
    assert ei.value.field == "nmsrs"
    found = snapfmt.validate(snapfmt.loads(raw, strict=False))
    bad = [f for f in found if f.code == "bad-length"]
    assert len(bad) == 1 and bad[0].location.startswith("x86.msrs[vcpu 0].nmsrs")
    assert [f.code for f in found if f.code.startswith("x86-")] == []


def test_xsave_pkru_reported_by_kvm_without_xcr0_pkru_is_fine():
    """KVM returns PKRU (bit 9) in XSTATE_BV even when the guest's XCR0 lacks it."""
    def m(vcpus, vm):
        r = bytearray.fromhex(vcpus[0]["x86.xsave"]["region"])
        r[512:520] = (XCR0_X87_SSE_AVX | 1 << 9).to_bytes(8, "little")
        vcpus[0]["x86.xsave"]["region"] = r.hex()
        vcpus[0]["x86.xsave"]["extra"] = bytes(2696 + 8 - 4096 + 4096).hex()
        vcpus[0]["x86.cpuid2"]["entries"].append(dict(
            function=0xD, index=9, flags=1, eax=8, ebx=2688, ecx=0, edx=0, padding=[0] * 3))
    assert [f.code for f in x86_findings(build(m))] == []
