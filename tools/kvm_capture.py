#!/usr/bin/env python3
"""Capture real x86_64 KVM state from /dev/kvm into snapfmt sections.

Creates a VM with the in-kernel irqchip and PIT, creates vCPUs, loads a known
long-mode state (CPUID from KVM_GET_SUPPORTED_CPUID, distinctive REGS,
64-bit SREGS, syscall MSRs, XCR0, an XMM0 value, LINT0/LINT1 LVTs), then reads
everything back with the GET ioctls.  No vCPU runs (no guest memory, no
KVM_RUN): the point is a golden capture of the bytes the kernel produces.

    python tools/kvm_capture.py out.snap [--vcpus N]
    python tools/kvm_capture.py --json golden.json [--vcpus N]

ioctl request numbers are computed with the kernel's _IO/_IOR/_IOW/_IOWR
encoding from the struct sizes of snapfmt's declarations;
tests/test_kvm_capture.py checks them against <linux/kvm.h>.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import sys
import time

import construct as c

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from snapfmt import kvm_x86 as kx  # noqa: E402
from snapfmt.errors import SnapfmtOSError  # noqa: E402

# --------------------------------------------------------------------- ioctls
# <asm-generic/ioctl.h>: dir:2 | size:14 | type:8 | nr:8
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_SIZEMASK = (1 << 14) - 1
KVMIO = 0xAE


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    if size > _IOC_SIZEMASK:
        raise ValueError(f"ioctl size {size} does not fit in 14 bits")
    return (direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (typ << _IOC_TYPESHIFT) \
        | (nr << _IOC_NRSHIFT)


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, KVMIO, nr, 0)


def _IOR(nr: int, size: int) -> int:
    return _IOC(_IOC_READ, KVMIO, nr, size)


def _IOW(nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, KVMIO, nr, size)


def _IOWR(nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, KVMIO, nr, size)


KvmMsrList = c.Struct("nmsrs" / c.Int32ul)                 # struct kvm_msr_list (header)
KvmPitConfig = c.Struct("flags" / c.Int32ul,               # struct kvm_pit_config
                        "pad" / c.Array(15, c.Int32ul))

_sz = lambda decl: decl.sizeof()  # noqa: E731

# name -> request number; the ioctl nr values are the kernel ABI (<linux/kvm.h>)
IOCTLS = {
    "KVM_GET_API_VERSION": _IO(0x00),
    "KVM_CREATE_VM": _IO(0x01),
    "KVM_GET_MSR_INDEX_LIST": _IOWR(0x02, _sz(KvmMsrList)),
    "KVM_CHECK_EXTENSION": _IO(0x03),
    "KVM_GET_SUPPORTED_CPUID": _IOWR(0x05, _sz(kx.KvmCpuid2Header)),
    "KVM_CREATE_VCPU": _IO(0x41),
    "KVM_CREATE_IRQCHIP": _IO(0x60),
    "KVM_GET_IRQCHIP": _IOWR(0x62, _sz(kx.KvmIrqchipPic)),
    "KVM_CREATE_PIT2": _IOW(0x77, _sz(KvmPitConfig)),
    "KVM_GET_CLOCK": _IOR(0x7C, _sz(kx.KvmClockData)),
    "KVM_GET_PIT2": _IOR(0x9F, _sz(kx.KvmPitState2)),
    "KVM_GET_TSC_KHZ": _IO(0xA3),
    "KVM_GET_REGS": _IOR(0x81, _sz(kx.KvmRegs)),
    "KVM_SET_REGS": _IOW(0x82, _sz(kx.KvmRegs)),
    "KVM_GET_SREGS": _IOR(0x83, _sz(kx.KvmSregs)),
    "KVM_SET_SREGS": _IOW(0x84, _sz(kx.KvmSregs)),
    "KVM_GET_MSRS": _IOWR(0x88, _sz(kx.KvmMsrsHeader)),
    "KVM_SET_MSRS": _IOW(0x89, _sz(kx.KvmMsrsHeader)),
    "KVM_GET_LAPIC": _IOR(0x8E, _sz(kx.KvmLapicState)),
    "KVM_SET_LAPIC": _IOW(0x8F, _sz(kx.KvmLapicState)),
    "KVM_SET_CPUID2": _IOW(0x90, _sz(kx.KvmCpuid2Header)),
    "KVM_GET_CPUID2": _IOWR(0x91, _sz(kx.KvmCpuid2Header)),
    "KVM_GET_MP_STATE": _IOR(0x98, _sz(kx.KvmMpState)),
    "KVM_GET_VCPU_EVENTS": _IOR(0x9F, _sz(kx.KvmVcpuEvents)),
    "KVM_GET_DEBUGREGS": _IOR(0xA1, _sz(kx.KvmDebugregs)),
    "KVM_GET_XSAVE": _IOR(0xA4, _sz(kx.KvmXsaveLegacy)),
    "KVM_SET_XSAVE": _IOW(0xA5, _sz(kx.KvmXsaveLegacy)),
    "KVM_GET_XCRS": _IOR(0xA6, _sz(kx.KvmXcrs)),
    "KVM_SET_XCRS": _IOW(0xA7, _sz(kx.KvmXcrs)),
    "KVM_GET_XSAVE2": _IOR(0xCF, _sz(kx.KvmXsaveLegacy)),
}

KVM_API_VERSION = 12
KVM_CAP_XSAVE2 = 208
MAX_IO_MSRS = 256         # KVM_GET/SET_MSRS take fewer entries than this per call

MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

# --------------------------------------------------------------------- the state we load


def regs_for(vcpu: int) -> dict:
    """Distinctive general-purpose register values for ``vcpu``."""
    names = [sc.name for sc in kx.KvmRegs.subcons]
    vals = {n: (0x0101010101010101 * (i + 1) + vcpu) & (2**64 - 1) for i, n in enumerate(names)}
    vals.update(rax=0x1122334455667788 + vcpu, rip=0xFFFFFFFF81000000 + 0x10 * vcpu,
                rsp=0xFFFFC90000004000 - 0x1000 * vcpu, rflags=0x2)
    return vals


def msrs_for(vcpu: int) -> dict[int, int]:
    return {
        MSR_STAR: 0x0023001000000000,
        MSR_LSTAR: 0xFFFFFFFF81A00000 + vcpu,
        MSR_CSTAR: 0xFFFFFFFF81A01000,
        MSR_SFMASK: 0x47700,
        MSR_KERNEL_GS_BASE: 0xFFFF888000000000 + 0x10000 * vcpu,
        MSR_IA32_SYSENTER_CS: 0x10,
        MSR_IA32_SYSENTER_ESP: 0xFFFFFE0000001000,
        MSR_IA32_SYSENTER_EIP: 0xFFFFFFFF81A02000,
    }


XMM0_VALUE = bytes(range(0xA0, 0xB0))
XCR0_WANTED = 0b111       # x87 | SSE | AVX (masked by what CPUID 0xD.0 offers)


def _segment(selector: int, typ: int, *, s=1, l=0, db=1, g=1, limit=0xFFFFFFFF) -> dict:
    return dict(base=0, limit=limit, selector=selector, type=typ, present=1, dpl=0, db=db, s=s,
                l=l, g=g, avl=0, unusable=0, padding=0)


def long_mode_sregs(current: dict) -> dict:
    s = dict(current)
    data = _segment(0x10, 3)
    s.update(cs=_segment(0x08, 11, l=1, db=0), ds=data, es=data, fs=data, gs=data, ss=data,
             tr=_segment(0x18, 11, s=0, db=0, g=0, limit=0x67),
             gdt=dict(base=0x500, limit=0x1F, padding=[0, 0, 0]),
             idt=dict(base=0x0, limit=0xFFF, padding=[0, 0, 0]),
             cr0=kx.CR0_PE | 1 << 1 | 1 << 4 | 1 << 5 | 1 << 16 | 1 << 18 | kx.CR0_PG,
             cr3=0x9000, cr4=kx.CR4_PAE | 1 << 7 | 1 << 9 | 1 << 10,
             efer=1 | kx.EFER_LME | kx.EFER_LMA | 1 << 11)
    return s


# --------------------------------------------------------------------- ioctl helpers

class KvmError(SnapfmtOSError):
    code = "kvm"


def _ioctl(fd: int, name: str, arg=0, *, what: str = "") -> int:
    try:
        if isinstance(arg, bytearray):
            return fcntl.ioctl(fd, IOCTLS[name], arg, True)
        return fcntl.ioctl(fd, IOCTLS[name], arg)
    except OSError as e:
        raise KvmError(f"{name} failed: {os.strerror(e.errno)}", section=what or None,
                       code="kvm") from None


def _get(fd: int, name: str, size: int, what: str, prefix: bytes = b"") -> bytes:
    buf = bytearray(prefix) + bytearray(size - len(prefix))
    _ioctl(fd, name, buf, what=what)
    return bytes(buf)


def _counted(header, entry, entries: list[dict], count_field: str, **hdr) -> bytearray:
    out = bytearray(header.build({count_field: len(entries), **hdr}))
    for e in entries:
        out += entry.build(e)
    return out


def supported_cpuid(kvm: int) -> bytes:
    n = kx.MAX_CPUID_ENTRIES
    while True:
        buf = bytearray(kx.KvmCpuid2Header.build({"nent": n, "padding": 0})) \
            + bytearray(n * kx.KvmCpuidEntry2.sizeof())
        try:
            fcntl.ioctl(kvm, IOCTLS["KVM_GET_SUPPORTED_CPUID"], buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG and n < 4096:
                n *= 2
                continue
            raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {os.strerror(e.errno)}",
                           code="kvm") from None
        nent = kx.KvmCpuid2Header.parse(buf).nent
        return bytes(buf[:kx.KvmCpuid2Header.sizeof() + nent * kx.KvmCpuidEntry2.sizeof()])


def msr_index_list(kvm: int) -> list[int]:
    n = 256
    while True:
        buf = bytearray(KvmMsrList.build({"nmsrs": n})) + bytearray(4 * n)
        try:
            fcntl.ioctl(kvm, IOCTLS["KVM_GET_MSR_INDEX_LIST"], buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG and n < 65536:
                n *= 4
                continue
            raise KvmError(f"KVM_GET_MSR_INDEX_LIST failed: {os.strerror(e.errno)}",
                           code="kvm") from None
        got = KvmMsrList.parse(buf).nmsrs
        return list(c.Array(got, c.Int32ul).parse(buf[4:4 + 4 * got]))


def _msr_io(vcpu: int, name: str, entries: list[dict], what: str) -> tuple[int, bytearray]:
    buf = _counted(kx.KvmMsrsHeader, kx.KvmMsrEntry, entries, "nmsrs", pad=0)
    return _ioctl(vcpu, name, buf, what=what), buf


def read_msrs(vcpu: int, indices: list[int], what: str) -> bytes:
    """KVM_GET_MSRS for every index KVM can read for this vCPU, in index-list order."""
    readable = []
    for i in indices:                   # probe: a failing index stops a batch read early
        n, _ = _msr_io(vcpu, "KVM_GET_MSRS", [dict(index=i, reserved=0, data=0)], what)
        if n == 1:
            readable.append(i)
    entries: list[dict] = []
    for k in range(0, len(readable), MAX_IO_MSRS - 1):
        chunk = [dict(index=i, reserved=0, data=0) for i in readable[k:k + MAX_IO_MSRS - 1]]
        n, buf = _msr_io(vcpu, "KVM_GET_MSRS", chunk, what)
        if n != len(chunk):
            raise KvmError(f"KVM_GET_MSRS read {n} of {len(chunk)} MSRs", section=what,
                           code="kvm")
        entries += [dict(e) for e in kx.KvmMsrs.parse(buf).entries]
    for e in entries:
        e.pop("_io", None)
    return bytes(_counted(kx.KvmMsrsHeader, kx.KvmMsrEntry, entries, "nmsrs", pad=0))


def _cpuid_for_vcpu(cpuid: bytes, vcpu: int) -> bytearray:
    """Supported CPUID with this vCPU's initial APIC ID patched in (leaves 1, 0xB, 0x1F)."""
    obj = kx.KvmCpuid2.parse(cpuid)
    for e in obj.entries:
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (vcpu << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu
    return bytearray(kx.KvmCpuid2.build(obj))


def _xcr0_supported(cpuid: bytes) -> int:
    for e in kx.cpuid_entries(cpuid):
        if int(e["function"]) == 0xD and int(e["index"]) == 0:
            return int(e["eax"]) | int(e["edx"]) << 32
    return 0b11


# --------------------------------------------------------------------- capture

def capture(nvcpus: int = 1, dev: str = "/dev/kvm") -> dict[str, dict[int, bytes]]:
    """Create a VM, load a known state, read it back: {section name: {instance: bytes}}."""
    out: dict[str, dict[int, bytes]] = {}

    def put(name: str, inst: int, data: bytes) -> None:
        out.setdefault(name, {})[inst] = bytes(data)

    with contextlib.ExitStack() as stack:
        try:
            kvm = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"cannot open {dev}: {os.strerror(e.errno)}", code="kvm") from None
        stack.callback(os.close, kvm)
        api = _ioctl(kvm, "KVM_GET_API_VERSION")
        if api != KVM_API_VERSION:
            raise KvmError(f"KVM API version {api}, expected {KVM_API_VERSION}", code="kvm")
        vm = _ioctl(kvm, "KVM_CREATE_VM", 0)
        stack.callback(os.close, vm)
        _ioctl(vm, "KVM_CREATE_IRQCHIP", 0, what="vm")
        _ioctl(vm, "KVM_CREATE_PIT2", bytearray(KvmPitConfig.build({"flags": 0, "pad": [0] * 15})),
               what="vm")
        cpuid = supported_cpuid(kvm)
        msr_indices = msr_index_list(kvm)
        xsave_size = max(kx.XSAVE_LEGACY_SIZE,
                         _ioctl(vm, "KVM_CHECK_EXTENSION", KVM_CAP_XSAVE2, what="vm"))
        xcr0 = XCR0_WANTED & _xcr0_supported(cpuid)

        vcpus = []
        for i in range(nvcpus):
            fd = _ioctl(vm, "KVM_CREATE_VCPU", i, what=f"vcpu {i}")
            stack.callback(os.close, fd)
            vcpus.append(fd)

        for i, fd in enumerate(vcpus):
            w = lambda name: f"{name}[vcpu {i}]"  # noqa: E731
            _ioctl(fd, "KVM_SET_CPUID2", _cpuid_for_vcpu(cpuid, i), what=w("x86.cpuid2"))
            sregs = kx.KvmSregs.parse(_get(fd, "KVM_GET_SREGS", kx.KvmSregs.sizeof(),
                                           w("x86.sregs")))
            _ioctl(fd, "KVM_SET_SREGS", bytearray(kx.KvmSregs.build(long_mode_sregs(sregs))),
                   what=w("x86.sregs"))
            _ioctl(fd, "KVM_SET_REGS", bytearray(kx.KvmRegs.build(regs_for(i))),
                   what=w("x86.regs"))
            want = msrs_for(i)
            n, _ = _msr_io(fd, "KVM_SET_MSRS", [dict(index=k, reserved=0, data=v)
                                                for k, v in want.items()], w("x86.msrs"))
            if n != len(want):
                raise KvmError(f"KVM_SET_MSRS set {n} of {len(want)} MSRs", section=w("x86.msrs"),
                               code="kvm")
            xcrs = kx.KvmXcrs.parse(_get(fd, "KVM_GET_XCRS", kx.KvmXcrs.sizeof(), w("x86.xcrs")))
            xcrs.nr_xcrs = 1
            xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, xcr0
            _ioctl(fd, "KVM_SET_XCRS", bytearray(kx.KvmXcrs.build(xcrs)), what=w("x86.xcrs"))
            getx = "KVM_GET_XSAVE2" if xsave_size > kx.XSAVE_LEGACY_SIZE else "KVM_GET_XSAVE"
            xs = bytearray(_get(fd, getx, xsave_size, w("x86.xsave")))
            xs[160:176] = XMM0_VALUE                                   # XMM0
            bv = int.from_bytes(xs[512:520], "little") | 0b10          # SSE component present
            xs[512:520] = bv.to_bytes(8, "little")
            _ioctl(fd, "KVM_SET_XSAVE", xs, what=w("x86.xsave"))
            lapic = bytearray(_get(fd, "KVM_GET_LAPIC", kx.KVM_APIC_REG_SIZE, w("x86.lapic")))
            if i == 0:                       # BSP: LINT0 = ExtINT, LINT1 = NMI (as VMMs do)
                lapic[kx.APIC_LVT0:kx.APIC_LVT0 + 4] = (0x700).to_bytes(4, "little")
                lapic[kx.APIC_LVT1:kx.APIC_LVT1 + 4] = (0x400).to_bytes(4, "little")
                _ioctl(fd, "KVM_SET_LAPIC", lapic, what=w("x86.lapic"))

        for i, fd in enumerate(vcpus):
            w = lambda name: f"{name}[vcpu {i}]"  # noqa: E731
            put("x86.cpuid2", i, _get_cpuid2(fd, w("x86.cpuid2")))
            put("x86.mp_state", i, _get(fd, "KVM_GET_MP_STATE", kx.KvmMpState.sizeof(),
                                        w("x86.mp_state")))
            put("x86.regs", i, _get(fd, "KVM_GET_REGS", kx.KvmRegs.sizeof(), w("x86.regs")))
            put("x86.sregs", i, _get(fd, "KVM_GET_SREGS", kx.KvmSregs.sizeof(), w("x86.sregs")))
            getx = "KVM_GET_XSAVE2" if xsave_size > kx.XSAVE_LEGACY_SIZE else "KVM_GET_XSAVE"
            put("x86.xsave", i, _get(fd, getx, xsave_size, w("x86.xsave")))
            put("x86.xcrs", i, _get(fd, "KVM_GET_XCRS", kx.KvmXcrs.sizeof(), w("x86.xcrs")))
            put("x86.debugregs", i, _get(fd, "KVM_GET_DEBUGREGS", kx.KvmDebugregs.sizeof(),
                                         w("x86.debugregs")))
            put("x86.lapic", i, _get(fd, "KVM_GET_LAPIC", kx.KVM_APIC_REG_SIZE, w("x86.lapic")))
            put("x86.msrs", i, read_msrs(fd, msr_indices, w("x86.msrs")))
            put("x86.vcpu_events", i, _get(fd, "KVM_GET_VCPU_EVENTS",
                                           kx.KvmVcpuEvents.sizeof(), w("x86.vcpu_events")))
            khz = _ioctl(fd, "KVM_GET_TSC_KHZ", 0, what=w("x86.tsc_khz"))
            put("x86.tsc_khz", i, kx.TscKhz.build({"tsc_khz": khz, "reserved": 0}))

        put("x86.pit2", 0, _get(vm, "KVM_GET_PIT2", kx.KvmPitState2.sizeof(), "x86.pit2"))
        put("x86.clock", 0, _get(vm, "KVM_GET_CLOCK", kx.KvmClockData.sizeof(), "x86.clock"))
        isz = kx.KvmIrqchipPic.sizeof()
        for chip in (kx.KVM_IRQCHIP_PIC_MASTER, kx.KVM_IRQCHIP_PIC_SLAVE):
            put("x86.pic", chip, _get(vm, "KVM_GET_IRQCHIP", isz, f"x86.pic[{chip}]",
                                      prefix=chip.to_bytes(4, "little")))
        put("x86.ioapic", 0, _get(vm, "KVM_GET_IRQCHIP", isz, "x86.ioapic[0]",
                                  prefix=kx.KVM_IRQCHIP_IOAPIC.to_bytes(4, "little")))
    return out


def _get_cpuid2(fd: int, what: str) -> bytes:
    n = kx.MAX_CPUID_ENTRIES
    buf = bytearray(kx.KvmCpuid2Header.build({"nent": n, "padding": 0})) \
        + bytearray(n * kx.KvmCpuidEntry2.sizeof())
    _ioctl(fd, "KVM_GET_CPUID2", buf, what=what)
    nent = kx.KvmCpuid2Header.parse(buf).nent
    return bytes(buf[:kx.KvmCpuid2Header.sizeof() + nent * kx.KvmCpuidEntry2.sizeof()])


# --------------------------------------------------------------------- output

def host_metadata(nvcpus: int, cpuid: bytes | None = None) -> dict:
    import snapfmt
    vendor = ""
    if cpuid is not None:
        for e in kx.KvmCpuid2.parse(cpuid).entries:
            if e.function == 0:
                vendor = b"".join(v.to_bytes(4, "little") for v in (e.ebx, e.edx, e.ecx)).decode(
                    "latin-1")
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return {"created_unix_ns": time.time_ns(), "producer": "tools/kvm_capture.py",
            "producer_version": snapfmt.__version__, "kernel_release": os.uname().release,
            "cpu_vendor": vendor, "cpu_model": model, "template": {"vcpus": str(nvcpus)}}


def to_snapshot(blobs: dict[str, dict[int, bytes]], nvcpus: int):
    import snapfmt
    snap = snapfmt.new("x86_64")
    cpuid0 = blobs.get("x86.cpuid2", {}).get(0)
    snap.add("metadata", 0, fields=host_metadata(nvcpus, cpuid0))
    for name in sorted(blobs):
        for inst, data in sorted(blobs[name].items()):
            snap.add(name, inst, data=data)
    return snap


def write_snapshot(path: str, nvcpus: int = 2, dev: str = "/dev/kvm") -> None:
    """Capture ``nvcpus`` vCPUs from ``dev`` and save them as a snapfmt file at ``path``."""
    to_snapshot(capture(nvcpus, dev), nvcpus).save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", nargs="?", help="snapshot file to write (.snap)")
    ap.add_argument("--json", metavar="PATH", help="also write {section: {instance: hex}} JSON")
    ap.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    ap.add_argument("--dev", default="/dev/kvm")
    args = ap.parse_args(argv)
    if not args.output and not args.json:
        ap.error("give an output .snap path and/or --json PATH")
    if not 1 <= args.vcpus <= 64:
        ap.error("--vcpus must be in 1..64")
    try:
        blobs = capture(args.vcpus, args.dev)
    except KvmError as e:
        print(f"kvm_capture: {e}", file=sys.stderr)
        return 2
    if args.json:
        doc = {"kernel_release": os.uname().release, "vcpus": args.vcpus,
               "sections": {n: {str(i): b.hex() for i, b in sorted(v.items())}
                            for n, v in sorted(blobs.items())}}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
    if args.output:
        to_snapshot(blobs, args.vcpus).save(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
