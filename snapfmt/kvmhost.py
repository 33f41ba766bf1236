"""What this host's KVM offers, queried through /dev/kvm with plain ioctls.

:func:`probe` returns a :class:`HostInfo` (JSON-serialisable, so a host
description can be saved with ``snapfmt host-info -o host.json`` and used on
another machine with ``snapfmt compat --host host.json``):

* KVM_GET_API_VERSION, KVM_CHECK_EXTENSION (KVM_CAP_XSAVE2 -> XSAVE buffer size,
  KVM_CAP_TSC_CONTROL -> TSC scaling, KVM_CAP_TSC_DEADLINE_TIMER);
* KVM_GET_SUPPORTED_CPUID (the CPUID bits a guest may be given);
* KVM_GET_MSR_INDEX_LIST (MSRs KVM saves/restores) and
  KVM_GET_MSR_FEATURE_INDEX_LIST;
* KVM_GET_TSC_KHZ on a scratch vCPU of a scratch VM (the host TSC frequency
  KVM gives a guest by default).
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import struct
from dataclasses import asdict, dataclass, field

from .errors import SnapfmtError, SnapfmtOSError

KVMIO = 0xAE


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)           # struct kvm_msr_list
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)          # struct kvm_cpuid2
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, 4)   # struct kvm_msr_list
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_TSC_KHZ = _io(0xA3)

KVM_CAP_XSAVE = 55
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_XSAVE2 = 208

KVM_API_VERSION = 12
CPUID_ENTRY = struct.Struct("<IIIIIIIIII")        # kvm_cpuid_entry2 (40 bytes)


class KvmError(SnapfmtOSError):
    code = "kvm"


@dataclass
class HostInfo:
    """A host's KVM capabilities (what `compat` compares a snapshot with)."""
    arch: str
    kernel_release: str
    api_version: int | None = None
    cpuid: list = field(default_factory=list)   # [function, index, eax, ebx, ecx, edx]
    msrs: list = field(default_factory=list)    # MSR indices KVM saves/restores
    feature_msrs: list = field(default_factory=list)
    xsave_size: int | None = None               # KVM_CAP_XSAVE2 size (None: legacy 4096)
    tsc_khz: int | None = None
    tsc_scaling: bool = False
    tsc_deadline_timer: bool = False
    source: str = "probe"                       # "probe" (this host) or a file name

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "file") -> "HostInfo":
        from .errors import FormatError
        try:
            known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            h = cls(**known)
            h.cpuid = [list(map(int, e)) for e in h.cpuid]
            h.msrs = [int(x) for x in h.msrs]
            h.feature_msrs = [int(x) for x in h.feature_msrs]
        except (TypeError, ValueError, KeyError) as e:
            raise FormatError(f"not a host description: {e}", section=source,
                              code="inval") from None
        if not isinstance(h.arch, str) or not isinstance(h.kernel_release, str):
            raise FormatError("not a host description: arch and kernel_release are strings",
                              section=source, code="inval")
        h.source = source
        return h

    def cpuid_entry(self, function: int, index: int = 0):
        for e in self.cpuid:
            if e[0] == function and e[1] == index:
                return e
        if index:
            return None
        for e in self.cpuid:           # leaves without a significant index
            if e[0] == function:
                return e
        return None

    @property
    def supported_xcr0(self) -> int | None:
        e = self.cpuid_entry(0xD, 0)
        return None if e is None else (e[2] | e[5] << 32)


def _ioctl(fd: int, req: int, arg=0, what: str = ""):
    try:
        return fcntl.ioctl(fd, req, arg)
    except OSError as e:
        raise KvmError(f"{what or hex(req)} failed: {os.strerror(e.errno)}") from None


def _msr_list(fd: int, req: int, what: str) -> list[int]:
    n = 256
    while n <= 1 << 16:
        buf = bytearray(4 + 4 * n)
        struct.pack_into("<I", buf, 0, n)
        try:
            fcntl.ioctl(fd, req, buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG:
                n *= 4
                continue
            raise KvmError(f"{what} failed: {os.strerror(e.errno)}") from None
        cnt = struct.unpack_from("<I", buf, 0)[0]
        return list(struct.unpack_from(f"<{cnt}I", buf, 4))
    raise KvmError(f"{what}: more than 65536 MSRs")


def _supported_cpuid(fd: int) -> list[list[int]]:
    n = 256
    while n <= 4096:
        buf = bytearray(8 + CPUID_ENTRY.size * n)
        struct.pack_into("<I", buf, 0, n)
        try:
            fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG:
                n *= 2
                continue
            raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {os.strerror(e.errno)}") from None
        cnt = struct.unpack_from("<I", buf, 0)[0]
        out = []
        for i in range(cnt):
            fn, idx, _flags, a, b, c, d = CPUID_ENTRY.unpack_from(buf, 8 + 40 * i)[:7]
            out.append([fn, idx, a, b, c, d])
        return out
    raise KvmError("KVM_GET_SUPPORTED_CPUID: more than 4096 entries")


def _scratch_tsc_khz(kvm_fd: int) -> int | None:
    vm = _ioctl(kvm_fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
    try:
        vcpu = _ioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
        try:
            khz = _ioctl(vcpu, KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")
            return khz if khz > 0 else None
        finally:
            os.close(vcpu)
    finally:
        os.close(vm)


def probe(device: str = "/dev/kvm") -> HostInfo:
    """Query ``device`` (KVM) for what a restored guest may use on this host."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KvmError(f"cannot open {device}: {e.strerror}",
                       hint="run on a KVM host, or pass a saved host description (--host)"
                       ) from None
    try:
        api = _ioctl(fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if api != KVM_API_VERSION:
            raise KvmError(f"KVM API version {api}, expected {KVM_API_VERSION}")
        arch = platform.machine()
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
        h = HostInfo(arch=arch, kernel_release=platform.release(), api_version=api)
        x2 = _ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2, "KVM_CHECK_EXTENSION")
        h.xsave_size = x2 if x2 > 0 else (4096 if _ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE)
                                          else None)
        h.tsc_scaling = bool(_ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_TSC_CONTROL))
        h.tsc_deadline_timer = bool(_ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_TSC_DEADLINE_TIMER))
        if arch == "x86_64":
            h.cpuid = _supported_cpuid(fd)
            h.msrs = _msr_list(fd, KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")
            if _ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_GET_MSR_FEATURES):
                h.feature_msrs = _msr_list(fd, KVM_GET_MSR_FEATURE_INDEX_LIST,
                                           "KVM_GET_MSR_FEATURE_INDEX_LIST")
        if _ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_GET_TSC_KHZ):
            try:
                h.tsc_khz = _scratch_tsc_khz(fd)
            except SnapfmtError:
                h.tsc_khz = None
        return h
    finally:
        os.close(fd)
