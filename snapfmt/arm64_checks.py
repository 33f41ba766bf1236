"""Semantic checks of aarch64 state (registered with :func:`snapfmt.findings.check`).

Sources of the rules are the documents named in :mod:`snapfmt.arm64`: api.rst
"4.68 KVM_SET_ONE_REG" (arm64 id layout and register sizes), arm-vgic-v3.rst /
arm-vgic.rst / arm-vgic-its.rst ("Groups": attribute formats and widths) and
the GICv3/GICv2 architecture specifications (register maps, GICD_TYPER).
Sections whose bytes do not decode are skipped: :func:`snapfmt.validate`
reports them.

Finding codes (stable):

================================ ======== ================================================
code                             severity meaning
================================ ======== ================================================
arm64-mixed-backends             error    KVM kinds (regs/vcpu_init/gicv3/gicv2) and HVF
                                          kinds (hvf_vcpu/gic_blob) in one snapshot
arm64-vcpu-index-gap             error    vCPU indices are not 0..n-1
arm64-vcpu-sections-differ       error    a vCPU lacks a per-vCPU section others have
arm64-vcpu-init-differs          error    vCPUs created with different target/features
arm64-vcpu-init-features         warning  feature bits KVM does not define
arm64-sve-state-missing          warning  SVE enabled: Z/P/FFR registers are not storable
arm64-mp-state-range             error    mp_state not RUNNABLE/STOPPED/SUSPENDED
arm64-mp-state-reserved          error    arm64.mp_state reserved field not zero
arm64-regs-reserved              error    arm64.regs header reserved field not zero
arm64-regs-missing-pc            error    no PC core register (KVM_REG_ARM_CORE_REG(regs.pc))
arm64-regs-missing-mpidr         warning  no MPIDR_EL1: redistributors cannot be matched
arm64-reg-duplicate-id           error    one ONE_REG id listed twice
arm64-reg-bad-id                 error    id not KVM_REG_ARM64, reserved bits set, unknown
                                          coprocessor or not a struct kvm_regs member
arm64-reg-size-unsupported       error    KVM_REG_SIZE not U32/U64/U128 (16-byte slot)
arm64-reg-size-mismatch          error    KVM_REG_SIZE differs from the register's size
arm64-reg-value-exceeds-size     error    value bytes beyond KVM_REG_SIZE are not zero
arm64-pstate-mode                error    PSTATE.M not a mode the vCPU can run in
arm64-mpidr-duplicate            error    two vCPUs with the same MPIDR affinity
arm64-hvf-reserved               error    arm64.hvf_vcpu reserved field not zero
arm64-hvf-flags                  error    unknown arm64.hvf_vcpu flags
arm64-hvf-unknown-reg            error    hv_reg_t / hv_simd_fp_reg_t value not documented
arm64-hvf-duplicate-id           error    one HVF register listed twice
arm64-hvf-missing-pc             error    no HV_REG_PC
arm64-gic-multiple               error    more than one of gicv3 / gicv2 / gic_blob
arm64-gic-reserved               error    a GIC header/record reserved field not zero
arm64-gic-bad-group              error    attribute group not saved state for this GIC
arm64-gic-duplicate-attr         error    one (group, mpidr, attr) listed twice
arm64-gic-value-too-wide         error    value wider than the group's access width
arm64-gic-bad-offset             error    offset misaligned / not a register of the frame
arm64-gic-mpidr-unexpected       warning  mpidr set on a group that ignores it
arm64-gic-dist-private-irq       error    distributor per-IRQ register for INTIDs < 32
arm64-gic-irq-out-of-range       error    INTID beyond GICD_TYPER.ITLinesNumber range
arm64-gic-typer-missing          warning  no GICD_TYPER record: IRQ range unchecked
arm64-gic-nr-irqs                error    NR_IRQS not a multiple of 32 in [64, 1024] or
                                          inconsistent with GICD_TYPER
arm64-gic-bad-addr               error    unknown base-address type or misaligned base
arm64-gic-redist-missing         error    a vCPU has no redistributor registers
arm64-gic-unknown-mpidr          error    per-vCPU record for an MPIDR no vCPU has
arm64-gic-redist-typer-mismatch  error    GICR_TYPER affinity != the record's mpidr
arm64-gic-bad-sysreg             error    CPU_SYSREGS / ICC register KVM/HVF do not save
arm64-gic-icc-missing            warning  a vCPU has no ICC system registers
arm64-gic-bad-level-info         error    LEVEL_INFO info != 0 or vINTID not 32-aligned
arm64-gicv2-bad-cpuid            error    GICv2 cpuid not a vCPU index (or >= 8)
arm64-gic-icc-unknown-vcpu       error    gic_blob ICC record for a vCPU not in the file
arm64-gic-blob-empty             error    gic_blob without state data
================================ ======== ================================================
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterator

from . import arm64 as a
from .errors import FormatError
from .findings import ERROR, WARNING, Finding, check

ARCH = "aarch64"

_KVM_KINDS = ("arm64.regs", "arm64.vcpu_init", "arm64.gicv3", "arm64.gicv2")
_HVF_KINDS = ("arm64.hvf_vcpu", "arm64.gic_blob")
_VCPU_KINDS = ("arm64.vcpu_init", "arm64.mp_state", "arm64.regs", "arm64.hvf_vcpu")
_GIC_KINDS = ("arm64.gicv3", "arm64.gicv2", "arm64.gic_blob")
_U32 = 0xFFFFFFFF


def _fields(sec):
    """Decoded fields, or None when the bytes do not decode (reported elsewhere)."""
    if sec is None:
        return None
    try:
        return sec.fields
    except FormatError:
        return None


def _per_vcpu(snap, name: str) -> Iterator[tuple[object, dict]]:
    for sec in snap.all(name):
        f = _fields(sec)
        if f is not None:
            yield sec, f


def vcpu_indices(snap) -> list[int]:
    return sorted({s.instance for n in _VCPU_KINDS for s in snap.all(n)})


def vcpu_mpidrs(snap) -> dict[int, int]:
    """{vCPU index: MPIDR_EL1} from arm64.regs or arm64.hvf_vcpu (where present)."""
    out = {}
    for sec, f in _per_vcpu(snap, "arm64.regs"):
        m = a.mpidr(f)
        if m is not None:
            out[sec.instance] = m
    for sec, f in _per_vcpu(snap, "arm64.hvf_vcpu"):
        m = a.hvf_mpidr(f)
        if m is not None:
            out.setdefault(sec.instance, m)
    return out


# ------------------------------------------------------------------ vCPU set

@check("arm64-vcpus", arch=ARCH)
def check_vcpus(snap):
    kvm = [n for n in _KVM_KINDS if snap.all(n)]
    hvf = [n for n in _HVF_KINDS if snap.all(n)]
    if kvm and hvf:
        yield Finding("arm64-mixed-backends", ERROR, ", ".join(kvm + hvf),
                      f"KVM sections ({', '.join(kvm)}) and Hypervisor.framework sections "
                      f"({', '.join(hvf)}) in one snapshot")
    idx = vcpu_indices(snap)
    if idx and idx != list(range(len(idx))):
        yield Finding("arm64-vcpu-index-gap", ERROR, "vcpus",
                      f"vCPU indices {idx} are not 0..{len(idx) - 1}")
    present = {n: {s.instance for s in snap.all(n)} for n in _VCPU_KINDS}
    for n, have in present.items():
        if have:
            for i in sorted(set(idx) - have):
                yield Finding("arm64-vcpu-sections-differ", ERROR, f"{n}[vcpu {i}]",
                              f"vCPU {i} has no {n} section; other vCPUs have one")
    mp = vcpu_mpidrs(snap)
    seen: dict[int, int] = {}
    for i, m in sorted(mp.items()):
        key = a.vgic_mpidr(m)
        if key in seen:
            yield Finding("arm64-mpidr-duplicate", ERROR, f"vcpu {i}.MPIDR_EL1",
                          f"MPIDR_EL1 0x{m:x} has the affinity of vCPU {seen[key]}")
        else:
            seen[key] = i


@check("arm64-vcpu-init", arch=ARCH)
def check_vcpu_init(snap):
    first = None
    for sec, f in _per_vcpu(snap, "arm64.vcpu_init"):
        words = list(f["features"])
        unknown = [32 * w + b for w, v in enumerate(words) for b in range(32)
                   if v >> b & 1 and 32 * w + b not in a.KVM_ARM_VCPU_FEATURES]
        if unknown:
            yield Finding("arm64-vcpu-init-features", WARNING, f"{sec.label}.features",
                          f"feature bits {unknown} not defined by KVM (arm64 kvm.h)")
        if words[0] >> a.KVM_ARM_VCPU_SVE & 1:
            yield Finding("arm64-sve-state-missing", WARNING, f"{sec.label}.features",
                          "KVM_ARM_VCPU_SVE is set but SVE Z/P/FFR registers (U2048/U256) "
                          "do not fit arm64.regs records; SVE state is not saved")
        # KVM_ARM_VCPU_POWER_OFF may differ per vCPU; everything else must match.
        key = (f["target"], words[0] & ~1, tuple(words[1:]))
        if first is None:
            first = (sec, key)
        elif key != first[1]:
            yield Finding("arm64-vcpu-init-differs", ERROR, sec.label,
                          f"target/features {_fmt_init(key)} differ from {first[0].label} "
                          f"{_fmt_init(first[1])}; KVM requires the same for every vCPU")


def _fmt_init(key) -> str:
    return f"(target {key[0]}, features 0x{key[1]:x})"


@check("arm64-mp-state", arch=ARCH)
def check_mp_state(snap):
    for sec, f in _per_vcpu(snap, "arm64.mp_state"):
        if f["mp_state"] not in a.KVM_MP_STATES_ARM64:
            name = a.KVM_MP_STATE_NAMES.get(f["mp_state"], "unknown")
            yield Finding("arm64-mp-state-range", ERROR, f"{sec.label}.mp_state",
                          f"mp_state {f['mp_state']} ({name}): arm64 KVM accepts RUNNABLE (0), "
                          f"STOPPED (5), SUSPENDED (10)")
        if f["reserved"]:
            yield Finding("arm64-mp-state-reserved", ERROR, f"{sec.label}.reserved",
                          f"must be 0, is 0x{f['reserved']:x}")


# ------------------------------------------------------------------ ONE_REG

@check("arm64-regs", arch=ARCH)
def check_regs(snap):
    for sec, f in _per_vcpu(snap, "arm64.regs"):
        if f["reserved"]:
            yield Finding("arm64-regs-reserved", ERROR, f"{sec.label}.reserved",
                          f"must be 0, is 0x{f['reserved']:x}")
        ids = Counter(r["id"] for r in f["regs"])
        reported = set()
        init = _fields(snap.find("arm64.vcpu_init", sec.instance))
        for i, r in enumerate(f["regs"]):
            rid = r["id"]
            d = a.decode_reg_id(rid)
            loc = f"{sec.label}.regs[{i}]"
            if ids[rid] > 1 and rid not in reported:
                reported.add(rid)
                yield Finding("arm64-reg-duplicate-id", ERROR, loc,
                              f"{d['name']} (0x{rid:016x}) listed {ids[rid]} times")
            if not (d["arch_ok"] and d["reserved_ok"] and d["valid"]):
                why = ("arch bits are not KVM_REG_ARM64" if not d["arch_ok"] else
                       "reserved bits 51..28 set" if not d["reserved_ok"] else
                       f"unknown coprocessor / register ({d['name']})")
                yield Finding("arm64-reg-bad-id", ERROR, f"{loc}.id", f"0x{rid:016x}: {why}")
            elif (rid & a.KVM_REG_SIZE_MASK) not in a.ALLOWED_SIZES:
                yield Finding("arm64-reg-size-unsupported", ERROR, f"{loc}.id",
                              f"{d['name']} (0x{rid:016x}): KVM_REG_SIZE {d['size']} bytes; "
                              f"a record holds U32, U64 or U128 values only")
            elif d["expected_size"] is not None and d["size"] != d["expected_size"]:
                yield Finding("arm64-reg-size-mismatch", ERROR, f"{loc}.id",
                              f"{d['name']} is {d['expected_size']} bytes, id says "
                              f"KVM_REG_SIZE {d['size']}")
            v = a.reg_value(r)
            if d["size"] < a.VALUE_SLOT and v >> (8 * d["size"]):
                yield Finding("arm64-reg-value-exceeds-size", ERROR, f"{loc}.value_hi"
                              if d["size"] == 8 else f"{loc}.value_lo",
                              f"{d['name']} is {d['size']} bytes but the value "
                              f"0x{v:x} has bits above bit {8 * d['size'] - 1}")
            if rid == a.REG_PSTATE:
                yield from _check_pstate(loc, v, init)
        if a.REG_PC not in ids:
            yield Finding("arm64-regs-missing-pc", ERROR, sec.label,
                          "no PC (id 0x6030000000100040, KVM_REG_ARM_CORE_REG(regs.pc))")
        if a.REG_MPIDR_EL1 not in ids:
            yield Finding("arm64-regs-missing-mpidr", WARNING, sec.label,
                          "no MPIDR_EL1 (id 0x603000000013c005): GIC redistributors cannot be "
                          "matched to this vCPU")


def _check_pstate(loc: str, v: int, init: dict | None):
    mode = v & 0x1F
    if mode & 0x10:       # AArch32 (nRW): only with KVM_ARM_VCPU_EL1_32BIT
        if init is None or not init["features"][0] >> 1 & 1:
            yield Finding("arm64-pstate-mode", ERROR, f"{loc}.value_lo",
                          f"PSTATE 0x{v:x}: AArch32 mode 0x{mode:x} without "
                          f"KVM_ARM_VCPU_EL1_32BIT")
        return
    if mode not in a.PSR_MODES:
        yield Finding("arm64-pstate-mode", ERROR, f"{loc}.value_lo",
                      f"PSTATE 0x{v:x}: M[3:0] 0x{mode:x} is not EL0t/EL1t/EL1h/EL2t/EL2h")
    elif mode in (0x8, 0x9) and (init is None or not init["features"][0] >> 7 & 1):
        yield Finding("arm64-pstate-mode", ERROR, f"{loc}.value_lo",
                      f"PSTATE 0x{v:x}: {a.PSR_MODES[mode]} without KVM_ARM_VCPU_HAS_EL2")


# ------------------------------------------------------------------ HVF vCPU

@check("arm64-hvf-vcpu", arch=ARCH)
def check_hvf_vcpu(snap):
    for sec, f in _per_vcpu(snap, "arm64.hvf_vcpu"):
        if f["flags"] & ~a.HVF_F_KNOWN:
            yield Finding("arm64-hvf-flags", ERROR, f"{sec.label}.flags",
                          f"unknown flags 0x{f['flags'] & ~a.HVF_F_KNOWN:x}")
        for field, names, what in (("gprs", a.HV_REG_NAMES, "hv_reg_t"),
                                   ("sys_regs", None, "hv_sys_reg_t"),
                                   ("simd", a.HV_SIMD_FP_REG_NAMES, "hv_simd_fp_reg_t")):
            counts = Counter(r["id"] for r in f[field])
            reported = set()
            for i, r in enumerate(f[field]):
                loc = f"{sec.label}.{field}[{i}]"
                if any(r[k] for k in r if k.startswith("reserved")):
                    yield Finding("arm64-hvf-reserved", ERROR, loc, "reserved field not 0")
                if names is not None and r["id"] not in names:
                    yield Finding("arm64-hvf-unknown-reg", ERROR, f"{loc}.id",
                                  f"{what} {r['id']} is not a documented value")
                if counts[r["id"]] > 1 and r["id"] not in reported:
                    reported.add(r["id"])
                    yield Finding("arm64-hvf-duplicate-id", ERROR, f"{loc}.id",
                                  f"{what} 0x{r['id']:x} listed {counts[r['id']]} times")
        if not any(r["id"] == a.HV_REG_PC for r in f["gprs"]):
            yield Finding("arm64-hvf-missing-pc", ERROR, sec.label, "no HV_REG_PC")


# ------------------------------------------------------------------ GIC

@check("arm64-gic", arch=ARCH)
def check_gic(snap):
    present = [s for n in _GIC_KINDS for s in snap.all(n)]
    if len(present) > 1:
        yield Finding("arm64-gic-multiple", ERROR, ", ".join(s.label for s in present),
                      "more than one interrupt controller state section")
    sec = snap.find("arm64.gicv3")
    f = _fields(sec)
    if f is not None:
        yield from _check_gicv3(snap, sec, f)
    sec = snap.find("arm64.gicv2")
    f = _fields(sec)
    if f is not None:
        yield from _check_gicv2(snap, sec, f)
    sec = snap.find("arm64.gic_blob")
    f = _fields(sec)
    if f is not None:
        yield from _check_gic_blob(snap, sec, f)


def _typer_limit(records, dist_group: int) -> int | None:
    """32 * (GICD_TYPER.ITLinesNumber + 1) from the GICD_TYPER record, capped at 1020."""
    for r in records:
        if r["group"] == dist_group and r.get("attr", r.get("offset")) == 0x4:
            return min(32 * ((r["value"] & 0x1F) + 1), 1020)
    return None


def _check_offset(loc: str, regs: list, frame: str, off: int, whole64: bool):
    """Alignment and register-map membership of one MMIO offset."""
    hit = a.gic_lookup(regs, off)
    if off % 4:
        yield Finding("arm64-gic-bad-offset", ERROR, f"{loc}.attr",
                      f"{frame} offset 0x{off:x} not 4-byte aligned")
        return None
    if hit is None:
        yield Finding("arm64-gic-bad-offset", ERROR, f"{loc}.attr",
                      f"{frame} offset 0x{off:x} is not a register KVM saves")
        return None
    reg, _, within = hit
    if whole64 and reg.width == 8 and within:
        yield Finding("arm64-gic-bad-offset", ERROR, f"{loc}.attr",
                      f"{frame} offset 0x{off:x}: 64-bit {reg.name} is accessed whole at "
                      f"0x{off - within:x} (arm-vgic-its.rst)")
        return None
    return hit


def _irq_checks(loc: str, name: str, rng, limit, private_ok: bool):
    first, last = rng
    if not private_ok and first < 32:
        yield Finding("arm64-gic-dist-private-irq", ERROR, loc,
                      f"{name} covers INTIDs {first}..{last}: SGIs/PPIs live in the "
                      f"redistributor (GICR_*0) with affinity routing")
    elif limit is not None and first >= limit:
        yield Finding("arm64-gic-irq-out-of-range", ERROR, loc,
                      f"{name} covers INTIDs {first}..{last}, GICD_TYPER.ITLinesNumber allows "
                      f"0..{limit - 1}")


def _check_gicv3(snap, sec, f):
    label = sec.label
    if f["reserved"]:
        yield Finding("arm64-gic-reserved", ERROR, f"{label}.reserved", "must be 0")
    recs = f["regs"]
    limit = _typer_limit(recs, a.KVM_DEV_ARM_VGIC_GRP_DIST_REGS)
    if limit is None:
        yield Finding("arm64-gic-typer-missing", WARNING, label,
                      "no GICD_TYPER record (DIST_REGS offset 0x4): IRQ ranges not checked")
    mpidrs = vcpu_mpidrs(snap)
    known = {a.vgic_mpidr(m): i for i, m in mpidrs.items()}
    keys = Counter((r["group"], r["mpidr"], r["attr"]) for r in recs)
    dup_reported = set()
    redist_of: dict[int, int] = defaultdict(int)
    icc_of: dict[int, int] = defaultdict(int)
    unknown_reported = set()
    for i, r in enumerate(recs):
        g, m, attr, v = r["group"], r["mpidr"], r["attr"], r["value"]
        loc = f"{label}.regs[{i}]"
        name = a.gic_attr_name(r)
        if r["reserved"]:
            yield Finding("arm64-gic-reserved", ERROR, f"{loc}.reserved", "must be 0")
        if g not in a.GICV3_GROUP_WIDTH:
            yield Finding("arm64-gic-bad-group", ERROR, f"{loc}.group",
                          f"group {g} ({a.VGIC_GROUP_NAMES.get(g, 'unknown')}) is not saved "
                          f"GICv3 state")
            continue
        key = (g, m, attr)
        if keys[key] > 1 and key not in dup_reported:
            dup_reported.add(key)
            yield Finding("arm64-gic-duplicate-attr", ERROR, loc,
                          f"{name} (mpidr 0x{m:x}) listed {keys[key]} times")
        if a.GICV3_GROUP_WIDTH[g] == 4 and v > _U32:
            yield Finding("arm64-gic-value-too-wide", ERROR, f"{loc}.value",
                          f"{name}: value 0x{v:x} wider than the 32-bit access of "
                          f"{a.VGIC_GROUP_NAMES[g]}")
        per_vcpu = g in (a.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, a.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
                         a.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO)
        if not per_vcpu and m:
            yield Finding("arm64-gic-mpidr-unexpected", WARNING, f"{loc}.mpidr",
                          f"{a.VGIC_GROUP_NAMES[g]} ignores mpidr; 0x{m:x} given")
        if per_vcpu and known and m not in known and (g, m) not in unknown_reported:
            unknown_reported.add((g, m))
            yield Finding("arm64-gic-unknown-mpidr", ERROR, f"{loc}.mpidr",
                          f"{a.VGIC_GROUP_NAMES[g]} record for affinity 0x{m:08x}, which no "
                          f"vCPU's MPIDR_EL1 has")
        if g == a.KVM_DEV_ARM_VGIC_GRP_DIST_REGS:
            hit = yield from _check_offset(loc, a.GICD_REGS, "GICD", attr, False)
            if hit is not None and hit[0].bits_per_irq:
                yield from _irq_checks(loc, name, a.gic_irq_range(a.GICD_REGS, attr), limit,
                                       False)
        elif g == a.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS:
            redist_of[m] += 1
            yield from _check_offset(loc, a.GICR_REGS, "GICR", attr, False)
            if attr == 0xC and v != m:
                yield Finding("arm64-gic-redist-typer-mismatch", ERROR, f"{loc}.value",
                              f"GICR_TYPER.Affinity_Value 0x{v:08x} != record mpidr 0x{m:08x}")
        elif g == a.KVM_DEV_ARM_VGIC_GRP_ITS_REGS:
            yield from _check_offset(loc, a.GITS_REGS, "GITS", attr, True)
        elif g == a.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS:
            icc_of[m] += 1
            if attr >> 16 or a.sysreg_fields(attr) not in a.ICC_KVM_SYSREGS:
                yield Finding("arm64-gic-bad-sysreg", ERROR, f"{loc}.attr",
                              f"0x{attr:x} ({a.sysreg_name(attr & 0xFFFF)}) is not an ICC "
                              f"register KVM saves (arm-vgic-v3.rst CPU_SYSREGS)")
        elif g == a.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO:
            info = attr >> a.KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT
            intid = attr & a.KVM_DEV_ARM_VGIC_LINE_LEVEL_INTID_MASK
            if info != a.VGIC_LEVEL_INFO_LINE_LEVEL or intid % 32:
                yield Finding("arm64-gic-bad-level-info", ERROR, f"{loc}.attr",
                              f"attr 0x{attr:x}: info {info} (only 0, LINE_LEVEL), vINTID "
                              f"{intid} (must be a multiple of 32)")
            elif limit is not None and intid >= limit:
                yield Finding("arm64-gic-irq-out-of-range", ERROR, f"{loc}.attr",
                              f"LINE_LEVEL[{intid}..{intid + 31}] beyond INTID {limit - 1}")
        elif g == a.KVM_DEV_ARM_VGIC_GRP_NR_IRQS:
            if v % 32 or not 64 <= v <= 1024:
                yield Finding("arm64-gic-nr-irqs", ERROR, f"{loc}.value",
                              f"NR_IRQS {v}: must be a multiple of 32 in [64, 1024]")
            elif limit is not None and min(v, 1020) != limit:
                yield Finding("arm64-gic-nr-irqs", ERROR, f"{loc}.value",
                              f"NR_IRQS {v} but GICD_TYPER.ITLinesNumber gives {limit}")
        elif g == a.KVM_DEV_ARM_VGIC_GRP_ADDR:
            kind = a.VGIC_V3_ADDR_TYPES.get(attr)
            if kind is None:
                yield Finding("arm64-gic-bad-addr", ERROR, f"{loc}.attr",
                              f"address type {attr} is not a KVM_VGIC_V3_ADDR_TYPE_*")
            elif kind != "REDIST_REGION" and v % 0x10000:
                yield Finding("arm64-gic-bad-addr", ERROR, f"{loc}.value",
                              f"{kind} base 0x{v:x} not 64 KiB aligned (arm-vgic-v3.rst)")
    for i, m in sorted(mpidrs.items()):
        key = a.vgic_mpidr(m)
        if not redist_of.get(key):
            yield Finding("arm64-gic-redist-missing", ERROR, f"{label}",
                          f"no REDIST_REGS records for vCPU {i} (MPIDR_EL1 0x{m:x}, "
                          f"affinity 0x{key:08x})")
        if not icc_of.get(key):
            yield Finding("arm64-gic-icc-missing", WARNING, f"{label}",
                          f"no CPU_SYSREGS (ICC_*) records for vCPU {i} (affinity 0x{key:08x})")


def _check_gicv2(snap, sec, f):
    label = sec.label
    if f["reserved"]:
        yield Finding("arm64-gic-reserved", ERROR, f"{label}.reserved", "must be 0")
    for field in ("dist_base", "cpu_base"):
        if f[field] % 0x1000:
            yield Finding("arm64-gic-bad-addr", ERROR, f"{label}.{field}",
                          f"0x{f[field]:x} not 4 KiB aligned (arm-vgic.rst)")
    recs = f["regs"]
    limit = _typer_limit(recs, a.KVM_DEV_ARM_VGIC_GRP_DIST_REGS)
    if limit is None:
        yield Finding("arm64-gic-typer-missing", WARNING, label,
                      "no GICD_TYPER record (DIST_REGS offset 0x4): IRQ ranges not checked")
    vcpus = set(vcpu_indices(snap))
    keys = Counter((r["group"], r["cpuid"], r["offset"]) for r in recs)
    dup_reported = set()
    for i, r in enumerate(recs):
        g, cpu, off = r["group"], r["cpuid"], r["offset"]
        loc = f"{label}.regs[{i}]"
        if g not in a.GICV2_GROUPS:
            yield Finding("arm64-gic-bad-group", ERROR, f"{loc}.group",
                          f"group {g} ({a.VGIC_GROUP_NAMES.get(g, 'unknown')}) is not saved "
                          f"GICv2 state")
            continue
        if keys[(g, cpu, off)] > 1 and (g, cpu, off) not in dup_reported:
            dup_reported.add((g, cpu, off))
            yield Finding("arm64-gic-duplicate-attr", ERROR, loc,
                          f"group {g} cpuid {cpu} offset 0x{off:x} listed "
                          f"{keys[(g, cpu, off)]} times")
        if cpu >= 8 or (vcpus and cpu not in vcpus):
            yield Finding("arm64-gicv2-bad-cpuid", ERROR, f"{loc}.cpuid",
                          f"cpuid {cpu} is not a vCPU index (GICv2 supports 8 CPUs)")
        regs = {1: (a.GICV2_DIST_REGS, "GICD"), 2: (a.GICV2_CPU_REGS, "GICC")}.get(g)
        if regs is None:          # NR_IRQS
            if r["value"] % 32 or not 64 <= r["value"] <= 1024:
                yield Finding("arm64-gic-nr-irqs", ERROR, f"{loc}.value",
                              f"NR_IRQS {r['value']}: must be a multiple of 32 in [64, 1024]")
            continue
        hit = yield from _check_offset(loc, regs[0], regs[1], off, False)
        if hit is not None and hit[0].bits_per_irq and g == 1:
            # GICv2 banks INTIDs 0..31 per CPU in the distributor: private IRQs are legal
            yield from _irq_checks(loc, a.gic_reg_name(regs[0], off),
                                   a.gic_irq_range(regs[0], off), limit, True)


def _check_gic_blob(snap, sec, f):
    label = sec.label
    if f["blob_len"] == 0:
        yield Finding("arm64-gic-blob-empty", ERROR, f"{label}.blob_len",
                      "no hv_gic_state_get_data bytes")
    vcpus = set(vcpu_indices(snap))
    keys = Counter((r["vcpu"], r["reg"]) for r in f["icc"])
    dup_reported = set()
    for i, r in enumerate(f["icc"]):
        loc = f"{label}.icc[{i}]"
        if r["reserved"]:
            yield Finding("arm64-gic-reserved", ERROR, f"{loc}.reserved", "must be 0")
        if r["reg"] not in a.HV_GIC_ICC_ENCODINGS:
            yield Finding("arm64-gic-bad-sysreg", ERROR, f"{loc}.reg",
                          f"0x{r['reg']:x} ({a.sysreg_name(r['reg'])}) is not a "
                          f"hv_gic_icc_reg_t value")
        if vcpus and r["vcpu"] not in vcpus:
            yield Finding("arm64-gic-icc-unknown-vcpu", ERROR, f"{loc}.vcpu",
                          f"vCPU {r['vcpu']} has no vCPU sections")
        k = (r["vcpu"], r["reg"])
        if keys[k] > 1 and k not in dup_reported:
            dup_reported.add(k)
            yield Finding("arm64-gic-duplicate-attr", ERROR, loc,
                          f"vCPU {k[0]} {a.sysreg_name(k[1])} listed {keys[k]} times")
