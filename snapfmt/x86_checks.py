"""Semantic checks of x86_64 KVM state (registered with :func:`snapfmt.findings.check`).

Each check judges decoded sections of a loaded snapshot and yields
:class:`~snapfmt.findings.Finding` objects with a precise location such as
``x86.sregs[vcpu 1].cr0``.  Sections whose bytes do not decode are skipped
here: :func:`snapfmt.validate` already reports them.

Finding codes (stable; severity, meaning):

- ``x86-cr0-pg-without-pe`` (error): CR0.PG set, CR0.PE clear.
- ``x86-efer-lma-without-paging`` (error): EFER.LMA set without CR4.PAE and CR0.PG.
- ``x86-efer-lme-pg-without-lma`` (error): EFER.LME and CR0.PG set, LMA clear (KVM rejects).
- ``x86-cs-l-outside-long-mode`` (error): CS.L set while EFER.LMA is clear (KVM rejects).
- ``x86-cs-l-and-d`` (error): CS.L and CS.D both set in long mode (reserved).
- ``x86-apic-base-mismatch`` (error): sregs.apic_base differs from MSR IA32_APIC_BASE.
- ``x86-lapic-id-mismatch`` (warning): LAPIC ID register differs from the vCPU index.
- ``x86-xsave-xcomp-bv`` (error): XCOMP_BV != 0 (KVM's buffer is standard format).
- ``x86-xsave-header-reserved`` (error): XSAVE header bytes 528..575 not zero.
- ``x86-xsave-too-small`` (error): an XSTATE_BV component (placed by CPUID leaf 0xD)
  ends past the end of the section.
- ``x86-xsave-bv-not-in-xcr0`` (error): XSTATE_BV has components XCR0 does not enable
  (PKRU excepted: KVM always reports it in its XSAVE buffer).
- ``x86-cpuid-duplicate`` (error): two CPUID entries with the same function+index.
- ``x86-msr-duplicate`` (warning): one MSR index listed twice.
- ``x86-mp-state-range`` (error): mp_state is not one KVM_SET_MP_STATE accepts on x86
  (0-4, 9, 10; 5-8 are s390-only and get -EINVAL).
- ``x86-vcpu-index-gap`` (error): vCPU indices are not 0..n-1.
- ``x86-vcpu-sections-differ`` (error): a vCPU lacks a per-vCPU section others have.
- ``x86-vcpu-count-metadata`` (error): vCPU count differs from metadata template.vcpus.
- ``x86-irqchip-chip-id`` (error): x86.pic / x86.ioapic chip_id vs instance.
- ``x86-tsc-khz-reserved`` (error): x86.tsc_khz reserved field not zero.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator

import numpy as np

from . import kvm_x86 as kx
from . import registry

from .errors import FormatError
from .findings import ERROR, WARNING, Finding, check

ARCH = "x86_64"

XCR0 = 0
XFEATURE_PKRU_MASK = 1 << 9
#: Components whose standard-format place is fixed by the architecture: (offset, size).
_FIXED_XSAVE_COMPONENTS = {0: (0, 160), 1: (160, 256), 2: (576, 256)}


class _Rec:
    """Read-only field access over a numpy record with Python int results.

    The checks run on every vCPU of every snapshot validated, so they read the
    zero-copy numpy record (dtype derived from the declaration) instead of a
    fully decoded dict.
    """

    __slots__ = ("_r",)

    def __init__(self, rec):
        self._r = rec

    def __getitem__(self, name):
        v = self._r[name]
        if isinstance(v, np.void):
            return _Rec(v)
        if isinstance(v, np.ndarray):
            return v
        return int(v)


def _fields(sec):
    """Field access for a section, or None when its bytes do not decode (reported elsewhere)."""
    if sec is None:
        return None
    rec = sec.record
    if rec is not None:
        return _Rec(rec)
    try:
        return sec.fields
    except FormatError:
        return None


def _decoded(snap, name: str) -> Iterator[tuple[object, dict]]:
    for sec in snap.all(name):
        f = _fields(sec)
        if f is not None:
            yield sec, f


# ----------------------------------------------------------- control registers

@check("x86-control-registers", arch=ARCH)
def check_control_registers(snap):
    for sec, f in _decoded(snap, "x86.sregs"):
        cr0, cr4, efer = f["cr0"], f["cr4"], f["efer"]
        if cr0 & kx.CR0_PG and not cr0 & kx.CR0_PE:
            yield Finding("x86-cr0-pg-without-pe", ERROR, f"{sec.label}.cr0",
                          f"CR0 0x{cr0:x}: PG set without PE")
        long_mode = bool(efer & kx.EFER_LMA)
        if long_mode and not (cr4 & kx.CR4_PAE and cr0 & kx.CR0_PG):
            missing = [n for n, ok in (("CR4.PAE", cr4 & kx.CR4_PAE), ("CR0.PG", cr0 & kx.CR0_PG))
                       if not ok]
            yield Finding("x86-efer-lma-without-paging", ERROR, f"{sec.label}.efer",
                          f"EFER 0x{efer:x}: LMA set without {' and '.join(missing)}")
        if efer & kx.EFER_LME and cr0 & kx.CR0_PG and not long_mode:
            yield Finding("x86-efer-lme-pg-without-lma", ERROR, f"{sec.label}.efer",
                          f"EFER 0x{efer:x}: LME and CR0.PG set but LMA clear")
        cs = f["cs"]
        if cs["l"] and not long_mode:
            yield Finding("x86-cs-l-outside-long-mode", ERROR, f"{sec.label}.cs.l",
                          "64-bit code segment (CS.L) while EFER.LMA is clear")
        if long_mode and cs["l"] and cs["db"]:
            yield Finding("x86-cs-l-and-d", ERROR, f"{sec.label}.cs.db",
                          "CS.L and CS.D both set in long mode (reserved combination)")


# ------------------------------------------------------------------- APIC

@check("x86-apic", arch=ARCH)
def check_apic(snap):
    for sec, f in _decoded(snap, "x86.sregs"):
        msrs_sec = snap.find("x86.msrs", sec.instance)
        if msrs_sec is None:
            continue
        try:
            arr = kx.msr_entries(msrs_sec.data)
        except FormatError:
            continue
        hit = arr["data"][arr["index"] == kx.MSR_IA32_APICBASE]
        if not len(hit):
            continue
        m = int(hit[-1])
        if m != f["apic_base"]:
            yield Finding("x86-apic-base-mismatch", ERROR, f"{sec.label}.apic_base",
                          f"sregs.apic_base 0x{f['apic_base']:x} != "
                          f"{msrs_sec.label} IA32_APIC_BASE 0x{m:x}")
    for sec in snap.all("x86.lapic"):
        if sec.length != kx.LAPIC.fixed_size:
            continue
        raw = kx.lapic_reg(sec.data, kx.APIC_ID)
        if raw >> 24 == sec.instance:
            continue
        sregs = _fields(snap.find("x86.sregs", sec.instance))
        x2apic = sregs is not None and sregs["apic_base"] & kx.APIC_BASE_EXTD
        # x2APIC: KVM stores the full 32-bit ID with KVM_CAP_X2APIC_API, else ID << 24.
        ok = raw >> 24 == sec.instance or (x2apic and raw == sec.instance)
        if not ok:
            shown = raw if x2apic else raw >> 24
            yield Finding("x86-lapic-id-mismatch", WARNING, f"{sec.label}.regs.id",
                          f"LAPIC ID {shown} (register 0x{raw:08x}) differs from vCPU index "
                          f"{sec.instance}")


# ------------------------------------------------------------------- XSAVE

def _cpuid_xsave_layout(snap, vcpu: int) -> dict[int, tuple[int, int]]:
    """component -> (offset, size) in standard format, from CPUID leaf 0xD."""
    sec = snap.find("x86.cpuid2", vcpu)
    if sec is None:
        return dict(_FIXED_XSAVE_COMPONENTS)
    key = bytes(sec.data)            # vCPUs usually share one CPUID table: compute once
    memo = snap.__dict__.setdefault("_xsave_layout_memo", {})
    if key not in memo:
        memo[key] = _xsave_layout_from_cpuid(sec)
    return memo[key]


def _xsave_layout_from_cpuid(sec) -> dict[int, tuple[int, int]]:
    out = dict(_FIXED_XSAVE_COMPONENTS)
    try:
        arr = kx.cpuid_entries(sec.data)
    except FormatError:
        return out
    for e in arr[arr["function"] == 0xD]:
        i = int(e["index"])
        if 2 <= i < 64 and int(e["eax"]):
            out[i] = (int(e["ebx"]), int(e["eax"]))
    return out


def _xcr0(snap, vcpu: int) -> int | None:
    f = _fields(snap.find("x86.xcrs", vcpu))
    if f is None:
        return None
    for x in f["xcrs"][:min(f["nr_xcrs"], kx.KVM_MAX_XCRS)]:
        if int(x["xcr"]) == XCR0:
            return int(x["value"])
    return None


@check("x86-xsave", arch=ARCH)
def check_xsave(snap):
    for sec in snap.all("x86.xsave"):
        try:
            kx.check_xsave(sec.data)
        except FormatError:
            continue
        hdr = kx.xsave_header(bytes(sec.data[:kx.XSAVE_HDR_OFFSET + 64]))
        bv, comp = hdr["xstate_bv"], hdr["xcomp_bv"]
        loc = f"{sec.label}.region"
        if comp:
            yield Finding("x86-xsave-xcomp-bv", ERROR, f"{loc}.xcomp_bv",
                          f"XCOMP_BV 0x{comp:x}: KVM's XSAVE buffer is standard format "
                          f"(XCOMP_BV must be 0)")
        if any(hdr["reserved"]):
            yield Finding("x86-xsave-header-reserved", ERROR, f"{loc}.header",
                          "XSAVE header bytes 528..575 must be zero")
        layout = _cpuid_xsave_layout(snap, sec.instance)
        for bit in (b for b in range(bv.bit_length()) if bv >> b & 1):
            if bit in layout:
                off, size = layout[bit]
                if off + size > sec.length:
                    name = kx.XFEATURE_BITS.get(bit, f"bit{bit}")
                    yield Finding("x86-xsave-too-small", ERROR, f"{loc}.xstate_bv",
                                  f"XSTATE_BV has {name} at [{off}, {off + size}) but the "
                                  f"section is {sec.length} bytes")
        xcr0 = _xcr0(snap, sec.instance)
        # KVM's uABI XSAVE buffer always carries PKRU (bit 9) when the host supports it,
        # whatever the guest's XCR0: PKRU is context-switched outside XSAVES by KVM.
        if xcr0 is not None and bv & ~xcr0 & ~XFEATURE_PKRU_MASK:
            yield Finding("x86-xsave-bv-not-in-xcr0", ERROR, f"{loc}.xstate_bv",
                          f"XSTATE_BV 0x{bv:x} has components "
                          f"{kx.bit_names(bv & ~xcr0, kx.XFEATURE_BITS)} not enabled in "
                          f"XCR0 0x{xcr0:x}")


# ------------------------------------------------------------- CPUID / MSRs

@check("x86-cpuid", arch=ARCH)
def check_cpuid(snap):
    for sec in snap.all("x86.cpuid2"):
        try:
            arr = kx.cpuid_entries(sec.data)
        except FormatError:
            continue
        seen: dict[tuple[int, int], int] = {}
        for i, (fn, idx) in enumerate(zip(arr["function"].tolist(), arr["index"].tolist())):
            if (fn, idx) in seen:
                yield Finding("x86-cpuid-duplicate", ERROR, f"{sec.label}.entries[{i}]",
                              f"leaf 0x{fn:x} index {idx} already in entries[{seen[fn, idx]}]")
            else:
                seen[fn, idx] = i


@check("x86-msrs", arch=ARCH)
def check_msrs(snap):
    for sec in snap.all("x86.msrs"):
        try:
            arr = kx.msr_entries(sec.data)
        except FormatError:
            continue
        seen: dict[int, int] = {}
        for i, idx in enumerate(arr["index"].tolist()):
            if idx in seen:
                yield Finding("x86-msr-duplicate", WARNING, f"{sec.label}.entries[{i}]",
                              f"MSR {kx.msr_name(idx)} (0x{idx:x}) already in "
                              f"entries[{seen[idx]}]; KVM_SET_MSRS applies the last")
            else:
                seen[idx] = i


# ------------------------------------------------------------- vCPU set

@check("x86-mp-state", arch=ARCH)
def check_mp_state(snap):
    for sec, f in _decoded(snap, "x86.mp_state"):
        v = f["mp_state"]
        if v not in kx.MP_STATES_X86:
            what = (f"KVM_MP_STATE_{kx.MP_STATES[v]} is not an x86 state" if v in kx.MP_STATES
                    else "not a KVM_MP_STATE_* value")
            yield Finding("x86-mp-state-range", ERROR, f"{sec.label}.mp_state",
                          f"mp_state {v}: {what} (x86 accepts "
                          f"{sorted(kx.MP_STATES_X86)})")


def _vcpu_sections(snap) -> dict[int, Counter]:
    per: dict[int, Counter] = {}
    for k in registry.all_kinds():
        if k.scope != registry.SCOPE_VCPU or k.arch not in (None, ARCH):
            continue
        for s in snap.all(k.type_id):
            c = per.get(s.instance)
            if c is None:
                c = per[s.instance] = Counter()
            c[k.name] += 1
    return per


@check("x86-vcpus", arch=ARCH)
def check_vcpus(snap):
    per = _vcpu_sections(snap)
    idx = sorted(per)
    if idx != list(range(len(idx))):
        missing = sorted(set(range(max(idx) + 1)) - set(idx)) if idx else []
        yield Finding("x86-vcpu-index-gap", ERROR, f"vcpu {missing[0] if missing else 0}",
                      f"vCPU indices {idx} are not 0..{len(idx) - 1} (missing {missing})")
    union = set().union(*per.values()) if per else set()
    for i in idx:
        lacks = sorted(union - set(per[i]))
        if lacks:
            yield Finding("x86-vcpu-sections-differ", ERROR, f"vcpu {i}",
                          f"vCPU {i} has no {', '.join(lacks)} (other vCPUs have them)")
        for name, n in sorted(per[i].items()):
            if n > 1:
                yield Finding("x86-vcpu-sections-differ", ERROR, f"{name}[vcpu {i}]",
                              f"{n} {name} sections for vCPU {i}")
    meta = _fields(snap.find("metadata"))
    if meta is None:
        return
    want = (meta.get("template") or {}).get("vcpus")
    if want is None:
        return
    try:
        n = int(want, 10)
    except (TypeError, ValueError):
        yield Finding("x86-vcpu-count-metadata", ERROR, "metadata.template.vcpus",
                      f"template.vcpus {want!r} is not a decimal integer")
        return
    if n != len(idx):
        yield Finding("x86-vcpu-count-metadata", ERROR, "metadata.template.vcpus",
                      f"template.vcpus is {n} but the snapshot has {len(idx)} vCPU(s)")


# ------------------------------------------------------------- VM devices

@check("x86-irqchip", arch=ARCH)
def check_irqchip(snap):
    for sec, f in _decoded(snap, "x86.pic"):
        if sec.instance not in (kx.KVM_IRQCHIP_PIC_MASTER, kx.KVM_IRQCHIP_PIC_SLAVE) \
                or f["chip_id"] != sec.instance:
            yield Finding("x86-irqchip-chip-id", ERROR, f"{sec.label}.chip_id",
                          f"chip_id {f['chip_id']} in instance {sec.instance} (PIC instances "
                          f"are 0 = master and 1 = slave, equal to chip_id)")
    for sec, f in _decoded(snap, "x86.ioapic"):
        if f["chip_id"] != kx.KVM_IRQCHIP_IOAPIC or sec.instance != 0:
            yield Finding("x86-irqchip-chip-id", ERROR, f"{sec.label}.chip_id",
                          f"chip_id {f['chip_id']} in instance {sec.instance} (the IOAPIC is "
                          f"chip_id {kx.KVM_IRQCHIP_IOAPIC}, instance 0)")
    for sec, f in _decoded(snap, "x86.tsc_khz"):
        if f["reserved"]:
            yield Finding("x86-tsc-khz-reserved", ERROR, f"{sec.label}.reserved",
                          f"reserved is 0x{f['reserved']:x}, must be 0")
