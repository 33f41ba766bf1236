"""Synthetic but realistic x86_64 snapshots (goldens, benchmarks, `make demo`).

Values are what a 64-bit guest in long mode looks like to KVM: flat segments,
CR0.PE|PG, CR4.PAE, EFER.LME|LMA, LAPIC at 0xfee00000 with ID = vCPU index,
the syscall MSRs set.  Deterministic: same arguments, same bytes.
"""

from __future__ import annotations

import struct

from . import layout as L
from .container import Snapshot
from .registry import by_name

APIC_BASE = 0xFEE00000
MSR_APIC_BASE = 0x1B
MSRS = [  # index, value(vcpu)
    (0x10, lambda i: 0x1000 * (i + 1)),          # IA32_TSC
    (0x1B, lambda i: APIC_BASE | 0x800 | (0x100 if i == 0 else 0)),
    (0x174, lambda i: 0x10),                      # SYSENTER_CS
    (0x175, lambda i: 0),                         # SYSENTER_ESP
    (0x176, lambda i: 0),                         # SYSENTER_EIP
    (0x277, lambda i: 0x0007040600070406),        # PAT
    (0xC0000081, lambda i: 0x0023001000000000),   # STAR
    (0xC0000082, lambda i: 0xFFFFFFFF81800000),   # LSTAR
    (0xC0000083, lambda i: 0xFFFFFFFF81801000),   # CSTAR
    (0xC0000084, lambda i: 0x47700),              # SFMASK
    (0xC0000100, lambda i: 0),                    # FS_BASE
    (0xC0000101, lambda i: 0xFFFF888000000000 + i * 0x10000),  # GS_BASE
    (0xC0000102, lambda i: 0),                    # KERNEL_GS_BASE
    (0xC0000103, lambda i: i),                    # TSC_AUX
    (0x6E0, lambda i: 0),                         # TSC_DEADLINE
]


def _seg(selector, type_, base=0, limit=0xFFFFFFFF, l=0, db=0, s=1, dpl=0, g=1, present=1):
    return dict(base=base, limit=limit, selector=selector, type=type_, present=present, dpl=dpl,
                db=db, s=s, l=l, g=g, avl=0, unusable=0, padding=0)


def regs(i: int) -> bytes:
    k = by_name("x86.regs")
    f = k.decode(bytes(k.fixed_size))
    f.update(rax=0x1111 * (i + 1), rbx=0xB0B0 + i, rcx=i, rdx=0xD0D0, rsi=0x5151, rdi=0xD1D1,
             rsp=0x8000 + 0x1000 * i, rbp=0x8000 + 0x1000 * i, r8=8, r9=9, r10=10, r11=11,
             r12=12, r13=13, r14=14, r15=15, rip=0x100000 + 0x10 * i, rflags=0x202)
    return k.encode(f)


def sregs(i: int) -> bytes:
    k = by_name("x86.sregs")
    f = k.decode(bytes(k.fixed_size))
    f.update(cs=_seg(0x10, 0xB, l=1), ds=_seg(0x18, 0x3), es=_seg(0x18, 0x3),
             fs=_seg(0x18, 0x3), gs=_seg(0x18, 0x3), ss=_seg(0x18, 0x3),
             tr=_seg(0x20, 0xB, base=0x5000, limit=0x67, s=0, g=0),
             ldt=_seg(0, 0x2, limit=0xFFFF, s=0, g=0, present=0))
    f["ldt"]["unusable"] = 1
    f["gdt"] = dict(base=0x1000, limit=0x2F, padding=[0, 0, 0])
    f["idt"] = dict(base=0x2000, limit=0xFFF, padding=[0, 0, 0])
    f.update(cr0=0x80050033, cr2=0, cr3=0x9000, cr4=0x6A0, cr8=0, efer=0xD01,
             apic_base=APIC_BASE | 0x800 | (0x100 if i == 0 else 0))
    return k.encode(f)


def lapic(i: int) -> bytes:
    regs_ = bytearray(1024)

    def put(off, v):
        struct.pack_into("<I", regs_, off, v)
    put(0x20, i << 24)          # ID
    put(0x30, 0x50014)          # version
    put(0xD0, 1 << (24 + i % 8))  # LDR
    put(0xE0, 0xFFFFFFFF)       # DFR flat
    put(0xF0, 0x1FF)            # SVR: enabled, spurious vector 0xff
    put(0x320, 0x200EC)         # LVT timer: periodic, vector 0xec
    put(0x330, 0x10000)
    put(0x340, 0x400)
    put(0x350, 0x700 if i == 0 else 0x10700)   # LINT0 ExtINT on the BSP
    put(0x360, 0x400)           # LINT1 NMI
    put(0x370, 0xFE)
    put(0x380, 0x61A80)         # timer initial count
    put(0x390, 0x30D40)         # current count
    put(0x3E0, 0xB)             # divide by 1
    return by_name("x86.lapic").encode({"regs": regs_.hex()})


def msrs(i: int) -> bytes:
    ents = [dict(index=idx, reserved=0, data=fn(i)) for idx, fn in MSRS]
    return by_name("x86.msrs").encode(dict(nmsrs=len(ents), pad=0, entries=ents))


def cpuid(nvcpu: int) -> bytes:
    ents = []
    leaves = [(0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
              (1, 0, 0x806EC, 0x00000800, 0xF7FA3203, 0x178BFBFF),
              (7, 0, 0, 0x009C4FBB, 0x4, 0),
              (0xD, 0, 0x7, 0x340, 0x340, 0),
              (0xD, 1, 0x1, 0, 0, 0),
              (0x80000000, 0, 0x80000008, 0, 0, 0),
              (0x80000001, 0, 0, 0, 0x121, 0x2C100800),
              (0x40000000, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)]
    for fn, idx, a, b, c_, d in leaves:
        flags = 1 if fn in (7, 0xD) else 0   # KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        ents.append(dict(function=fn, index=idx, flags=flags, eax=a, ebx=b, ecx=c_, edx=d,
                         padding=[0, 0, 0]))
    return by_name("x86.cpuid2").encode(dict(nent=len(ents), padding=0, entries=ents))


def xsave(i: int, size: int = 4096) -> bytes:
    b = bytearray(size)
    struct.pack_into("<HH", b, 0, 0x37F, 0)        # FCW, FSW
    struct.pack_into("<I", b, 24, 0x1F80)          # MXCSR
    struct.pack_into("<I", b, 28, 0xFFFF)          # MXCSR_MASK
    for r in range(16):                            # XMM0-15 = distinctive
        struct.pack_into("<QQ", b, 160 + 16 * r, 0x0101010101010101 * (r + 1), i)
    struct.pack_into("<Q", b, 512, 0x7)            # XSTATE_BV: x87|SSE|AVX
    for r in range(16):                            # YMM_Hi128 at 576
        struct.pack_into("<QQ", b, 576 + 16 * r, 0xA0 + r, i)
    return by_name("x86.xsave").encode(by_name("x86.xsave").decode(bytes(b)))


def simple(name: str, **values) -> bytes:
    k = by_name(name)
    f = k.decode(bytes(k.fixed_size))
    f.update(values)
    return k.encode(f)


def x86_snapshot(nvcpus: int = 4, ram_bytes: int = 1 << 20, *, template: bool = True,
                 created_unix_ns: int = 1767225600 * 10**9) -> Snapshot:
    snap = Snapshot("x86_64", 4096, L.HDR_F_TEMPLATE if template else 0)
    snap.add("metadata", fields=dict(
        created_unix_ns=created_unix_ns, producer="snapfmt-synth", producer_version="1",
        kernel_release="6.1.0-synthetic", cpu_vendor="GenuineIntel",
        cpu_model="Synthetic CPU @ 2.00GHz",
        template={"vcpus": str(nvcpus), "memory_mib": str(ram_bytes >> 20),
                  "image.digest": "sha256:" + "ab" * 32}))
    cp = cpuid(nvcpus)
    for i in range(nvcpus):
        snap.add("x86.cpuid2", i, data=cp)
        snap.add("x86.mp_state", i, data=simple("x86.mp_state", mp_state=0 if i == 0 else 0))
        snap.add("x86.regs", i, data=regs(i))
        snap.add("x86.sregs", i, data=sregs(i))
        snap.add("x86.xsave", i, data=xsave(i))
        snap.add("x86.xcrs", i, data=simple("x86.xcrs", nr_xcrs=1, flags=0,
                                            xcrs=[dict(xcr=0, reserved=0, value=7)]
                                            + [dict(xcr=0, reserved=0, value=0)] * 15))
        snap.add("x86.debugregs", i, data=simple("x86.debugregs", dr6=0xFFFF0FF0, dr7=0x400))
        snap.add("x86.lapic", i, data=lapic(i))
        snap.add("x86.vcpu_events", i, data=simple("x86.vcpu_events"))
        snap.add("x86.msrs", i, data=msrs(i))
        snap.add("x86.tsc_khz", i, data=simple("x86.tsc_khz", tsc_khz=2000000))
    snap.add("x86.pit2", data=simple("x86.pit2"))
    snap.add("x86.clock", data=simple("x86.clock", clock=123456789))
    for chip in (0, 1):
        f = by_name("x86.pic").decode(bytes(520))
        f["chip_id"] = chip
        f["chip"]["pic"].update(irq_base=0x20 if chip == 0 else 0x28, imr=0xFB if chip == 0
                                else 0xFF, init4=1, elcr_mask=0xF8 if chip == 0 else 0xDE)
        snap.add("x86.pic", chip, fields=f)
    f = by_name("x86.ioapic").decode(bytes(520))
    f["chip_id"] = 2
    io = f["chip"]["ioapic"]
    io["base_address"] = 0xFEC00000
    io["redirtbl"] = [(1 << 16) | (0x20 + p) for p in range(24)]
    io["redirtbl"][4] = 0x24                      # UART: unmasked, vector 0x24, dest 0
    snap.add("x86.ioapic", fields=f)
    ram = bytearray(ram_bytes)
    for p in range(0, ram_bytes, 4096 * 7):       # some touched pages
        ram[p:p + 16] = struct.pack("<QQ", p, 0x5EED)
    snap.add_ram(0, ram)
    return snap
