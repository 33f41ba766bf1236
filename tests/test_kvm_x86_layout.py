"""x86 KVM section declarations vs the kernel's UAPI headers, and round trips.

The C program is generated from the construct declarations: every leaf field
(and every nested struct, and element 0 and the last element of every array
of structs) becomes an ``offsetof``/``sizeof`` pair printed by a C program
compiled against the system ``<linux/kvm.h>``.  No number is copied here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import construct as c
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from snapfmt import kvm_x86 as kx
from snapfmt.decl import _unwrap, field_layout
from snapfmt.errors import EncodeError, FormatError, LimitError
from snapfmt.registry import _clean

CC = shutil.which("gcc") or shutil.which("cc")
HAVE_HEADERS = os.path.exists("/usr/include/linux/kvm.h")


def _subcon(decl, path: str):
    """The subcon at dotted ``path`` of a Struct (no array indices)."""
    sc = _unwrap(decl)
    for part in path.split("."):
        sc = _unwrap({s.name: s for s in sc.subcons}[part])
    return sc


def c_members(decl, prefix: str = "", base: int = 0):
    """(C member expression, offset, size) for every field of a fixed Struct.

    Uses decl.field_layout; arrays of structs are expanded at element 0 and at
    the last element so the element size and stride are checked too.
    """
    for path, off, size, tname in field_layout(decl, base, prefix):
        yield path, off, size
        rel = path[len(prefix) + 1:] if prefix else path
        inner = _subcon(decl, rel)
        if isinstance(inner, c.Array) and isinstance(_unwrap(inner.subcon), c.Struct):
            esz = inner.subcon.sizeof()
            for i in sorted({0, inner.count - 1}):
                yield f"{path}[{i}]", off + i * esz, esz
                yield from c_members(inner.subcon, f"{path}[{i}]", off + i * esz)


def layout_rows():
    """(label, C struct, C member expr or '' for the whole struct, offset, size)."""
    rows = []
    for kind in kx.X86_KINDS:
        if kind.kernel_struct is None:
            continue
        skip = set(kind.extra.get("c_unmapped", ()))
        if kind.fixed_size is not None:
            head, entry = kind.decl, None
        else:
            head, entry = kind.extra["header"], kind.extra.get("entry")
        rows.append((kind.name, kind.kernel_struct, "", 0, head.sizeof()))
        for expr, off, size in c_members(head):
            if expr not in skip:
                rows.append((kind.name, kind.kernel_struct, expr, off, size))
        if entry is not None:
            ef = kind.extra["entries_field"]
            rows.append((kind.name, kind.extra["entry_struct"], "", 0, entry.sizeof()))
            rows.append((kind.name, kind.kernel_struct, f"{ef}[0]", head.sizeof(),
                         entry.sizeof()))
            for expr, off, size in c_members(entry, f"{ef}[0]", head.sizeof()):
                rows.append((kind.name, kind.kernel_struct, expr, off, size))
    return rows


def generate_c(rows) -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "#define MSZ(T, m) sizeof(((T *)0)->m)", "int main(void) {"]
    for i, (_, struct, expr, _, _) in enumerate(rows):
        if expr:
            lines.append(f'  printf("{i} %zu %zu\\n", offsetof({struct}, {expr}), '
                         f"MSZ({struct}, {expr}));")
        else:
            lines.append(f'  printf("{i} %zu %zu\\n", (size_t)0, sizeof({struct}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(CC is None or not HAVE_HEADERS, reason="needs a C compiler and <linux/kvm.h>")
@pytest.mark.skipif(sys.platform != "linux", reason="Linux UAPI headers")
def test_layout_matches_kernel_headers(tmp_path):
    rows = layout_rows()
    src = tmp_path / "kvm_layout.c"
    exe = tmp_path / "kvm_layout"
    src.write_text(generate_c(rows))
    subprocess.run([CC, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = {}
    for line in out.splitlines():
        i, off, size = (int(x) for x in line.split())
        got[i] = (off, size)
    assert len(got) == len(rows)
    bad = [f"{name}: {struct} {expr or 'sizeof'}: declared ({off}, {size}) C {got[i]}"
           for i, (name, struct, expr, off, size) in enumerate(rows) if got[i] != (off, size)]
    assert bad == []
    # Every registered x86 kind is covered, and many fields per kind.
    covered = {r[0] for r in rows}
    assert covered == {k.name for k in kx.X86_KINDS if k.kernel_struct is not None}
    assert len(rows) > 250


def test_only_tsc_khz_is_snapfmt_private():
    assert [k.name for k in kx.X86_KINDS if k.kernel_struct is None] == ["x86.tsc_khz"]
    assert kx.TSC_KHZ.fixed_size == 8


def test_kinds_registered_for_x86_only():
    for k in kx.X86_KINDS:
        assert k.arch == "x86_64"
        assert k.ioctl and k.ioctl.startswith("KVM_GET_")
        assert k.name.startswith("x86.")
    assert {k.scope for k in kx.VCPU_KINDS} == {"vcpu"}
    assert {k.name for k in kx.VM_KINDS} == {"x86.pit2", "x86.clock", "x86.pic", "x86.ioapic"}


def test_every_declared_byte_is_a_field():
    """No construct Padding/Const: every byte round-trips through the JSON form."""
    for k in kx.X86_KINDS:
        decl = k.decl if k.fixed_size is not None else k.extra["header"]
        leaves = [(off, size) for path, off, size, t in field_layout(decl) if t != "struct"]
        covered = sorted(leaves)
        pos = 0
        for off, size in covered:
            assert off == pos, f"{k.name}: gap or overlap at {pos}"
            pos = off + size
        assert pos == decl.sizeof()


# --- round trips --------------------------------------------------------------

def roundtrip(decl, data: bytes, obj) -> None:
    assert _clean(decl.parse(data)) == obj
    assert decl.build(obj) == data
    assert decl.sizeof() == len(data)


FIXED = [k for k in kx.X86_KINDS if k.fixed_size is not None]


@pytest.mark.parametrize("kind", FIXED, ids=lambda k: k.name)
@pytest.mark.parametrize("seed", range(4))
def test_fixed_roundtrip_random_bytes(kind, seed):
    rng = np.random.default_rng(seed * 1000 + kind.type_id)
    data = rng.integers(0, 256, kind.fixed_size, dtype=np.uint8).tobytes()
    obj = kind.decode(data)
    roundtrip(kind.decl, data, obj)
    assert kind.encode(obj) == data
    # annotate works on arbitrary (even nonsensical) values
    kind.annotate(obj)
    import json
    json.dumps(obj)


@pytest.mark.parametrize("kind", FIXED, ids=lambda k: k.name)
def test_fixed_wrong_length_rejected(kind):
    with pytest.raises(FormatError):
        kind.decode(bytes(kind.fixed_size - 1))
    with pytest.raises(FormatError):
        kind.decode(bytes(kind.fixed_size + 8))


def test_regs_independent_vector():
    import struct
    names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags"]
    vals = [(0x1111111111111111 * (i + 1)) & (2**64 - 1) for i in range(len(names))]
    data = struct.pack("<18Q", *vals)
    roundtrip(kx.KvmRegs, data, dict(zip(names, vals)))


def test_sregs_long_mode_vector_annotates():
    seg = dict(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, dpl=0, db=0, s=1,
               l=1, g=1, avl=0, unusable=0, padding=0)
    dseg = dict(seg, selector=0x10, type=3, l=0, db=1)
    dt = dict(base=0x1000, limit=0x27, padding=[0, 0, 0])
    obj = dict(cs=seg, ds=dseg, es=dseg, fs=dseg, gs=dseg, ss=dseg,
               tr=dict(seg, selector=0x18, type=11, s=0, l=0, limit=0x67, g=0),
               ldt=dict(seg, selector=0, type=2, s=0, l=0, present=0, unusable=1),
               gdt=dt, idt=dict(dt, base=0), cr0=0x80050033, cr2=0, cr3=0x9000, cr4=0x6A0,
               cr8=0, efer=0xD01, apic_base=0xFEE00900, interrupt_bitmap=[0, 1 << 3, 0, 0])
    data = kx.KvmSregs.build(obj)
    roundtrip(kx.KvmSregs, data, obj)
    a = kx.SREGS.annotate(kx.SREGS.decode(data))
    assert "PG" in a["cr0"] and "PE" in a["cr0"] and "PAE" in a["cr4"]
    assert {"LME", "LMA", "SCE", "NXE"} == set(a["efer"])
    assert a["cs"]["l"] and a["cs"]["kind"] == "code"
    assert a["mode"].startswith("long")
    assert a["pending_interrupts"] == [64 + 3]
    assert a["apic_base"]["address"] == "0xfee00000" and "BSP" in a["apic_base"]["flags"]


def _lapic_with(values: dict[int, int]) -> bytes:
    b = bytearray(kx.KVM_APIC_REG_SIZE)
    for off, v in values.items():
        b[off:off + 4] = v.to_bytes(4, "little")
    return bytes(b)


def test_lapic_annotate():
    data = _lapic_with({kx.APIC_ID: 3 << 24, kx.APIC_LVR: 0x50014, kx.APIC_SPIV: 0x1FF,
                        kx.APIC_ISR + 0x10: 1 << 1, kx.APIC_IRR + 0x70: 1 << 31,
                        kx.APIC_TMR: 1, kx.APIC_LVTT: 0x400EF, kx.APIC_LVT0: 0x700,
                        kx.APIC_LVT1: 0x400, kx.APIC_LVTERR: 0x10000 | 0xFE,
                        kx.APIC_TDCR: 0xB, kx.APIC_TMICT: 12345,
                        kx.APIC_ICR: 0x4500, kx.APIC_ICR2: 2 << 24})
    a = kx.LAPIC.annotate(kx.LAPIC.decode(data))
    assert a["id"] == 3
    assert a["version"]["version"] == 0x14 and a["version"]["max_lvt"] == 5
    assert a["svr"]["apic_enabled"] and a["svr"]["spurious_vector"] == 0xFF
    assert a["isr"] == [32 + 1] and a["irr"] == [255] and a["tmr"] == [0]
    assert a["lvt_timer"]["timer_mode"] == "tsc-deadline" and a["lvt_timer"]["vector"] == 0xEF
    assert a["lvt_lint0"]["delivery_mode"] == "ExtINT" and not a["lvt_lint0"]["masked"]
    assert a["lvt_lint1"]["delivery_mode"] == "NMI"
    assert a["lvt_error"]["masked"] and a["lvt_error"]["vector"] == 0xFE
    assert a["timer_divide"]["divisor"] == 1
    assert a["timer_initial_count"] == 12345
    assert a["icr"]["delivery_mode"] == "INIT" and a["icr"]["destination"] == 2
    assert a["icr"]["level"] == "assert"


def test_ioapic_entry_decoding():
    obj = kx.IOAPIC.decode(bytes(kx.IOAPIC.fixed_size))
    obj["chip_id"] = kx.KVM_IRQCHIP_IOAPIC
    e = 0x31 | 1 << 8 | 1 << 11 | 1 << 13 | 1 << 15 | 1 << 16 | 0x5A << 56
    obj["chip"]["ioapic"]["redirtbl"][4] = e
    data = kx.IOAPIC.encode(obj)
    a = kx.IOAPIC.annotate(kx.IOAPIC.decode(data))
    r = a["redirtbl"][4]
    assert (r["vector"], r["delivery_mode"], r["dest_mode"], r["polarity"], r["trig_mode"],
            r["mask"], r["dest_id"], r["remote_irr"]) == (0x31, 1, 1, 1, 1, 1, 0x5A, 0)
    assert a["redirtbl"][3]["vector"] == 0 and len(a["redirtbl"]) == kx.KVM_IOAPIC_NUM_PINS


def test_pic_annotate():
    obj = kx.PIC.decode(bytes(kx.PIC.fixed_size))
    obj["chip_id"] = 1
    obj["chip"]["pic"].update(irq_base=0x28, imr=0xFB, elcr=0x0C)
    a = kx.PIC.annotate(kx.PIC.decode(kx.PIC.encode(obj)))
    assert a["chip"] == "slave" and a["irq_base"] == 0x28
    assert a["imr_masked"] == [0, 1, 3, 4, 5, 6, 7] and a["level_triggered"] == [2, 3]


def test_xsave_annotate_header_and_registers():
    region = bytearray(kx.XSAVE_LEGACY_SIZE)
    region[0:2] = (0x37F).to_bytes(2, "little")
    region[24:28] = (0x1F80).to_bytes(4, "little")
    region[160 + 16 * 2:160 + 16 * 3] = bytes(range(16))
    region[512:520] = (0b111).to_bytes(8, "little")
    region[576 + 16:576 + 32] = b"\xff" * 16
    data = bytes(region) + bytes(64)
    obj = kx.XSAVE.decode(data)
    assert kx.XSAVE.encode(obj) == data
    a = kx.XSAVE.annotate(obj)
    assert a["fcw"] == "0x037f" and a["mxcsr"] == "0x00001f80"
    assert a["xmm"][2] == "0x" + bytes(range(16))[::-1].hex()
    assert a["xstate_components"] == ["x87", "SSE", "AVX"] and a["xcomp_bv"] == "0x0"
    assert a["ymm_hi128"][1] == "0x" + "ff" * 16 and a["size"] == len(data)


@pytest.mark.parametrize("n", [0, 4095, 4097, 4098, 4099])
def test_xsave_bad_lengths(n):
    with pytest.raises(FormatError) as ei:
        kx.XSAVE.decode(bytes(n))
    assert ei.value.code == "bad-length" and ei.value.section == "x86.xsave"
    with pytest.raises(FormatError):
        kx.check_xsave(bytes(n))


def test_msr_names_and_annotate():
    assert kx.MSR_NAMES[0xC0000080] == "IA32_EFER" and kx.MSR_NAMES[0x1B] == "IA32_APIC_BASE"
    obj = {"nmsrs": 2, "pad": 0, "entries": [
        {"index": 0xC0000082, "reserved": 0, "data": 0xFFFFFFFF81000000},
        {"index": 0x12345678, "reserved": 0, "data": 5}]}
    a = kx.MSRS.annotate(kx.MSRS.decode(kx.MSRS.encode(obj)))
    assert a["msrs"] == {"LSTAR": "0xffffffff81000000", "MSR_0x12345678": "0x5"}


# --- variable sections: hypothesis round trips and count checks ------------------

u32s = st.integers(0, 2**32 - 1)
u64s = st.integers(0, 2**64 - 1)
cpuid_entry = st.fixed_dictionaries({
    "function": u32s, "index": u32s, "flags": u32s, "eax": u32s, "ebx": u32s, "ecx": u32s,
    "edx": u32s, "padding": st.lists(u32s, min_size=3, max_size=3)})
msr_entry = st.fixed_dictionaries({"index": u32s, "reserved": u32s, "data": u64s})


@settings(max_examples=60, deadline=None)
@given(entries=st.lists(cpuid_entry, max_size=40), pad=u32s)
def test_cpuid2_hypothesis_roundtrip(entries, pad):
    obj = {"nent": len(entries), "padding": pad, "entries": entries}
    data = kx.CPUID2.encode(obj)
    assert len(data) == kx.KvmCpuid2Header.sizeof() + len(entries) * kx.KvmCpuidEntry2.sizeof()
    assert kx.CPUID2.decode(data) == obj
    kx.check_cpuid2(data)
    arr = kx.cpuid_entries(data)
    assert arr.shape == (len(entries),)
    assert [int(x) for x in arr["function"]] == [e["function"] for e in entries]
    assert [list(map(int, x)) for x in arr["padding"]] == [e["padding"] for e in entries]
    kx.CPUID2.annotate(obj)


@settings(max_examples=60, deadline=None)
@given(entries=st.lists(msr_entry, max_size=80), pad=u32s)
def test_msrs_hypothesis_roundtrip(entries, pad):
    obj = {"nmsrs": len(entries), "pad": pad, "entries": entries}
    data = kx.MSRS.encode(obj)
    assert kx.MSRS.decode(data) == obj
    kx.check_msrs(data)
    arr = kx.msr_entries(data)
    assert [int(x) for x in arr["data"]] == [e["data"] for e in entries]
    assert [int(x) for x in arr["index"]] == [e["index"] for e in entries]


@settings(max_examples=30, deadline=None)
@given(head=st.binary(max_size=700), tail=st.binary(max_size=64), words=st.integers(0, 700))
def test_xsave_hypothesis_roundtrip(head, tail, words):
    region = (head + bytes(kx.XSAVE_LEGACY_SIZE))[:kx.XSAVE_LEGACY_SIZE - len(tail)] + tail
    data = region + bytes(range(256)) * (4 * words // 256) + bytes(4 * words % 256)
    obj = kx.XSAVE.decode(data)
    assert kx.XSAVE.encode(obj) == data
    kx.XSAVE.annotate(obj)


@pytest.mark.parametrize("kind,accessor,field", [
    (kx.CPUID2, kx.cpuid_entries, "nent"), (kx.MSRS, kx.msr_entries, "nmsrs")])
def test_count_inconsistent_with_length(kind, accessor, field):
    esz = kind.extra["entry"].sizeof()
    hsz = kind.extra["header"].sizeof()
    good = (3).to_bytes(4, "little") + bytes(hsz - 4) + bytes(3 * esz)
    accessor(good)
    kind.check_fn(good)
    for bad in (good[:-1], good + bytes(esz), good[:hsz - 1],
                (4).to_bytes(4, "little") + good[4:]):
        for fn in (accessor, kind.check_fn, kind.decode):
            with pytest.raises(FormatError) as ei:
                fn(bad)
            assert ei.value.code == "bad-length"
            assert ei.value.field == field and ei.value.section == kind.name
            assert ei.value.offset == 0
    limit = kind.extra["max_count"]
    huge = (limit + 1).to_bytes(4, "little") + bytes(hsz - 4) + bytes((limit + 1) * esz)
    with pytest.raises(LimitError) as ei:
        accessor(huge)
    assert ei.value.code == "limit" and ei.value.field == field
    at_limit = limit.to_bytes(4, "little") + bytes(hsz - 4) + bytes(limit * esz)
    assert accessor(at_limit).shape == (limit,)


def test_encode_rejects_inconsistent_count():
    with pytest.raises(EncodeError) as ei:
        kx.MSRS.encode({"nmsrs": 2, "pad": 0, "entries": []})
    assert ei.value.field == "nmsrs"
    with pytest.raises(EncodeError):
        kx.CPUID2.encode({"padding": 0, "entries": [{"function": 1}]})
    # nent may be omitted: it is derived from the entries
    assert kx.CPUID2.encode({"padding": 0, "entries": []}) == bytes(8)
