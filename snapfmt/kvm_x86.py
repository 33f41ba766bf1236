"""x86_64 KVM state sections.

Every section here holds EXACTLY the bytes of the Linux KVM UAPI struct the
matching ioctl takes (``<linux/kvm.h>``, ``<asm/kvm.h>``), little-endian, so
a VMM hands the section to ``KVM_SET_*`` unchanged.  The one exception is
``x86.tsc_khz``: KVM_GET/SET_TSC_KHZ pass the value as the ioctl return
value / argument, so snapfmt stores it as ``u32 tsc_khz; u32 reserved``.

The construct declarations below are the single source of truth; field names
are the kernel's.  ``tests/test_kvm_x86_layout.py`` compiles a C program
generated from them against the system headers and compares every
``sizeof``/``offsetof``.

Variable-length sections (``x86.cpuid2``, ``x86.msrs``, ``x86.xsave``) have
hard limits: ``nent <= MAX_CPUID_ENTRIES`` (256, the kernel's
KVM_MAX_CPUID_ENTRIES); ``nmsrs <= MAX_MSR_ENTRIES`` (1024, snapfmt's own
limit; note KVM_GET/SET_MSRS take fewer than 256 entries per call
(MAX_IO_MSRS), so a VMM restoring a longer list splits it); an XSAVE area is a
multiple of 4 bytes in [4096, ``MAX_XSAVE_SIZE``].

Instances: per-vCPU sections use the vCPU index; ``x86.pic`` uses the
kvm_irqchip chip_id (0 = master, 1 = slave); every other VM section uses 0.
"""

from __future__ import annotations

from typing import Any, Callable

import construct as c
import numpy as np

from . import typeids
from .decl import HexBytes, _HexAdapter, dtype_of
from .errors import EncodeError, FormatError, LimitError
from .registry import SCOPE_VCPU, SCOPE_VM, SectionKind, _clean, register

ARCH = "x86_64"

u8 = c.Int8ul
u16 = c.Int16ul
u32 = c.Int32ul
u64 = c.Int64ul
s64 = c.Int64sl

# ---------------------------------------------------------------------------
# Hard limits and kernel constants
# ---------------------------------------------------------------------------

MAX_CPUID_ENTRIES = 256          # KVM_MAX_CPUID_ENTRIES
MAX_MSR_ENTRIES = 1024           # snapfmt's limit per x86.msrs section
XSAVE_LEGACY_SIZE = 4096         # sizeof(struct kvm_xsave) without extra[]
MAX_XSAVE_SIZE = 1 << 20         # far above any CPUID 0xD size (AMX: ~11 KiB)
KVM_APIC_REG_SIZE = 0x400
KVM_IOAPIC_NUM_PINS = 24
KVM_NR_INTERRUPTS = 256
KVM_MAX_XCRS = 16

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

MP_STATES = {
    0: "RUNNABLE", 1: "UNINITIALIZED", 2: "INIT_RECEIVED", 3: "HALTED",
    4: "SIPI_RECEIVED", 5: "STOPPED", 6: "CHECK_STOP", 7: "OPERATING", 8: "LOAD",
    9: "AP_RESET_HOLD", 10: "SUSPENDED",
}
#: States KVM_SET_MP_STATE accepts on x86 (5..8 are s390-only and give -EINVAL).
MP_STATES_X86 = frozenset({0, 1, 2, 3, 4, 9, 10})

# ---------------------------------------------------------------------------
# Declarations (struct names and field names are the kernel's)
# ---------------------------------------------------------------------------

KvmRegs = c.Struct(
    "rax" / u64,       # general purpose registers
    "rbx" / u64,       # "
    "rcx" / u64,       # "
    "rdx" / u64,       # "
    "rsi" / u64,       # "
    "rdi" / u64,       # "
    "rsp" / u64,       # stack pointer
    "rbp" / u64,       # frame pointer
    "r8" / u64,        # "
    "r9" / u64,        # "
    "r10" / u64,       # "
    "r11" / u64,       # "
    "r12" / u64,       # "
    "r13" / u64,       # "
    "r14" / u64,       # "
    "r15" / u64,       # "
    "rip" / u64,       # instruction pointer
    "rflags" / u64,    # RFLAGS (bit 1 always set)
)

KvmSegment = c.Struct(
    "base" / u64,      # segment base address
    "limit" / u32,     # segment limit in bytes (already scaled by g)
    "selector" / u16,  # selector value
    "type" / u8,       # 4-bit descriptor type
    "present" / u8,    # P bit
    "dpl" / u8,        # descriptor privilege level (0..3)
    "db" / u8,         # D/B bit (default operation size)
    "s" / u8,          # S bit (1 = code/data, 0 = system)
    "l" / u8,          # L bit (64-bit code segment)
    "g" / u8,          # G bit (granularity)
    "avl" / u8,        # AVL bit
    "unusable" / u8,   # segment unusable (VMX access-rights bit 16)
    "padding" / u8,    # padding, kept as is
)

KvmDtable = c.Struct(
    "base" / u64,                  # table base address
    "limit" / u16,                 # table limit
    "padding" / c.Array(3, u16),   # padding, kept as is
)

KvmSregs = c.Struct(
    "cs" / KvmSegment,             # code segment
    "ds" / KvmSegment,             # data segment
    "es" / KvmSegment,             # extra segment
    "fs" / KvmSegment,             # FS (base usually via MSR_FS_BASE)
    "gs" / KvmSegment,             # GS
    "ss" / KvmSegment,             # stack segment
    "tr" / KvmSegment,             # task register
    "ldt" / KvmSegment,            # local descriptor table
    "gdt" / KvmDtable,             # global descriptor table register
    "idt" / KvmDtable,             # interrupt descriptor table register
    "cr0" / u64,                   # control register 0
    "cr2" / u64,                   # page fault linear address
    "cr3" / u64,                   # page table base
    "cr4" / u64,                   # control register 4
    "cr8" / u64,                   # task priority register (TPR[7:4])
    "efer" / u64,                  # IA32_EFER
    "apic_base" / u64,             # IA32_APIC_BASE
    "interrupt_bitmap" / c.Array((KVM_NR_INTERRUPTS + 63) // 64, u64),  # pending external interrupt (one bit set at most)
)

KvmMpState = c.Struct(
    "mp_state" / u32,              # KVM_MP_STATE_* (see MP_STATES)
)

KvmXcr = c.Struct(
    "xcr" / u32,                   # XCR number (0 = XCR0)
    "reserved" / u32,              # reserved, kept as is
    "value" / u64,                 # register value
)

KvmXcrs = c.Struct(
    "nr_xcrs" / u32,                         # number of valid entries in xcrs
    "flags" / u32,                           # none defined
    "xcrs" / c.Array(KVM_MAX_XCRS, KvmXcr),  # XCR entries
    "padding" / c.Array(16, u64),            # padding, kept as is
)

KvmDebugregs = c.Struct(
    "db" / c.Array(4, u64),        # DR0..DR3 breakpoint addresses
    "dr6" / u64,                   # debug status
    "dr7" / u64,                   # debug control
    "flags" / u64,                 # none defined
    "reserved" / c.Array(9, u64),  # reserved, kept as is
)

KvmLapicState = c.Struct(
    "regs" / HexBytes(KVM_APIC_REG_SIZE),  # the 4 KiB-stride APIC register page, first 1 KiB
)

KvmVcpuEvents = c.Struct(
    "exception" / c.Struct(
        "injected" / u8,           # exception is being injected
        "nr" / u8,                 # exception vector
        "has_error_code" / u8,     # error_code is valid
        "pending" / u8,            # exception pending (KVM_CAP_EXCEPTION_PAYLOAD)
        "error_code" / u32,        # exception error code
    ),
    "interrupt" / c.Struct(
        "injected" / u8,           # external interrupt being injected
        "nr" / u8,                 # its vector
        "soft" / u8,               # software interrupt (INTn)
        "shadow" / u8,             # KVM_X86_SHADOW_INT_* interrupt shadow
    ),
    "nmi" / c.Struct(
        "injected" / u8,           # NMI being injected
        "pending" / u8,            # NMI pending
        "masked" / u8,             # NMIs blocked
        "pad" / u8,                # padding, kept as is
    ),
    "sipi_vector" / u32,           # SIPI vector (valid with KVM_VCPUEVENT_VALID_SIPI_VECTOR)
    "flags" / u32,                 # KVM_VCPUEVENT_VALID_*
    "smi" / c.Struct(
        "smm" / u8,                # vCPU is in SMM
        "pending" / u8,            # SMI pending
        "smm_inside_nmi" / u8,     # SMM entered from an NMI handler
        "latched_init" / u8,       # INIT latched while in SMM
    ),
    "triple_fault" / c.Struct(
        "pending" / u8,            # triple fault pending (KVM_VCPUEVENT_VALID_TRIPLE_FAULT)
    ),
    "reserved" / HexBytes(26),     # reserved, kept as is
    "exception_has_payload" / u8,  # exception_payload is valid
    "exception_payload" / u64,     # CR2/DR6 payload of a pending #PF/#DB
)

TscKhz = c.Struct(
    "tsc_khz" / u32,               # KVM_GET_TSC_KHZ return value (guest TSC frequency, kHz)
    "reserved" / u32,              # must be 0
)

KvmCpuidEntry2 = c.Struct(
    "function" / u32,              # CPUID leaf (EAX input)
    "index" / u32,                 # sub-leaf (ECX input)
    "flags" / u32,                 # KVM_CPUID_FLAG_*
    "eax" / u32,                   # output EAX
    "ebx" / u32,                   # output EBX
    "ecx" / u32,                   # output ECX
    "edx" / u32,                   # output EDX
    "padding" / c.Array(3, u32),   # padding, kept as is
)

KvmCpuid2Header = c.Struct(
    "nent" / u32,                  # number of entries that follow
    "padding" / u32,               # padding, kept as is
)

KvmCpuid2 = c.Struct(
    "nent" / u32,                                      # number of entries that follow
    "padding" / u32,                                   # padding, kept as is
    "entries" / c.Array(c.this.nent, KvmCpuidEntry2),  # nent CPUID entries
)

KvmMsrEntry = c.Struct(
    "index" / u32,                 # MSR number
    "reserved" / u32,              # reserved, kept as is
    "data" / u64,                  # MSR value
)

KvmMsrsHeader = c.Struct(
    "nmsrs" / u32,                 # number of entries that follow
    "pad" / u32,                   # padding, kept as is
)

KvmMsrs = c.Struct(
    "nmsrs" / u32,                                    # number of entries that follow
    "pad" / u32,                                      # padding, kept as is
    "entries" / c.Array(c.this.nmsrs, KvmMsrEntry),   # nmsrs MSR entries
)

KvmXsaveLegacy = c.Struct(
    "region" / HexBytes(XSAVE_LEGACY_SIZE),  # __u32 region[1024]: XSAVE standard-format image
)

KvmXsave = c.Struct(
    "region" / HexBytes(XSAVE_LEGACY_SIZE),  # __u32 region[1024]: XSAVE standard-format image
    "extra" / _HexAdapter(c.GreedyBytes),    # __u32 extra[]: rest for KVM_CAP_XSAVE2 sizes
)

KvmPitChannelState = c.Struct(
    "count" / u32,                 # reload value (can be 65536)
    "latched_count" / u16,         # latched counter value
    "count_latched" / u8,          # counter latch state
    "status_latched" / u8,         # status latched
    "status" / u8,                 # latched status byte
    "read_state" / u8,             # read byte sequence state
    "write_state" / u8,            # write byte sequence state
    "write_latch" / u8,            # low byte written so far
    "rw_mode" / u8,                # access mode (lobyte/hibyte/both)
    "mode" / u8,                   # counter mode 0..5
    "bcd" / u8,                    # BCD counting
    "gate" / u8,                   # gate input level
    "count_load_time" / s64,       # host ns when count was loaded (ktime)
)

KvmPitState2 = c.Struct(
    "channels" / c.Array(3, KvmPitChannelState),  # counters 0..2
    "flags" / u32,                                # KVM_PIT_FLAGS_*
    "reserved" / c.Array(9, u32),                 # reserved, kept as is
)

KvmClockData = c.Struct(
    "clock" / u64,                 # kvmclock value (ns)
    "flags" / u32,                 # KVM_CLOCK_*
    "pad0" / u32,                  # padding, kept as is
    "realtime" / u64,              # CLOCK_REALTIME ns at the sample (KVM_CLOCK_REALTIME)
    "host_tsc" / u64,              # host TSC at the sample (KVM_CLOCK_HOST_TSC)
    "pad" / c.Array(4, u32),       # padding, kept as is
)

KvmPicState = c.Struct(
    "last_irr" / u8,               # edge detection
    "irr" / u8,                    # interrupt request register
    "imr" / u8,                    # interrupt mask register
    "isr" / u8,                    # interrupt service register
    "priority_add" / u8,           # highest irq priority
    "irq_base" / u8,               # vector base (ICW2)
    "read_reg_select" / u8,        # OCW3 RR: read ISR (1) or IRR (0)
    "poll" / u8,                   # poll command pending
    "special_mask" / u8,           # special mask mode
    "init_state" / u8,             # ICW sequence position
    "auto_eoi" / u8,               # automatic EOI mode
    "rotate_on_auto_eoi" / u8,     # rotate priorities on auto EOI
    "special_fully_nested_mode" / u8,  # special fully nested mode
    "init4" / u8,                  # true if 4 byte init (ICW4 expected)
    "elcr" / u8,                   # PIIX edge/level trigger selection
    "elcr_mask" / u8,              # writable ELCR bits
)

KvmIoapicState = c.Struct(
    "base_address" / u64,          # MMIO base (0xfec00000)
    "ioregsel" / u32,              # selected register
    "id" / u32,                    # IOAPIC id
    "irr" / u32,                   # pending pins
    "pad" / u32,                   # padding, kept as is
    "redirtbl" / c.Array(KVM_IOAPIC_NUM_PINS, u64),  # redirection entries (union bits/fields)
)

_IRQCHIP_UNION = 512  # sizeof(kvm_irqchip.chip): char dummy[512]

KvmIrqchipPic = c.Struct(
    "chip_id" / u32,               # KVM_IRQCHIP_PIC_MASTER (0) or _SLAVE (1)
    "pad" / u32,                   # padding, kept as is
    "chip" / c.Struct(
        "pic" / KvmPicState,       # union member pic
        "tail" / HexBytes(_IRQCHIP_UNION - KvmPicState.sizeof()),  # rest of the 512-byte union
    ),
)

KvmIrqchipIoapic = c.Struct(
    "chip_id" / u32,               # KVM_IRQCHIP_IOAPIC (2)
    "pad" / u32,                   # padding, kept as is
    "chip" / c.Struct(
        "ioapic" / KvmIoapicState,  # union member ioapic
        "tail" / HexBytes(_IRQCHIP_UNION - KvmIoapicState.sizeof()),  # rest of the 512-byte union
    ),
)

# ---------------------------------------------------------------------------
# Variable-length sections: count checks, numpy accessors, decode/encode
# ---------------------------------------------------------------------------

CPUID_ENTRY_DTYPE = dtype_of(KvmCpuidEntry2)
MSR_ENTRY_DTYPE = dtype_of(KvmMsrEntry)


_SIZES: dict[int, int] = {}   # sizeof() of the header/entry declarations, computed once


def _check_counted(buf, section: str, count_field: str, header, entry, limit: int) -> int:
    """Length/count consistency of a header+entries[] blob; returns the count."""
    hsz = _SIZES.get(id(header))
    if hsz is None:
        hsz = _SIZES[id(header)] = header.sizeof()
        _SIZES[id(entry)] = entry.sizeof()
    if len(buf) < hsz:
        raise FormatError(f"{len(buf)} bytes, shorter than its {hsz}-byte header",
                          section=section, field=count_field, offset=0, code="bad-length")
    n = int.from_bytes(bytes(buf[0:4]), "little")
    if n > limit:
        raise LimitError(f"{count_field} {n} > limit {limit}", section=section,
                         field=count_field, offset=0, code="limit")
    want = hsz + n * _SIZES[id(entry)]
    if want != len(buf):
        raise FormatError(f"{count_field} {n} needs {want} bytes, section has {len(buf)}",
                          section=section, field=count_field, offset=0, code="bad-length")
    return n


def check_cpuid2(buf) -> None:
    """Cheap structural check of an x86.cpuid2 blob (nent vs length)."""
    _check_counted(buf, "x86.cpuid2", "nent", KvmCpuid2Header, KvmCpuidEntry2,
                   MAX_CPUID_ENTRIES)


def check_msrs(buf) -> None:
    """Cheap structural check of an x86.msrs blob (nmsrs vs length)."""
    _check_counted(buf, "x86.msrs", "nmsrs", KvmMsrsHeader, KvmMsrEntry, MAX_MSR_ENTRIES)


def check_xsave(buf) -> None:
    """Cheap structural check of an x86.xsave blob (length only)."""
    n = len(buf)
    if n < XSAVE_LEGACY_SIZE or n % 4 or n > MAX_XSAVE_SIZE:
        raise FormatError(f"length {n}: must be a multiple of 4 in "
                          f"[{XSAVE_LEGACY_SIZE}, {MAX_XSAVE_SIZE}]",
                          section="x86.xsave", field="length", code="bad-length")


_CPUID2_HDR_SIZE = KvmCpuid2Header.sizeof()
_MSRS_HDR_SIZE = KvmMsrsHeader.sizeof()


def cpuid_entries(buf) -> np.ndarray:
    """The entries of an x86.cpuid2 blob as a numpy structured array (no copy)."""
    n = _check_counted(buf, "x86.cpuid2", "nent", KvmCpuid2Header, KvmCpuidEntry2,
                       MAX_CPUID_ENTRIES)
    return np.frombuffer(buf, dtype=CPUID_ENTRY_DTYPE, count=n, offset=_CPUID2_HDR_SIZE)


def msr_entries(buf) -> np.ndarray:
    """The entries of an x86.msrs blob as a numpy structured array (no copy)."""
    n = _check_counted(buf, "x86.msrs", "nmsrs", KvmMsrsHeader, KvmMsrEntry, MAX_MSR_ENTRIES)
    return np.frombuffer(buf, dtype=MSR_ENTRY_DTYPE, count=n, offset=_MSRS_HDR_SIZE)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _decode_with(decl, check: Callable, section: str) -> Callable[[Any], dict]:
    def decode(buf) -> dict:
        buf = bytes(buf)
        check(buf)
        try:
            return _clean(decl.parse(buf))
        except c.ConstructError as e:
            raise FormatError(f"cannot decode: {_one_line(e)}", section=section) from None
    return decode


def _encode_counted(decl, section: str, count_field: str, limit: int):
    def encode(fields: dict) -> bytes:
        try:
            entries = fields["entries"]
            if count_field in fields and fields[count_field] != len(entries):
                raise EncodeError(f"{count_field} {fields[count_field]} != "
                                  f"{len(entries)} entries", section=section, field=count_field)
            if len(entries) > limit:
                raise EncodeError(f"{len(entries)} entries > limit {limit}", section=section,
                                  field="entries")
            obj = dict(fields)
            obj[count_field] = len(entries)
            return decl.build(obj)
        except (c.ConstructError, KeyError, TypeError, ValueError) as e:
            if isinstance(e, EncodeError):
                raise
            raise EncodeError(f"cannot encode: {_one_line(e)}", section=section) from None
    return encode


def _encode_xsave(fields: dict) -> bytes:
    try:
        out = KvmXsave.build({"region": fields["region"], "extra": fields.get("extra", "")})
    except (c.ConstructError, KeyError, TypeError, ValueError) as e:
        raise EncodeError(f"cannot encode: {_one_line(e)}", section="x86.xsave") from None
    try:
        check_xsave(out)
    except FormatError as e:
        raise EncodeError(e.message, section="x86.xsave", field="extra") from None
    return out


# ---------------------------------------------------------------------------
# Bit names and annotation
# ---------------------------------------------------------------------------

CR0_BITS = {0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM",
            29: "NW", 30: "CD", 31: "PG"}
CR4_BITS = {0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE",
            8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE",
            14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 19: "KL", 20: "SMEP",
            21: "SMAP", 22: "PKE", 23: "CET", 24: "PKS", 25: "UINTR", 28: "LAM_SUP"}
EFER_BITS = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 13: "LMSLE", 14: "FFXSR",
             15: "TCE", 21: "AUTOIBRS"}
RFLAGS_BITS = {0: "CF", 1: "FIXED1", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF",
               10: "DF", 11: "OF", 14: "NT", 16: "RF", 17: "VM", 18: "AC", 19: "VIF",
               20: "VIP", 21: "ID"}
XFEATURE_BITS = {0: "x87", 1: "SSE", 2: "AVX", 3: "BNDREGS", 4: "BNDCSR", 5: "OPMASK",
                 6: "ZMM_Hi256", 7: "Hi16_ZMM", 8: "PT", 9: "PKRU", 10: "PASID", 11: "CET_U",
                 12: "CET_S", 13: "HDC", 14: "UINTR", 15: "LBR", 16: "HWP", 17: "XTILECFG",
                 18: "XTILEDATA", 19: "APX"}
APIC_BASE_BITS = {8: "BSP", 10: "EXTD", 11: "EN"}
CLOCK_FLAGS = {1: "TSC_STABLE", 2: "REALTIME", 3: "HOST_TSC"}
VCPU_EVENT_FLAGS = {0: "NMI_PENDING", 1: "SIPI_VECTOR", 2: "SHADOW", 3: "SMM", 4: "PAYLOAD",
                    5: "TRIPLE_FAULT"}
PIT_FLAGS = {0: "HPET_LEGACY", 1: "SPEAKER_DATA_ON"}
CPUID_FLAGS = {0: "SIGNIFCANT_INDEX", 1: "STATEFUL_FUNC", 2: "STATE_READ_NEXT"}

CR0_PE, CR0_PG = 1 << 0, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
APIC_BASE_EXTD, APIC_BASE_EN = 1 << 10, 1 << 11
APIC_BASE_ADDR_MASK = 0x000F_FFFF_FFFF_F000
MSR_IA32_APICBASE = 0x1B


def bit_names(value: int, table: dict[int, str]) -> list[str]:
    """Names of the set bits of ``value``; unnamed set bits as 'bitN'."""
    out = []
    for b in range(max(64, value.bit_length())):
        if value >> b & 1:
            out.append(table.get(b, f"bit{b}"))
    return out


def bitmap_vectors(words: list[int], width: int) -> list[int]:
    """Set bit numbers of a little-endian bitmap made of ``width``-bit words."""
    return [i * width + b for i, w in enumerate(words) for b in range(width) if w >> b & 1]


_SEG_TYPES_CODE = {0: "execute-only", 1: "execute-only, accessed", 2: "execute/read",
                   3: "execute/read, accessed", 4: "execute-only, conforming",
                   5: "execute-only, conforming, accessed", 6: "execute/read, conforming",
                   7: "execute/read, conforming, accessed"}
_SEG_TYPES_DATA = {0: "read-only", 1: "read-only, accessed", 2: "read/write",
                   3: "read/write, accessed", 4: "read-only, expand-down",
                   5: "read-only, expand-down, accessed", 6: "read/write, expand-down",
                   7: "read/write, expand-down, accessed"}
_SEG_TYPES_SYS = {1: "16-bit TSS (available)", 2: "LDT", 3: "16-bit TSS (busy)",
                  4: "16-bit call gate", 5: "task gate", 6: "16-bit interrupt gate",
                  7: "16-bit trap gate", 9: "64-bit TSS (available)", 11: "64-bit TSS (busy)",
                  12: "64-bit call gate", 14: "64-bit interrupt gate", 15: "64-bit trap gate"}


def segment_info(seg: dict) -> dict:
    """Decoded attributes of a kvm_segment."""
    t = seg["type"]
    if seg["s"]:
        kind = "code" if t & 8 else "data"
        desc = (_SEG_TYPES_CODE if t & 8 else _SEG_TYPES_DATA)[t & 7]
    else:
        kind = "system"
        desc = _SEG_TYPES_SYS.get(t, "reserved")
    # VMX-style access rights word: type | S<<4 | DPL<<5 | P<<7 | AVL<<12 | L<<13 | DB<<14 | G<<15 | unusable<<16
    ar = (t & 15) | (seg["s"] & 1) << 4 | (seg["dpl"] & 3) << 5 | (seg["present"] & 1) << 7 \
        | (seg["avl"] & 1) << 12 | (seg["l"] & 1) << 13 | (seg["db"] & 1) << 14 \
        | (seg["g"] & 1) << 15 | (seg["unusable"] & 1) << 16
    return {"kind": kind, "type": desc, "present": bool(seg["present"]), "dpl": seg["dpl"],
            "s": bool(seg["s"]), "l": bool(seg["l"]), "db": bool(seg["db"]),
            "g": bool(seg["g"]), "avl": bool(seg["avl"]), "unusable": bool(seg["unusable"]),
            "access_rights": f"0x{ar:05x}",
            "range": f"[0x{seg['base']:x}, 0x{seg['base'] + seg['limit']:x}]"}


def _annotate_regs(f: dict) -> dict:
    fl = f["rflags"]
    return {"rflags": bit_names(fl & ~(3 << 12), RFLAGS_BITS), "iopl": fl >> 12 & 3}


def paging_mode(cr0: int, cr4: int, efer: int) -> str:
    if not cr0 & CR0_PE:
        return "real"
    if not cr0 & CR0_PG:
        return "protected, no paging"
    if efer & EFER_LMA:
        return "long, 5-level paging" if cr4 & (1 << 12) else "long, 4-level paging"
    return "protected, PAE paging" if cr4 & CR4_PAE else "protected, 32-bit paging"


def _annotate_sregs(f: dict) -> dict:
    out = {seg: segment_info(f[seg]) for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")}
    out["cr0"] = bit_names(f["cr0"], CR0_BITS)
    out["cr4"] = bit_names(f["cr4"], CR4_BITS)
    out["efer"] = bit_names(f["efer"], EFER_BITS)
    out["apic_base"] = {"address": f"0x{f['apic_base'] & APIC_BASE_ADDR_MASK:x}",
                        "flags": bit_names(f["apic_base"] & 0xFFF, APIC_BASE_BITS)}
    out["mode"] = paging_mode(f["cr0"], f["cr4"], f["efer"])
    out["pending_interrupts"] = bitmap_vectors(f["interrupt_bitmap"], 64)
    return out


def _annotate_mp_state(f: dict) -> dict:
    return {"mp_state": MP_STATES.get(f["mp_state"], f"unknown({f['mp_state']})")}


def _annotate_xcrs(f: dict) -> dict:
    out = {}
    for x in f["xcrs"][:min(f["nr_xcrs"], KVM_MAX_XCRS)]:
        name = f"xcr{x['xcr']}"
        out[name] = bit_names(x["value"], XFEATURE_BITS) if x["xcr"] == 0 else f"0x{x['value']:x}"
    return out


def _annotate_debugregs(f: dict) -> dict:
    dr7 = f["dr7"]
    bps = []
    for i in range(4):
        if dr7 >> (2 * i) & 3:
            rw = dr7 >> (16 + 4 * i) & 3
            ln = dr7 >> (18 + 4 * i) & 3
            bps.append({"dr": i, "address": f"0x{f['db'][i]:x}",
                        "local": bool(dr7 >> (2 * i) & 1), "global": bool(dr7 >> (2 * i + 1) & 1),
                        "rw": ("execute", "write", "io", "read/write")[rw],
                        "len": (1, 2, 8, 4)[ln]})
    return {"breakpoints": bps}


# --- XSAVE -------------------------------------------------------------------

XSAVE_HDR_OFFSET = 512
XSAVE_YMM_OFFSET = 576


def xsave_header(region: bytes) -> dict:
    """XSTATE_BV, XCOMP_BV and the 48 reserved header bytes of an XSAVE image."""
    h = region[XSAVE_HDR_OFFSET:XSAVE_HDR_OFFSET + 64]
    return {"xstate_bv": int.from_bytes(h[0:8], "little"),
            "xcomp_bv": int.from_bytes(h[8:16], "little"),
            "reserved": h[16:64]}


def _u128(b: bytes) -> str:
    return f"0x{int.from_bytes(b, 'little'):032x}"


def _annotate_xsave(f: dict) -> dict:
    r = bytes.fromhex(f["region"])
    le = int.from_bytes
    hdr = xsave_header(r)
    out = {
        "fcw": f"0x{le(r[0:2], 'little'):04x}",
        "fsw": f"0x{le(r[2:4], 'little'):04x}",
        "ftw": f"0x{r[4]:02x}",
        "fop": f"0x{le(r[6:8], 'little'):04x}",
        "fip": f"0x{le(r[8:16], 'little'):x}",
        "fdp": f"0x{le(r[16:24], 'little'):x}",
        "mxcsr": f"0x{le(r[24:28], 'little'):08x}",
        "mxcsr_mask": f"0x{le(r[28:32], 'little'):08x}",
        "st": [f"0x{le(r[32 + 16 * i:42 + 16 * i], 'little'):020x}" for i in range(8)],
        "xmm": [_u128(r[160 + 16 * i:176 + 16 * i]) for i in range(16)],
        "xstate_bv": f"0x{hdr['xstate_bv']:x}",
        "xstate_components": bit_names(hdr["xstate_bv"], XFEATURE_BITS),
        "xcomp_bv": f"0x{hdr['xcomp_bv']:x}",
        "size": len(r) + len(bytes.fromhex(f.get("extra", ""))),
    }
    if hdr["xcomp_bv"] >> 63 == 0:   # standard format: YMM_Hi128 at offset 576
        out["ymm_hi128"] = [_u128(r[XSAVE_YMM_OFFSET + 16 * i:XSAVE_YMM_OFFSET + 16 * (i + 1)])
                            for i in range(16)]
    return out


# --- LAPIC -------------------------------------------------------------------

APIC_ID, APIC_LVR, APIC_TASKPRI, APIC_ARBPRI, APIC_PROCPRI = 0x20, 0x30, 0x80, 0x90, 0xA0
APIC_EOI, APIC_LDR, APIC_DFR, APIC_SPIV = 0xB0, 0xD0, 0xE0, 0xF0
APIC_ISR, APIC_TMR, APIC_IRR, APIC_ESR = 0x100, 0x180, 0x200, 0x280
APIC_ICR, APIC_ICR2 = 0x300, 0x310
APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR = (
    0x320, 0x330, 0x340, 0x350, 0x360, 0x370)
APIC_TMICT, APIC_TMCCT, APIC_TDCR = 0x380, 0x390, 0x3E0

_DELIVERY = {0: "fixed", 1: "lowest-priority", 2: "SMI", 3: "reserved", 4: "NMI", 5: "INIT",
             6: "SIPI", 7: "ExtINT"}
_TIMER_MODES = {0: "one-shot", 1: "periodic", 2: "tsc-deadline", 3: "reserved"}
_SHORTHAND = {0: "none", 1: "self", 2: "all-including-self", 3: "all-excluding-self"}
_ESR_BITS = {0: "send-checksum", 1: "receive-checksum", 2: "send-accept", 3: "receive-accept",
             4: "redirectable-ipi", 5: "send-illegal-vector", 6: "receive-illegal-vector",
             7: "illegal-register-address"}


def lapic_reg(regs: bytes, off: int) -> int:
    """32-bit LAPIC register at byte offset ``off`` of kvm_lapic_state.regs."""
    return int.from_bytes(regs[off:off + 4], "little")


def lapic_vectors(regs: bytes, base: int) -> list[int]:
    """Set vectors of a 256-bit LAPIC bitmap (ISR/TMR/IRR): 8 regs at 16-byte stride."""
    return bitmap_vectors([lapic_reg(regs, base + 0x10 * i) for i in range(8)], 32)


def lvt_info(v: int, timer: bool = False) -> dict:
    d = {"raw": f"0x{v:08x}", "vector": v & 0xFF, "delivery_mode": _DELIVERY[v >> 8 & 7],
         "delivery_status": "pending" if v >> 12 & 1 else "idle",
         "polarity": "active-low" if v >> 13 & 1 else "active-high",
         "remote_irr": bool(v >> 14 & 1), "trigger": "level" if v >> 15 & 1 else "edge",
         "masked": bool(v >> 16 & 1)}
    if timer:
        d["timer_mode"] = _TIMER_MODES[v >> 17 & 3]
        for k in ("delivery_mode", "polarity", "remote_irr", "trigger"):
            del d[k]
    return d


def _annotate_lapic(f: dict) -> dict:
    r = bytes.fromhex(f["regs"])
    reg = lambda off: lapic_reg(r, off)  # noqa: E731
    svr, icr, icr2, dcr = reg(APIC_SPIV), reg(APIC_ICR), reg(APIC_ICR2), reg(APIC_TDCR)
    div_code = (dcr & 3) | (dcr >> 1 & 4)
    return {
        "id": reg(APIC_ID) >> 24, "id_raw": f"0x{reg(APIC_ID):08x}",
        "version": {"raw": f"0x{reg(APIC_LVR):08x}", "version": reg(APIC_LVR) & 0xFF,
                    "max_lvt": reg(APIC_LVR) >> 16 & 0xFF,
                    "eoi_broadcast_suppression": bool(reg(APIC_LVR) >> 24 & 1)},
        "tpr": reg(APIC_TASKPRI) & 0xFF, "apr": reg(APIC_ARBPRI) & 0xFF,
        "ppr": reg(APIC_PROCPRI) & 0xFF, "eoi": reg(APIC_EOI),
        "ldr": f"0x{reg(APIC_LDR):08x}", "dfr": f"0x{reg(APIC_DFR):08x}",
        "svr": {"raw": f"0x{svr:08x}", "spurious_vector": svr & 0xFF,
                "apic_enabled": bool(svr >> 8 & 1), "focus_check_disabled": bool(svr >> 9 & 1),
                "eoi_broadcast_suppression": bool(svr >> 12 & 1)},
        "isr": lapic_vectors(r, APIC_ISR), "tmr": lapic_vectors(r, APIC_TMR),
        "irr": lapic_vectors(r, APIC_IRR),
        "esr": bit_names(reg(APIC_ESR) & 0xFF, _ESR_BITS),
        "icr": {"raw": f"0x{icr2:08x}{icr:08x}", "vector": icr & 0xFF,
                "delivery_mode": _DELIVERY[icr >> 8 & 7],
                "dest_mode": "logical" if icr >> 11 & 1 else "physical",
                "delivery_status": "pending" if icr >> 12 & 1 else "idle",
                "level": "assert" if icr >> 14 & 1 else "de-assert",
                "trigger": "level" if icr >> 15 & 1 else "edge",
                "shorthand": _SHORTHAND[icr >> 18 & 3], "destination": icr2 >> 24},
        "lvt_timer": lvt_info(reg(APIC_LVTT), timer=True),
        "lvt_thermal": lvt_info(reg(APIC_LVTTHMR)),
        "lvt_perf": lvt_info(reg(APIC_LVTPC)),
        "lvt_lint0": lvt_info(reg(APIC_LVT0)),
        "lvt_lint1": lvt_info(reg(APIC_LVT1)),
        "lvt_error": lvt_info(reg(APIC_LVTERR)),
        "timer_initial_count": reg(APIC_TMICT), "timer_current_count": reg(APIC_TMCCT),
        "timer_divide": {"raw": f"0x{dcr:x}", "divisor": 1 if div_code == 7 else 2 << div_code},
    }


# --- MSRs --------------------------------------------------------------------

MSR_NAMES: dict[int, str] = {
    0x00000010: "IA32_TSC",
    0x00000011: "KVM_WALL_CLOCK",
    0x00000012: "KVM_SYSTEM_TIME",
    0x0000001B: "IA32_APIC_BASE",
    0x00000034: "SMI_COUNT",
    0x0000003A: "IA32_FEATURE_CONTROL",
    0x0000003B: "IA32_TSC_ADJUST",
    0x00000048: "IA32_SPEC_CTRL",
    0x00000049: "IA32_PRED_CMD",
    0x0000008B: "IA32_UCODE_REV",
    0x0000009E: "IA32_SMBASE",
    0x000000CE: "PLATFORM_INFO",
    0x000000E1: "IA32_UMWAIT_CONTROL",
    0x000000E7: "IA32_MPERF",
    0x000000E8: "IA32_APERF",
    0x0000010A: "IA32_ARCH_CAPABILITIES",
    0x0000010B: "IA32_FLUSH_CMD",
    0x00000122: "IA32_TSX_CTRL",
    0x00000140: "MISC_FEATURES_ENABLES",
    0x00000174: "IA32_SYSENTER_CS",
    0x00000175: "IA32_SYSENTER_ESP",
    0x00000176: "IA32_SYSENTER_EIP",
    0x00000179: "IA32_MCG_CAP",
    0x0000017A: "IA32_MCG_STATUS",
    0x0000017B: "IA32_MCG_CTL",
    0x000001A0: "IA32_MISC_ENABLE",
    0x000001C4: "IA32_XFD",
    0x000001C5: "IA32_XFD_ERR",
    0x000001D9: "IA32_DEBUGCTL",
    0x000001DB: "LASTBRANCH_FROM_IP",
    0x000001DC: "LASTBRANCH_TO_IP",
    0x000001DD: "LASTINT_FROM_IP",
    0x000001DE: "LASTINT_TO_IP",
    0x000001FC: "IA32_POWER_CTL",
    0x00000277: "IA32_PAT",
    0x000002FF: "IA32_MTRR_DEF_TYPE",
    0x00000345: "IA32_PERF_CAPABILITIES",
    0x0000038D: "IA32_FIXED_CTR_CTRL",
    0x0000038E: "IA32_PERF_GLOBAL_STATUS",
    0x0000038F: "IA32_PERF_GLOBAL_CTRL",
    0x00000390: "IA32_PERF_GLOBAL_OVF_CTRL",
    0x000006E0: "IA32_TSC_DEADLINE",
    0x000006E1: "IA32_PKRS",
    0x00000D90: "IA32_BNDCFGS",
    0x00000DA0: "IA32_XSS",
    0x40000000: "HV_X64_GUEST_OS_ID",
    0x40000001: "HV_X64_HYPERCALL",
    0x40000002: "HV_X64_VP_INDEX",
    0x40000020: "HV_X64_TIME_REF_COUNT",
    0x40000021: "HV_X64_REFERENCE_TSC",
    0x4B564D00: "KVM_WALL_CLOCK_NEW",
    0x4B564D01: "KVM_SYSTEM_TIME_NEW",
    0x4B564D02: "KVM_ASYNC_PF_EN",
    0x4B564D03: "KVM_STEAL_TIME",
    0x4B564D04: "KVM_PV_EOI_EN",
    0x4B564D05: "KVM_POLL_CONTROL",
    0x4B564D06: "KVM_ASYNC_PF_INT",
    0x4B564D07: "KVM_ASYNC_PF_ACK",
    0x4B564D08: "KVM_MIGRATION_CONTROL",
    0xC0000080: "IA32_EFER",
    0xC0000081: "STAR",
    0xC0000082: "LSTAR",
    0xC0000083: "CSTAR",
    0xC0000084: "SFMASK",
    0xC0000100: "FS_BASE",
    0xC0000101: "GS_BASE",
    0xC0000102: "KERNEL_GS_BASE",
    0xC0000103: "TSC_AUX",
    0xC0000104: "AMD64_TSC_RATIO",
    0xC0010015: "K7_HWCR",
    0xC0010117: "VM_HSAVE_PA",
    0xC001011F: "AMD64_VIRT_SPEC_CTRL",
    0xC0011029: "AMD64_DE_CFG",
}
for _i in range(8):
    MSR_NAMES[0xC1 + _i] = f"IA32_PMC{_i}"
    MSR_NAMES[0x186 + _i] = f"IA32_PERFEVTSEL{_i}"
    MSR_NAMES[0x200 + 2 * _i] = f"IA32_MTRR_PHYSBASE{_i}"
    MSR_NAMES[0x201 + 2 * _i] = f"IA32_MTRR_PHYSMASK{_i}"
for _i in range(3):
    MSR_NAMES[0x309 + _i] = f"IA32_FIXED_CTR{_i}"
MSR_NAMES.update({0x250: "IA32_MTRR_FIX64K_00000", 0x258: "IA32_MTRR_FIX16K_80000",
                  0x259: "IA32_MTRR_FIX16K_A0000"})
for _i in range(8):
    MSR_NAMES[0x268 + _i] = f"IA32_MTRR_FIX4K_{0xC0000 + _i * 0x8000:05X}"
for _i in range(32):
    for _j, _r in enumerate(("CTL", "STATUS", "ADDR", "MISC")):
        MSR_NAMES.setdefault(0x400 + 4 * _i + _j, f"IA32_MC{_i}_{_r}")
del _i, _j, _r


def msr_name(index: int) -> str:
    return MSR_NAMES.get(index, f"MSR_0x{index:x}")


def _annotate_msrs(f: dict) -> dict:
    out = {}
    for e in f["entries"]:
        name = msr_name(e["index"])
        if e["index"] == 0xC0000080:
            out[name] = {"value": f"0x{e['data']:x}", "bits": bit_names(e["data"], EFER_BITS)}
        elif e["index"] == MSR_IA32_APICBASE:
            out[name] = {"value": f"0x{e['data']:x}",
                         "bits": bit_names(e["data"] & 0xFFF, APIC_BASE_BITS)}
        else:
            out[name] = f"0x{e['data']:x}"
    return {"msrs": out}


# --- CPUID -------------------------------------------------------------------

CPUID_LEAF_NAMES = {
    0x0: "vendor/max basic leaf", 0x1: "family/model/features", 0x2: "cache descriptors",
    0x4: "deterministic cache", 0x5: "MONITOR/MWAIT", 0x6: "thermal/power",
    0x7: "structured extended features", 0xA: "architectural PMU", 0xB: "x2APIC topology",
    0xD: "XSAVE state", 0x12: "SGX", 0x14: "processor trace", 0x15: "TSC/crystal ratio",
    0x16: "processor frequency", 0x19: "Key Locker", 0x1D: "AMX palette", 0x1E: "AMX TMUL",
    0x1F: "V2 extended topology", 0x24: "AVX10",
    0x40000000: "hypervisor vendor/max leaf", 0x40000001: "KVM features",
    0x40000010: "timing information",
    0x80000000: "max extended leaf", 0x80000001: "extended features",
    0x80000002: "brand string 1", 0x80000003: "brand string 2", 0x80000004: "brand string 3",
    0x80000005: "L1 cache (AMD)", 0x80000006: "L2/L3 cache", 0x80000007: "power management",
    0x80000008: "address sizes", 0x8000000A: "SVM", 0x8000001F: "memory encryption",
    0x80000021: "extended features 2", 0xC0000000: "Centaur max leaf",
}


def _cpuid_regs_str(e: dict) -> str:
    return b"".join(e[r].to_bytes(4, "little") for r in ("ebx", "edx", "ecx")).decode(
        "latin-1").rstrip("\0")


def _annotate_cpuid2(f: dict) -> dict:
    out = {"leaves": [
        {"leaf": f"0x{e['function']:x}.{e['index']}",
         "name": CPUID_LEAF_NAMES.get(e["function"], ""),
         "flags": bit_names(e["flags"], CPUID_FLAGS)} for e in f["entries"]]}
    for e in f["entries"]:
        if e["function"] == 0 and e["index"] == 0:
            out["vendor"] = _cpuid_regs_str(e)
        if e["function"] == 0x40000000:
            out["hypervisor"] = _cpuid_regs_str({"ebx": e["ebx"], "edx": e["ecx"],
                                                 "ecx": e["edx"]})
    return out


# --- VM-scope devices --------------------------------------------------------

_PIT_MODES = {0: "interrupt on terminal count", 1: "hardware one-shot", 2: "rate generator",
              3: "square wave", 4: "software strobe", 5: "hardware strobe"}
_PIT_RW = {0: "latch", 1: "lsb", 2: "msb", 3: "lsb then msb"}


def _annotate_pit2(f: dict) -> dict:
    chans = []
    for ch in f["channels"]:
        m = ch["mode"]
        chans.append({"mode": _PIT_MODES.get(m if m < 6 else m & 3, "reserved"),
                      "rw_mode": _PIT_RW.get(ch["rw_mode"], "reserved"),
                      "count": ch["count"], "gate": bool(ch["gate"]), "bcd": bool(ch["bcd"])})
    return {"channels": chans, "flags": bit_names(f["flags"], PIT_FLAGS)}


def _annotate_clock(f: dict) -> dict:
    return {"flags": bit_names(f["flags"], CLOCK_FLAGS), "clock_s": f["clock"] / 1e9}


def _annotate_pic(f: dict) -> dict:
    p = f["chip"]["pic"]
    bits = lambda v: [i for i in range(8) if v >> i & 1]  # noqa: E731
    return {"chip": {0: "master", 1: "slave"}.get(f["chip_id"], f"unknown({f['chip_id']})"),
            "irq_base": p["irq_base"], "irr": bits(p["irr"]), "imr_masked": bits(p["imr"]),
            "isr": bits(p["isr"]), "level_triggered": bits(p["elcr"]),
            "read_reg": "ISR" if p["read_reg_select"] else "IRR",
            "auto_eoi": bool(p["auto_eoi"]), "init4": bool(p["init4"])}


def ioapic_entry(bits: int) -> dict:
    """Fields of one IOAPIC redirection entry (union kvm_ioapic_state.redirtbl[i])."""
    return {"vector": bits & 0xFF, "delivery_mode": bits >> 8 & 7, "dest_mode": bits >> 11 & 1,
            "delivery_status": bits >> 12 & 1, "polarity": bits >> 13 & 1,
            "remote_irr": bits >> 14 & 1, "trig_mode": bits >> 15 & 1, "mask": bits >> 16 & 1,
            "reserve": bits >> 17 & 0x7F, "reserved": f"{bits >> 24 & 0xFFFFFFFF:08x}",
            "dest_id": bits >> 56 & 0xFF,
            "delivery": _DELIVERY[bits >> 8 & 7]}


def _annotate_ioapic(f: dict) -> dict:
    io = f["chip"]["ioapic"]
    return {"base_address": f"0x{io['base_address']:x}", "id": io["id"] >> 24,
            "irr_pins": [i for i in range(KVM_IOAPIC_NUM_PINS) if io["irr"] >> i & 1],
            "redirtbl": [ioapic_entry(b) for b in io["redirtbl"]]}


def _annotate_vcpu_events(f: dict) -> dict:
    return {"flags": bit_names(f["flags"], VCPU_EVENT_FLAGS),
            "interrupt_shadow": bit_names(f["interrupt"]["shadow"], {0: "MOV_SS", 1: "STI"})}


def _annotate_tsc_khz(f: dict) -> dict:
    return {"tsc_mhz": f["tsc_khz"] / 1000}


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

def _kind(type_id, name, scope, decl, doc, kernel_struct, ioctl, **kw) -> SectionKind:
    return register(SectionKind(type_id, name, scope, decl, doc, arch=ARCH,
                                kernel_struct=kernel_struct, ioctl=ioctl, **kw))


CPUID2 = _kind(
    typeids.X86_CPUID2, "x86.cpuid2", SCOPE_VCPU, KvmCpuid2,
    "Guest CPUID table as given to KVM_SET_CPUID2 (header + nent entries).",
    "struct kvm_cpuid2", "KVM_GET_CPUID2",
    decode_fn=_decode_with(KvmCpuid2, check_cpuid2, "x86.cpuid2"),
    encode_fn=_encode_counted(KvmCpuid2, "x86.cpuid2", "nent", MAX_CPUID_ENTRIES),
    annotate_fn=_annotate_cpuid2, check_fn=check_cpuid2,
    extra={"header": KvmCpuid2Header, "entry": KvmCpuidEntry2,
           "entry_struct": "struct kvm_cpuid_entry2", "count_field": "nent",
           "entries_field": "entries", "max_count": MAX_CPUID_ENTRIES,
           "length_rule": (("min", 8), ("limit", 0, 4, MAX_CPUID_ENTRIES),
                           ("exact", 8, ((0, 4, 40),)))})

MP_STATE = _kind(
    typeids.X86_MP_STATE, "x86.mp_state", SCOPE_VCPU, KvmMpState,
    "vCPU multiprocessing state (KVM_MP_STATE_*).",
    "struct kvm_mp_state", "KVM_GET_MP_STATE", annotate_fn=_annotate_mp_state)

REGS = _kind(
    typeids.X86_REGS, "x86.regs", SCOPE_VCPU, KvmRegs,
    "General purpose registers, RIP and RFLAGS.",
    "struct kvm_regs", "KVM_GET_REGS", annotate_fn=_annotate_regs)

SREGS = _kind(
    typeids.X86_SREGS, "x86.sregs", SCOPE_VCPU, KvmSregs,
    "Segment, descriptor-table and control registers, EFER, APIC base, pending interrupt.",
    "struct kvm_sregs", "KVM_GET_SREGS", annotate_fn=_annotate_sregs)

XSAVE = _kind(
    typeids.X86_XSAVE, "x86.xsave", SCOPE_VCPU, KvmXsave,
    "FPU/SSE/AVX/... state in XSAVE standard format (4096 bytes, more with KVM_CAP_XSAVE2).",
    "struct kvm_xsave", "KVM_GET_XSAVE2",
    decode_fn=_decode_with(KvmXsave, check_xsave, "x86.xsave"), encode_fn=_encode_xsave,
    annotate_fn=_annotate_xsave, check_fn=check_xsave,
    extra={"header": KvmXsaveLegacy, "min_size": XSAVE_LEGACY_SIZE,
           "length_rule": (("min", XSAVE_LEGACY_SIZE), ("multiple", 4),
                           ("max", MAX_XSAVE_SIZE))})

XCRS = _kind(
    typeids.X86_XCRS, "x86.xcrs", SCOPE_VCPU, KvmXcrs,
    "Extended control registers (XCR0).",
    "struct kvm_xcrs", "KVM_GET_XCRS", annotate_fn=_annotate_xcrs)

DEBUGREGS = _kind(
    typeids.X86_DEBUGREGS, "x86.debugregs", SCOPE_VCPU, KvmDebugregs,
    "Debug registers DR0-3, DR6, DR7.",
    "struct kvm_debugregs", "KVM_GET_DEBUGREGS", annotate_fn=_annotate_debugregs)

LAPIC = _kind(
    typeids.X86_LAPIC, "x86.lapic", SCOPE_VCPU, KvmLapicState,
    "Local APIC register page (first 1 KiB).",
    "struct kvm_lapic_state", "KVM_GET_LAPIC", annotate_fn=_annotate_lapic)

MSRS = _kind(
    typeids.X86_MSRS, "x86.msrs", SCOPE_VCPU, KvmMsrs,
    "Model specific registers as (index, value) entries for KVM_SET_MSRS.",
    "struct kvm_msrs", "KVM_GET_MSRS",
    decode_fn=_decode_with(KvmMsrs, check_msrs, "x86.msrs"),
    encode_fn=_encode_counted(KvmMsrs, "x86.msrs", "nmsrs", MAX_MSR_ENTRIES),
    annotate_fn=_annotate_msrs, check_fn=check_msrs,
    extra={"header": KvmMsrsHeader, "entry": KvmMsrEntry,
           "entry_struct": "struct kvm_msr_entry", "count_field": "nmsrs",
           "entries_field": "entries", "max_count": MAX_MSR_ENTRIES,
           "length_rule": (("min", 8), ("limit", 0, 4, MAX_MSR_ENTRIES),
                           ("exact", 8, ((0, 4, 16),)))})

VCPU_EVENTS = _kind(
    typeids.X86_VCPU_EVENTS, "x86.vcpu_events", SCOPE_VCPU, KvmVcpuEvents,
    "Pending/injected exceptions, interrupts, NMI, SMI and interrupt shadow.",
    "struct kvm_vcpu_events", "KVM_GET_VCPU_EVENTS", annotate_fn=_annotate_vcpu_events)

TSC_KHZ = _kind(
    typeids.X86_TSC_KHZ, "x86.tsc_khz", SCOPE_VCPU, TscKhz,
    "Guest TSC frequency in kHz (KVM_GET_TSC_KHZ return value; snapfmt's own 8-byte record).",
    None, "KVM_GET_TSC_KHZ", annotate_fn=_annotate_tsc_khz)

PIT2 = _kind(
    typeids.X86_PIT2, "x86.pit2", SCOPE_VM, KvmPitState2,
    "In-kernel i8254 PIT state (3 channels).",
    "struct kvm_pit_state2", "KVM_GET_PIT2", annotate_fn=_annotate_pit2)

CLOCK = _kind(
    typeids.X86_CLOCK, "x86.clock", SCOPE_VM, KvmClockData,
    "kvmclock value at snapshot time (KVM_GET_CLOCK).",
    "struct kvm_clock_data", "KVM_GET_CLOCK", annotate_fn=_annotate_clock)

PIC = _kind(
    typeids.X86_PIC, "x86.pic", SCOPE_VM, KvmIrqchipPic,
    "In-kernel i8259 PIC; instance = chip_id (0 master, 1 slave).",
    "struct kvm_irqchip", "KVM_GET_IRQCHIP", annotate_fn=_annotate_pic,
    extra={"c_unmapped": ("chip.tail",)})

IOAPIC = _kind(
    typeids.X86_IOAPIC, "x86.ioapic", SCOPE_VM, KvmIrqchipIoapic,
    "In-kernel IOAPIC (kvm_irqchip chip_id 2) with 24 redirection entries.",
    "struct kvm_irqchip", "KVM_GET_IRQCHIP", annotate_fn=_annotate_ioapic,
    extra={"c_unmapped": ("chip.tail",)})

X86_KINDS = (CPUID2, MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS, VCPU_EVENTS,
             TSC_KHZ, PIT2, CLOCK, PIC, IOAPIC)
VCPU_KINDS = tuple(k for k in X86_KINDS if k.scope == SCOPE_VCPU)
VM_KINDS = tuple(k for k in X86_KINDS if k.scope == SCOPE_VM)
