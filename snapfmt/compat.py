"""`snapfmt compat SNAP`: will this snapshot restore on this host?  And
`snapfmt retarget`: the safe edits that make it restore (each with a warning).

The host is described by :class:`snapfmt.kvmhost.HostInfo` -- probed from
/dev/kvm, or loaded from a file written by ``snapfmt host-info -o``.  Checks:

* architecture;
* CPUID feature bits the guest saw (leaf 1 ECX/EDX, leaf 7.0 EBX/ECX/EDX,
  leaf 7.1 EAX, leaf 0xD.1 EAX, leaf 0x80000001 ECX/EDX) that the host's
  KVM_GET_SUPPORTED_CPUID does not offer (bits KVM computes at run time, like
  OSXSAVE/OSPKE, are exempt);
* MSRs in the snapshot that the host's KVM does not save/restore
  (KVM_GET_MSR_INDEX_LIST), except the architectural ones KVM always accepts;
* the XSAVE area size (KVM_CAP_XSAVE2) and XCR0 against the host's XSAVE features;
* the TSC frequency: a guest TSC more than 250 ppm away from the host's needs
  TSC scaling (KVM_CAP_TSC_CONTROL) -- without it that is a blocker;
* the kernel release and producer recorded in the metadata (warnings).

Exit status: 0 restorable (warnings allowed), 1 blockers, 2 trouble.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

from . import kvmhost
from .container import Snapshot, load
from .errors import EncodeError, FormatError, SnapfmtOSError

BLOCKER = "blocker"
WARNING = "warning"
INFO = "info"
TSC_TOLERANCE_PPM = 250

# (leaf, subleaf, register) -> {bit: name}
CPUID_FEATURES = {
    (0x1, 0, "ecx"): {0: "SSE3", 1: "PCLMULQDQ", 3: "MONITOR", 5: "VMX", 9: "SSSE3",
                      12: "FMA", 13: "CX16", 17: "PCID", 19: "SSE4.1", 20: "SSE4.2",
                      21: "X2APIC", 22: "MOVBE", 23: "POPCNT", 24: "TSC_DEADLINE",
                      25: "AES", 26: "XSAVE", 27: "OSXSAVE", 28: "AVX", 29: "F16C",
                      30: "RDRAND", 31: "HYPERVISOR"},
    (0x1, 0, "edx"): {0: "FPU", 3: "PSE", 4: "TSC", 5: "MSR", 6: "PAE", 8: "CX8", 9: "APIC",
                      11: "SEP", 12: "MTRR", 13: "PGE", 15: "CMOV", 16: "PAT", 19: "CLFLUSH",
                      23: "MMX", 24: "FXSR", 25: "SSE", 26: "SSE2", 28: "HTT"},
    (0x7, 0, "ebx"): {0: "FSGSBASE", 3: "BMI1", 4: "HLE", 5: "AVX2", 7: "SMEP", 8: "BMI2",
                      9: "ERMS", 10: "INVPCID", 11: "RTM", 16: "AVX512F", 17: "AVX512DQ",
                      18: "RDSEED", 19: "ADX", 20: "SMAP", 23: "CLFLUSHOPT", 24: "CLWB",
                      29: "SHA", 30: "AVX512BW", 31: "AVX512VL"},
    (0x7, 0, "ecx"): {1: "AVX512_VBMI", 2: "UMIP", 3: "PKU", 4: "OSPKE", 5: "WAITPKG",
                      8: "GFNI", 9: "VAES", 10: "VPCLMULQDQ", 14: "AVX512_VPOPCNTDQ",
                      16: "LA57", 22: "RDPID"},
    (0x7, 0, "edx"): {4: "FSRM", 8: "AVX512_VP2INTERSECT", 10: "MD_CLEAR", 14: "SERIALIZE",
                      22: "AMX_BF16", 24: "AMX_TILE", 25: "AMX_INT8", 26: "IBRS_IBPB",
                      27: "STIBP", 28: "FLUSH_L1D", 29: "ARCH_CAPABILITIES", 31: "SSBD"},
    (0x7, 1, "eax"): {4: "AVX_VNNI", 5: "AVX512_BF16", 10: "FZRM", 11: "FSRS", 12: "FSRC"},
    (0xD, 1, "eax"): {0: "XSAVEOPT", 1: "XSAVEC", 2: "XGETBV1", 3: "XSAVES", 4: "XFD"},
    (0x80000001, 0, "ecx"): {0: "LAHF_LM", 5: "ABM", 6: "SSE4A", 8: "PREFETCHW", 16: "FMA4",
                             21: "TBM"},
    (0x80000001, 0, "edx"): {11: "SYSCALL", 20: "NX", 26: "PDPE1GB", 27: "RDTSCP", 29: "LM"},
}
#: Bits KVM computes at run time (OSXSAVE, OSPKE) or a VMM sets without KVM listing
#: them (HYPERVISOR, HTT for its vCPU topology).
CPUID_DYNAMIC = {(0x1, 0, "ecx"): {27, 31}, (0x1, 0, "edx"): {28}, (0x7, 0, "ecx"): {4}}
_REG_INDEX = {"eax": 2, "ebx": 3, "ecx": 4, "edx": 5}

#: MSRs KVM_SET_MSRS accepts without them being in KVM_GET_MSR_INDEX_LIST
#: (architectural state handled by kvm_set_msr_common / the vendor module).
KVM_ARCH_MSRS = {0x1B, 0xC0000100, 0xC0000101, 0x277, 0x2FF, 0x179, 0x17A, 0x17B, 0x1A0,
                 0x3B, 0x6E0} | set(range(0x200, 0x210)) | {0x250, 0x258, 0x259} \
    | set(range(0x268, 0x270)) | set(range(0x400, 0x480))


@dataclass(frozen=True)
class Problem:
    severity: str      # blocker | warning | info
    code: str
    where: str
    message: str

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message} [{self.code}]"


def _feature_names(bits: int, table: dict) -> list[str]:
    return [table.get(b, f"bit{b}") for b in range(32) if bits >> b & 1]


def _guest_cpuid(snap: Snapshot) -> dict[int, list]:
    out = {}
    for s in snap.all("x86.cpuid2"):
        out[s.instance] = s.fields["entries"]
    return out


def _entry(entries, fn, idx):
    for e in entries:
        if e["function"] == fn and e["index"] == idx:
            return e
    return None


def check(snap: Snapshot, host: kvmhost.HostInfo) -> list[Problem]:
    """Blockers, warnings and notes for restoring ``snap`` on ``host``."""
    out: list[Problem] = []
    if snap.arch != host.arch:
        out.append(Problem(BLOCKER, "arch", "header.arch",
                           f"{snap.arch} snapshot, {host.arch} host"))
        return out
    if snap.arch == "x86_64":
        out += _check_cpuid(snap, host)
        out += _check_msrs(snap, host)
        out += _check_xsave(snap, host)
        out += _check_tsc(snap, host)
    out += _check_versions(snap, host)
    return out


def _check_cpuid(snap, host) -> list[Problem]:
    out = []
    seen = set()
    for inst, entries in sorted(_guest_cpuid(snap).items()):
        for (fn, idx, reg), names in CPUID_FEATURES.items():
            g = _entry(entries, fn, idx)
            if g is None:
                continue
            h = host.cpuid_entry(fn, idx)
            hbits = h[_REG_INDEX[reg]] if h is not None else 0
            missing = g[reg] & ~hbits
            for b in CPUID_DYNAMIC.get((fn, idx, reg), ()):
                missing &= ~(1 << b)
            if fn == 1 and reg == "ecx" and host.tsc_deadline_timer:
                missing &= ~(1 << 24)
            if missing and (fn, idx, reg, missing) not in seen:
                seen.add((fn, idx, reg, missing))
                out.append(Problem(
                    BLOCKER, "cpuid-feature", f"x86.cpuid2[vcpu {inst}].leaf[0x{fn:x}.{idx}]."
                    f"{reg}", f"guest saw {', '.join(_feature_names(missing, names))}; the "
                    f"host's KVM does not offer {'it' if bin(missing).count('1') == 1 else 'them'}"))
    return out


def _check_msrs(snap, host) -> list[Problem]:
    from .kvm_x86 import msr_entries, msr_name
    out = []
    listed = set(host.msrs) | set(host.feature_msrs)
    missing: dict[int, list[int]] = {}
    for s in snap.all("x86.msrs"):
        for idx in msr_entries(bytes(s.data))["index"].tolist():
            if idx not in listed:
                missing.setdefault(idx, []).append(s.instance)
    for idx, vcpus in sorted(missing.items()):
        where = f"x86.msrs[{'all vcpus' if len(vcpus) == len(snap.all('x86.msrs')) else vcpus}]"
        if idx in KVM_ARCH_MSRS:
            out.append(Problem(INFO, "msr-architectural", f"{where}.{msr_name(idx)}",
                               f"MSR 0x{idx:x} is not in the host's MSR index list; KVM "
                               f"accepts it as architectural state"))
        else:
            out.append(Problem(BLOCKER, "msr-unsupported", f"{where}.{msr_name(idx)}",
                               f"MSR 0x{idx:x} ({msr_name(idx)}) is not supported by the "
                               f"host's KVM: KVM_SET_MSRS would stop there (retarget: "
                               f"--drop-unsupported-msrs)"))
    return out


def _check_xsave(snap, host) -> list[Problem]:
    out = []
    hsize = host.xsave_size or 4096
    sizes = {s.length for s in snap.all("x86.xsave")}
    for n in sorted(sizes):
        if n > hsize:
            out.append(Problem(BLOCKER, "xsave-size", "x86.xsave",
                               f"XSAVE area is {n} bytes, the host's KVM takes {hsize} "
                               f"(KVM_CAP_XSAVE2): state components the host lacks"))
    hx = host.supported_xcr0
    seen = set()
    for s in snap.all("x86.xcrs"):
        f = s.fields
        for x in f["xcrs"][:min(f["nr_xcrs"], 16)]:
            if x["xcr"] == 0 and hx is not None and x["value"] & ~hx \
                    and x["value"] & ~hx not in seen:
                seen.add(x["value"] & ~hx)
                from .kvm_x86 import XFEATURE_BITS, bit_names
                out.append(Problem(BLOCKER, "xcr0-unsupported", f"x86.xcrs[vcpu {s.instance}]"
                                   f".xcr0", f"XCR0 enables {', '.join(bit_names(x['value'] & ~hx, XFEATURE_BITS))}"
                                   f", which the host cannot save/restore"))
                break
    return out


def _check_tsc(snap, host) -> list[Problem]:
    out = []
    khz = {s.fields["tsc_khz"] for s in snap.all("x86.tsc_khz")}
    if not khz:
        return [Problem(WARNING, "tsc-unknown", "x86.tsc_khz",
                        "the snapshot does not record the guest TSC frequency")]
    if host.tsc_khz is None:
        return [Problem(WARNING, "tsc-host-unknown", "host",
                        "the host TSC frequency is unknown (KVM_GET_TSC_KHZ unavailable)")]
    for g in sorted(khz):
        ppm = abs(g - host.tsc_khz) / host.tsc_khz * 1e6
        if ppm <= TSC_TOLERANCE_PPM:
            if g != host.tsc_khz:
                out.append(Problem(INFO, "tsc-close", "x86.tsc_khz",
                                   f"guest {g} kHz, host {host.tsc_khz} kHz ({ppm:.0f} ppm, "
                                   f"within {TSC_TOLERANCE_PPM} ppm)"))
        elif host.tsc_scaling:
            out.append(Problem(WARNING, "tsc-scaled", "x86.tsc_khz",
                               f"guest {g} kHz, host {host.tsc_khz} kHz ({ppm:.0f} ppm): KVM "
                               f"will scale the guest TSC (KVM_SET_TSC_KHZ)"))
        else:
            out.append(Problem(BLOCKER, "tsc-frequency", "x86.tsc_khz",
                               f"guest {g} kHz, host {host.tsc_khz} kHz ({ppm:.0f} ppm > "
                               f"{TSC_TOLERANCE_PPM}) and the host cannot scale the TSC "
                               f"(no KVM_CAP_TSC_CONTROL): guest time would run "
                               f"{'fast' if host.tsc_khz > g else 'slow'}"))
    return out


def _major_minor(rel: str) -> tuple:
    parts = rel.split("-")[0].split(".")
    try:
        return tuple(int(p) for p in parts[:2])
    except ValueError:
        return (rel,)


def _check_versions(snap, host) -> list[Problem]:
    out = []
    try:
        md = snap.metadata
    except FormatError:
        md = None
    if md is None:
        return [Problem(WARNING, "metadata-missing", "metadata",
                        "no metadata: kernel and producer versions unknown")]
    k = md.get("kernel_release", "")
    if k and k != host.kernel_release:
        sev = WARNING if _major_minor(k) != _major_minor(host.kernel_release) else INFO
        out.append(Problem(sev, "kernel-differs", "metadata.kernel_release",
                           f"snapshot taken on kernel {k}, host runs {host.kernel_release}"
                           + (": KVM state formats may differ" if sev == WARNING else "")))
    out.append(Problem(INFO, "producer", "metadata.producer",
                       f"written by {md.get('producer', '?')} {md.get('producer_version', '?')}"))
    return out


def blockers(problems) -> list[Problem]:
    return [p for p in problems if p.severity == BLOCKER]


# ------------------------------------------------------------------ retarget

@dataclass
class Edit:
    what: str
    risk: str


def drop_msrs(snap: Snapshot, indices: set[int]) -> list[Edit]:
    from .kvm_x86 import msr_name
    edits = []
    dropped = set()
    for s in snap.all("x86.msrs"):
        f = s.fields
        keep = [e for e in f["entries"] if e["index"] not in indices]
        if len(keep) != len(f["entries"]):
            dropped |= {e["index"] for e in f["entries"] if e["index"] in indices}
            snap.replace("x86.msrs", s.instance, fields={"nmsrs": len(keep), "pad": f["pad"],
                                                         "entries": keep})
    for idx in sorted(dropped):
        edits.append(Edit(f"dropped MSR 0x{idx:x} ({msr_name(idx)}) from every vCPU",
                          "after restore the guest sees KVM's reset value of this MSR; if the "
                          "guest kernel programmed it (features, mitigations, syscall entry "
                          "points) it may misbehave"))
    return edits


def clear_field(snap: Snapshot, spec: str) -> list[Edit]:
    """``SECTION.FIELD[.SUB]`` set to 0 in every instance (e.g. x86.debugregs.dr7)."""
    from .registry import by_name
    name, _, path = _split_section_field(spec)
    if by_name(name) is None or not path:
        raise EncodeError(f"{spec!r}: expected SECTION.FIELD with a known section (e.g. "
                          f"x86.debugregs.dr7)", section="retarget", field="clear")
    secs = snap.all(name)
    if not secs:
        raise EncodeError(f"no {name} section in the snapshot", section="retarget",
                          field="clear")
    for s in secs:
        f = s.fields
        obj = f
        keys = path.split(".")
        for k in keys[:-1]:
            if not isinstance(obj, dict) or k not in obj:
                raise EncodeError(f"{spec!r}: no field {k!r}", section=name, field=path)
            obj = obj[k]
        if not isinstance(obj, dict) or keys[-1] not in obj or isinstance(obj[keys[-1]],
                                                                          (dict, list)):
            raise EncodeError(f"{spec!r}: not a scalar field", section=name, field=path)
        v = obj[keys[-1]]
        obj[keys[-1]] = "00" * (len(v) // 2) if isinstance(v, str) else 0
        snap.replace(name, s.instance, fields=f)
    return [Edit(f"cleared {spec} in {len(secs)} section(s)",
                 "the guest resumes with this register zeroed; state that depended on it "
                 "(breakpoints, pending events, mode bits) is lost")]


def _split_section_field(spec: str):
    from .registry import all_kinds
    for k in sorted(all_kinds(), key=lambda k: -len(k.name)):
        if spec == k.name or spec.startswith(k.name + "."):
            return k.name, ".", spec[len(k.name) + 1:]
    return spec, "", ""


def drop_arm64_regs(snap: Snapshot, names: set[str]) -> list[Edit]:
    from .arm64 import reg_name
    edits = []
    gone = set()
    for s in snap.all("arm64.regs"):
        f = s.fields
        keep = [r for r in f["regs"] if reg_name(r["id"]) not in names
                and f"0x{r['id']:x}" not in names]
        if len(keep) != len(f["regs"]):
            gone |= {reg_name(r["id"]) for r in f["regs"] if r not in keep}
            g = dict(f)
            g["regs"] = keep
            g["count"] = len(keep)
            snap.replace("arm64.regs", s.instance, fields=g)
    for n in sorted(gone):
        edits.append(Edit(f"dropped ONE_REG {n} from every vCPU",
                          "the register keeps its reset value after restore"))
    return edits


def restamp_tsc(snap: Snapshot, khz: int) -> list[Edit]:
    n = 0
    old = set()
    for s in snap.all("x86.tsc_khz"):
        f = s.fields
        old.add(f["tsc_khz"])
        snap.replace("x86.tsc_khz", s.instance, fields={"tsc_khz": khz,
                                                        "reserved": f["reserved"]})
        n += 1
    if not n:
        raise EncodeError("no x86.tsc_khz section to re-stamp", section="retarget")
    return [Edit(f"re-stamped the guest TSC frequency {sorted(old)} kHz -> {khz} kHz "
                 f"({n} vCPU(s))",
                 "the guest calibrated its clocks at the old frequency: unless it uses "
                 "kvmclock, its clocks and timers run off by the ratio after restore")]


# ------------------------------------------------------------------ CLI

def _host(args) -> kvmhost.HostInfo:
    if getattr(args, "host", None):
        try:
            with open(args.host) as f:
                doc = json.load(f)
        except OSError as e:
            raise SnapfmtOSError(f"cannot read {args.host}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise FormatError(f"not JSON: {e.msg} (line {e.lineno})", section=args.host,
                              code="inval") from None
        return kvmhost.HostInfo.from_dict(doc, source=args.host)
    return kvmhost.probe()


def cmd_compat(args) -> int:
    snap = load(args.file)
    host = _host(args)
    probs = check(snap, host)
    nb = len(blockers(probs))
    if args.json:
        sys.stdout.write(json.dumps({"file": args.file, "host": host.source,
                                     "restorable": nb == 0,
                                     "problems": [p.as_dict() for p in probs]}, indent=1) + "\n")
    else:
        for p in probs:
            if p.severity != INFO or args.verbose:
                print(f"{args.file}: {p}")
        nw = sum(p.severity == WARNING for p in probs)
        where = "this host" if host.source == "probe" else host.source
        print(f"{args.file}: {'NOT restorable' if nb else 'restorable'} on {where} "
              f"({nb} blocker(s), {nw} warning(s))")
    return 1 if nb else 0


def cmd_host_info(args) -> int:
    h = kvmhost.probe()
    text = json.dumps(h.as_dict(), indent=1) + "\n"
    if args.output:
        tmp = f"{args.output}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, args.output)
        except OSError as e:
            raise SnapfmtOSError(f"cannot write {args.output}: {e.strerror}") from None
    else:
        sys.stdout.write(text)
    return 0


def _parse_msr(v: str) -> int:
    from .kvm_x86 import MSR_NAMES
    names = {n: i for i, n in MSR_NAMES.items()}
    if v in names:
        return names[v]
    try:
        return int(v, 0)
    except ValueError:
        raise EncodeError(f"{v!r} is not an MSR number or name (e.g. 0xc0000103, TSC_AUX)",
                          section="retarget", field="drop-msr") from None


def cmd_retarget(args) -> int:
    snap = load(args.file)
    edits: list[Edit] = []
    host = None
    if args.drop_unsupported_msrs or args.tsc_khz == "host":
        host = _host(args)
    drop = set()
    for v in args.drop_msr or []:
        drop |= {_parse_msr(x.strip()) for x in v.split(",") if x.strip()}
    if args.drop_unsupported_msrs:
        drop |= {_msr_from_problem(p) for p in _check_msrs(snap, host)
                 if p.severity == BLOCKER}
    if drop:
        edits += drop_msrs(snap, drop)
    for spec in args.clear or []:
        edits += clear_field(snap, spec)
    if args.drop_reg:
        edits += drop_arm64_regs(snap, {x.strip() for v in args.drop_reg for x in v.split(",")})
    if args.tsc_khz:
        if args.tsc_khz == "host":
            if host.tsc_khz is None:
                raise FormatError("the host TSC frequency is unknown", section="host",
                                  code="kvm")
            khz = host.tsc_khz
        else:
            try:
                khz = int(args.tsc_khz)
            except ValueError:
                raise EncodeError(f"--tsc-khz {args.tsc_khz!r}: a number of kHz or 'host'",
                                  section="retarget", field="tsc-khz") from None
            if not 0 < khz < 1 << 32:
                raise EncodeError(f"--tsc-khz {khz} out of range", section="retarget",
                                  field="tsc-khz")
        edits += restamp_tsc(snap, khz)
    if not edits:
        print(f"{args.file}: nothing to change")
        return 0
    for e in edits:
        print(f"warning: {e.what}: {e.risk}", file=sys.stderr)
    if args.dry_run:
        print(f"{args.file}: dry run, {len(edits)} edit(s), nothing written")
        return 0
    if not args.output:
        raise EncodeError("-o OUTPUT is required (or --dry-run)", section="retarget",
                          field="output")
    snap.save(args.output)
    print(f"{args.output}: written with {len(edits)} edit(s)")
    return 0


def _msr_from_problem(p: Problem) -> int:
    # message starts with "MSR 0x..."
    return int(p.message.split()[1], 16)


def register_cli(sub) -> None:
    s = sub.add_parser("compat", help="will this snapshot restore on this host? (exit 0 ok, "
                                      "1 blockers, 2 trouble)")
    s.add_argument("file")
    s.add_argument("--host", metavar="HOST.json",
                   help="a host description from `snapfmt host-info -o` instead of /dev/kvm")
    s.add_argument("--json", action="store_true")
    s.add_argument("-v", "--verbose", action="store_true", help="also print notes")
    s.set_defaults(func=cmd_compat)

    s = sub.add_parser("host-info", help="this host's KVM capabilities as JSON (for --host)")
    s.add_argument("-o", "--output")
    s.set_defaults(func=cmd_host_info)

    s = sub.add_parser("retarget", help="safe edits so a snapshot restores on another host "
                                        "(each prints what it risks)")
    s.add_argument("file")
    s.add_argument("-o", "--output")
    s.add_argument("--host", metavar="HOST.json", help="target host (default: this host)")
    s.add_argument("--drop-unsupported-msrs", action="store_true",
                   help="drop every MSR the target's KVM cannot take")
    s.add_argument("--drop-msr", action="append", metavar="MSR[,MSR]",
                   help="drop these MSRs (number or name) from every vCPU")
    s.add_argument("--clear", action="append", metavar="SECTION.FIELD",
                   help="zero a register field in every instance, e.g. x86.debugregs.dr7")
    s.add_argument("--drop-reg", action="append", metavar="NAME[,NAME]",
                   help="aarch64: drop ONE_REG registers (name or 0x id) from every vCPU")
    s.add_argument("--tsc-khz", metavar="KHZ|host", help="re-stamp the guest TSC frequency")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(func=cmd_retarget)
