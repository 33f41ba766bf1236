"""`snapfmt diff A B`: field-level, semantic comparison of two snapshots.

Every section is compared through a *view*: an ordered mapping from a dotted
path (``x86.sregs[0].cr0``, ``x86.msrs[1].IA32_LSTAR``,
``x86.ioapic.redirtbl[4].mask``, ``virtiofs.inode_map[0].entries["etc/passwd"].ino``)
to a value that knows how to describe a change (bit names for CR0/CR4/EFER/
RFLAGS, vector sets for LAPIC ISR/IRR, MSRs by name, inode-map entries by
path).  Bytes a view does not name (padding, reserved, unknown sections) are
still compared: a difference there is reported as a raw byte range, so two
snapshots are "same" only when every compared byte is.

Guest RAM is compared page by page (:mod:`snapfmt.ramdiff`); diff layers are
resolved through their parent chain, and a layer compared with its own parent
only reads its dirty pages.

Library: :func:`diff_snapshots` returns a :class:`DiffResult`
(``.same``, ``.as_dict()``, ``.render()``).  CLI exit codes follow diff(1):
0 same, 1 different, 2 trouble.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from . import registry
from .container import Snapshot, load
from .errors import FormatError
from .ramdiff import (Progress, RamDiff, RegionDiff, compare_sources, write_png)

# ----------------------------------------------------------------- volatile set

#: Fields that change on every snapshot of the same VM (clocks, counters).
VOLATILE = (
    "metadata.created_unix_ns",
    "x86.msrs.IA32_TSC", "x86.msrs.IA32_TSC_DEADLINE", "x86.msrs.IA32_MPERF",
    "x86.msrs.IA32_APERF", "x86.msrs.IA32_PMC*", "x86.msrs.IA32_FIXED_CTR?",
    "x86.msrs.IA32_PERF_GLOBAL_STATUS", "x86.msrs.HV_X64_TIME_REF_COUNT",
    "x86.msrs.SMI_COUNT", "x86.msrs.KVM_STEAL_TIME",
    "x86.clock.clock", "x86.clock.realtime", "x86.clock.host_tsc",
    "x86.lapic.timer_current_count",
    "x86.pit2.channels[*].count_load_time", "x86.pit2.channels[*].latched_count",
    "x86.pit2.channels[*].count_latched", "x86.pit2.channels[*].status_latched",
    "arm64.*.*CNTVCT*", "arm64.*.*TIMER_CNT*", "arm64.*.*CNTPCT*",
)


# ----------------------------------------------------------------- path globs

def _glob_re(pattern: str) -> re.Pattern:
    """'*' any run of characters, '?' one; everything else literal (dots, brackets).

    A pattern also matches everything below the path it names
    (``x86.xsave`` matches ``x86.xsave[0].xmm[3]``).
    """
    out = []
    for ch in pattern:
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return re.compile("".join(out) + r"(?:[.\[].*)?\Z", re.S)


class Ignore:
    """A set of --ignore globs; a path matches with or without its section instance."""

    def __init__(self, patterns: Iterable[str] = ()):
        self.patterns = [p.strip() for p in patterns if p and p.strip()]
        self._res = [_glob_re(p) for p in self.patterns]

    def __bool__(self) -> bool:
        return bool(self._res)

    def match(self, section: str, instance_tag: str, rest: str) -> bool:
        if not self._res:
            return False
        full = f"{section}{instance_tag}{rest}"
        bare = f"{section}{rest}"
        return any(r.match(full) or r.match(bare) for r in self._res)


# ----------------------------------------------------------------- view values

@dataclass(frozen=True)
class V:
    """A named value in a view, with how to describe a change of it."""
    value: Any
    kind: str = "num"            # num | hex | str | bool | bits | set | bytes
    bits: dict | None = None     # bit number -> name (kind "bits")

    def json(self):
        if self.kind == "set":
            return sorted(self.value, key=str)
        return self.value

    def show(self) -> str:
        v = self.value
        if v is None:
            return "-"
        if self.kind in ("hex", "bits") and isinstance(v, int):
            return f"0x{v:x}"
        if self.kind == "num" and isinstance(v, int):
            return f"0x{v:x}" if v > 9 else str(v)
        if self.kind == "set":
            return "{" + ", ".join(_fmt_elem(x) for x in sorted(v, key=str)) + "}"
        if self.kind == "bytes":
            return f"<{len(v) // 2} bytes>"
        if isinstance(v, str):
            return json.dumps(v)
        return str(v)


def _fmt_elem(x) -> str:
    return f"0x{x:x}" if isinstance(x, int) and x > 9 else str(x)


def _bit_delta(a: int, b: int, table: dict) -> str:
    from .kvm_x86 import bit_names
    on = bit_names(b & ~a, table)
    off = bit_names(a & ~b, table)
    return " ".join([f"+{n}" for n in on] + [f"-{n}" for n in off])


def _bytes_delta(a: str, b: str) -> str:
    ba, bb = bytes.fromhex(a), bytes.fromhex(b)
    if len(ba) != len(bb):
        return f"length {len(ba)} -> {len(bb)}"
    x = np.frombuffer(ba, np.uint8) != np.frombuffer(bb, np.uint8)
    idx = np.flatnonzero(x)
    return f"{idx.size} byte(s) differ in [0x{int(idx[0]):x}, 0x{int(idx[-1]) + 1:x})"


def describe_change(a: V | None, b: V | None) -> str:
    if a is None:
        return f"added: {b.show()}"
    if b is None:
        return f"removed (was {a.show()})"
    if a.kind == "bytes" and b.kind == "bytes":
        return _bytes_delta(a.value, b.value)
    s = f"{a.show()} -> {b.show()}"
    if a.kind == "bits" and isinstance(a.value, int) and isinstance(b.value, int):
        d = _bit_delta(a.value, b.value, a.bits or {})
        if d:
            s += f"  ({d})"
    elif a.kind == "set" and b.kind == "set":
        plus = sorted(set(b.value) - set(a.value), key=str)
        minus = sorted(set(a.value) - set(b.value), key=str)
        s = " ".join([f"+{_fmt_elem(x)}" for x in plus] + [f"-{_fmt_elem(x)}" for x in minus])
    return s


# ----------------------------------------------------------------- views

_IDENTITY_KEYS = ("id", "nodeid", "handle", "mnt_id", "guest_phys_addr")
_SKIP_KEYS = {"padding", "pad", "pad0", "reserved", "reserved0", "reserved1", "name_pad",
              "config_pad", "tail"}


def _is_hex_blob(s: str) -> bool:
    return len(s) >= 16 and len(s) % 2 == 0 and all(ch in "0123456789abcdef" for ch in s)


def flatten(obj, prefix: str = "", out: dict | None = None, bits: dict | None = None) -> dict:
    """Generic view: nested dicts/lists to dotted paths; keyed lists by identity."""
    if out is None:
        out = {}
    bits = bits or {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _SKIP_KEYS:
                continue
            p = f"{prefix}.{k}" if prefix else str(k)
            if k in bits and isinstance(v, int):
                out[p] = V(v, "bits", bits[k])
            else:
                flatten(v, p, out, bits)
    elif isinstance(obj, list):
        key = _identity_key(obj)
        for i, v in enumerate(obj):
            tag = f"[{_fmt_elem(v[key])}]" if key else f"[{i}]"
            flatten(v, f"{prefix}{tag}", out, bits)
    elif isinstance(obj, bool):
        out[prefix] = V(obj, "bool")
    elif isinstance(obj, int):
        out[prefix] = V(obj, "num")
    elif isinstance(obj, str):
        out[prefix] = V(obj, "bytes" if _is_hex_blob(obj) else "str")
    elif obj is None:
        out[prefix] = V(None, "str")
    else:
        out[prefix] = V(str(obj), "str")
    return out


def _identity_key(lst: list) -> str | None:
    if not lst or not all(isinstance(x, dict) for x in lst):
        return None
    for k in _IDENTITY_KEYS:
        if all(k in x for x in lst):
            vals = [x[k] for x in lst]
            if len(set(map(str, vals))) == len(vals):
                return k
    return None


def _view_regs(f, sec):
    from .kvm_x86 import RFLAGS_BITS
    return flatten(f, bits={"rflags": RFLAGS_BITS})


def _view_sregs(f, sec):
    from .kvm_x86 import APIC_BASE_BITS, CR0_BITS, CR4_BITS, EFER_BITS, bitmap_vectors
    g = dict(f)
    vec = bitmap_vectors(g.pop("interrupt_bitmap"), 64)
    for t in ("gdt", "idt"):
        g[t] = {k: v for k, v in g[t].items() if k != "padding"}
    out = flatten(g, bits={"cr0": CR0_BITS, "cr4": CR4_BITS, "efer": EFER_BITS,
                           "apic_base": APIC_BASE_BITS})
    out["pending_interrupts"] = V(frozenset(vec), "set")
    return out


def _view_msrs(f, sec):
    from .kvm_x86 import APIC_BASE_BITS, EFER_BITS, msr_name
    out = {}
    for e in f["entries"]:
        name = msr_name(e["index"])
        if name in out:
            name = f"{name}#dup"
        tbl = EFER_BITS if e["index"] == 0xC0000080 else \
            APIC_BASE_BITS if e["index"] == 0x1B else None
        out[name] = V(e["data"], "bits", tbl) if tbl else V(e["data"], "hex")
        if e["reserved"]:
            out[f"{name}.reserved"] = V(e["reserved"], "hex")
    return out


def _view_cpuid(f, sec):
    out = {}
    for e in f["entries"]:
        leaf = f"leaf[0x{e['function']:x}.{e['index']}]"
        for r in ("eax", "ebx", "ecx", "edx"):
            out[f"{leaf}.{r}"] = V(e[r], "bits", {})
        out[f"{leaf}.flags"] = V(e["flags"], "hex")
    return out


def _drop_raw(d):
    if isinstance(d, dict):
        return {k: _drop_raw(v) for k, v in d.items() if k not in ("raw", "id_raw")}
    return d


def _view_lapic(f, sec):
    from .kvm_x86 import _annotate_lapic
    ann = _drop_raw(_annotate_lapic(f))
    out = {}
    for k, v in ann.items():
        if isinstance(v, list):
            out[k] = V(frozenset(v), "set")
        else:
            flatten(v, k, out)
    # every register word, so no byte goes unnoticed (named ones are above)
    named = {0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xD0, 0xE0, 0xF0, 0x280, 0x300, 0x310,
             0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x380, 0x390, 0x3E0}
    named |= {base + 0x10 * i for base in (0x100, 0x180, 0x200) for i in range(8)}
    regs = bytes.fromhex(f["regs"])
    words = np.frombuffer(regs, "<u4")
    for off in range(0, len(regs), 4):
        if off not in named:
            out[f"reg[0x{off:03x}]"] = V(int(words[off // 4]), "hex")
    return out


def _view_ioapic(f, sec):
    from .kvm_x86 import ioapic_entry
    io = f["chip"]["ioapic"]
    out = {"chip_id": V(f["chip_id"]), "base_address": V(io["base_address"], "hex"),
           "ioregsel": V(io["ioregsel"], "hex"), "id": V(io["id"] >> 24),
           "irr": V(frozenset(i for i in range(24) if io["irr"] >> i & 1), "set")}
    for i, bits in enumerate(io["redirtbl"]):
        e = ioapic_entry(bits)
        e["delivery_mode"] = e.pop("delivery")
        for k, v in e.items():
            out[f"redirtbl[{i}].{k}"] = V(v, "num" if isinstance(v, int) else "str")
    return out


def _view_pic(f, sec):
    return flatten({"chip_id": f["chip_id"], **f["chip"]["pic"]})


def _view_xsave(f, sec):
    from .kvm_x86 import XFEATURE_BITS, _annotate_xsave, xsave_header
    ann = _annotate_xsave(f)
    out = {}
    for k, v in ann.items():
        if k in ("xstate_components", "size"):
            continue
        if isinstance(v, list):
            for i, x in enumerate(v):
                out[f"{k}[{i}]"] = V(x, "str")
        else:
            out[k] = V(v, "str")
    region = bytes.fromhex(f["region"])
    out["xstate_bv"] = V(xsave_header(region)["xstate_bv"], "bits", XFEATURE_BITS)
    out["size"] = V(ann["size"])
    # the rest of the image (beyond legacy area + header + YMM) as bytes
    out["region[832:]"] = V(region[832:].hex(), "bytes")
    if f.get("extra"):
        out["extra"] = V(f["extra"], "bytes")
    return out


def _view_xcrs(f, sec):
    from .kvm_x86 import XFEATURE_BITS
    out = {"nr_xcrs": V(f["nr_xcrs"])}
    for x in f["xcrs"][:min(f["nr_xcrs"], 16)]:
        out[f"xcr{x['xcr']}"] = V(x["value"], "bits", XFEATURE_BITS if x["xcr"] == 0 else {})
    return out


def _view_vcpu_events(f, sec):
    from .kvm_x86 import VCPU_EVENT_FLAGS
    return flatten(f, bits={"flags": VCPU_EVENT_FLAGS})


def _view_mp_state(f, sec):
    from .kvm_x86 import MP_STATES
    return {"mp_state": V(MP_STATES.get(f["mp_state"], f"unknown({f['mp_state']})"), "str")}


def _view_clock(f, sec):
    from .kvm_x86 import CLOCK_FLAGS
    return flatten(f, bits={"flags": CLOCK_FLAGS})


def _view_virtio(f, sec):
    from .devices import FEATURE_NAMES, STATUS_NAMES, device_name
    g = dict(f)
    out = {"device": V(device_name(g.pop("device_type")), "str")}
    g["queues"] = {str(i): q for i, q in enumerate(g["queues"])}
    g["shm_regions"] = {str(r["id"]): r for r in g["shm_regions"]}
    flatten(g, "", out, bits={"device_features": FEATURE_NAMES,
                              "driver_features": FEATURE_NAMES, "status": STATUS_NAMES,
                              "interrupt_status": {0: "USED_BUFFER", 1: "CONFIG_CHANGE"}})
    return {re.sub(r"^queues\.(\d+)", r"queues[\1]", k): v for k, v in out.items()}


def _view_memory_layout(f, sec):
    out = {}
    for r in f["regions"]:
        tag = f"regions[0x{r['guest_phys_addr']:x}]"
        for k, v in r.items():
            if k == "guest_phys_addr":
                continue
            out[f"{tag}.{k}"] = V(v, "hex" if k in ("memory_size", "file_offset") else
                                  "bytes" if k == "sha256" else "num")
    out["strings"] = V(f["strings"], "bytes")
    return out


def _view_metadata(f, sec):
    return flatten(f)


def _view_parent_ref(f, sec):
    out = {}
    for k in ("digest_alg", "page_size", "parent_file_size", "parent_digest", "parent_name"):
        v = f[k]
        out[k] = V(v if not isinstance(v, dict) else v.get("hex"), "str" if isinstance(
            v, (str, dict)) else "num")
    for b in f["blobs"]:
        out[f"blobs[{b['instance']}].npages"] = V(b["npages"])
        out[f"blobs[{b['instance']}].ndirty"] = V(b["ndirty"])
        out[f"blobs[{b['instance']}].bitmap"] = V(b["bitmap"], "bytes")
    return out


def _view_inode_map(f, sec):
    from . import inode_map as IM
    a = IM.parse_arrays(sec.data)
    out = {}
    for k in ("flags", "next_inode", "next_handle", "root_dev", "root_ino", "root_mnt_id"):
        out[k] = V(a.header[k], "bits", IM.FLAG_NAMES) if k == "flags" else V(a.header[k])
    paths = IM.entry_paths(a)
    e = a.entries
    cols = {k: e[k].tolist() for k in ("nodeid", "ino", "dev", "mnt_id", "generation",
                                       "refcount", "file_type")}
    for i, p in enumerate(paths):
        key = "/" + IM.show_name(p) if p is not None else \
            f"<unreachable nodeid {cols['nodeid'][i]}>"
        tag = f"entries[{json.dumps(key, ensure_ascii=False)}]"
        if f"{tag}.nodeid" in out:
            tag = f"entries[{json.dumps(key, ensure_ascii=False)}#{cols['nodeid'][i]}]"
        for k, col in cols.items():
            out[f"{tag}.{k}"] = V(col[i], "hex" if k == "file_type" else "num")
    for h in a.handles:
        out[f"handles[{int(h['handle'])}].nodeid"] = V(int(h["nodeid"]))
        out[f"handles[{int(h['handle'])}].open_flags"] = V(int(h["open_flags"]), "hex")
    for i in range(len(a.mounts)):
        out[f"mounts[{int(a.mounts[i]['mnt_id'])}].path"] = V(IM.show_name(a.mount_path(i)),
                                                             "str")
    return out


def _view_arm64_regs(f, sec):
    from .arm64 import reg_name, reg_value
    out = {}
    for r in f["regs"]:
        name = reg_name(r["id"])
        if name in out:
            name = f"{name}#0x{r['id']:x}"
        out[name] = V(reg_value(r), "hex")
    return out


def _view_arm64_gic(f, sec):
    from . import arm64 as A
    per_cpu = {getattr(A, "KVM_DEV_ARM_VGIC_GRP_REDIST_REGS", -1),
               getattr(A, "KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS", -1)}
    out = {}
    for r in f["regs"]:
        name = A.gic_attr_name(r)
        if r["group"] in per_cpu:
            name = f"cpu[0x{r['mpidr']:x}].{name}"
        if name in out:
            name = f"{name}#{r['group']}:0x{r['attr']:x}"
        out[name] = V(r["value"], "hex")
    rest = {k: v for k, v in f.items() if k not in ("regs", "count", "reserved")}
    flatten(rest, "", out)
    return out


VIEWS = {
    "arm64.regs": _view_arm64_regs, "arm64.gicv3": _view_arm64_gic,
    "arm64.gicv2": _view_arm64_gic,
    "x86.regs": _view_regs, "x86.sregs": _view_sregs, "x86.msrs": _view_msrs,
    "x86.cpuid2": _view_cpuid, "x86.lapic": _view_lapic, "x86.ioapic": _view_ioapic,
    "x86.pic": _view_pic, "x86.xsave": _view_xsave, "x86.xcrs": _view_xcrs,
    "x86.vcpu_events": _view_vcpu_events, "x86.mp_state": _view_mp_state,
    "x86.clock": _view_clock, "virtio.mmio": _view_virtio, "memory_layout": _view_memory_layout,
    "metadata": _view_metadata, "parent_ref": _view_parent_ref,
    "virtiofs.inode_map": _view_inode_map,
}


def section_view(sec) -> dict:
    """The view of one section (path suffix -> V).  Raises FormatError on bad bytes."""
    kind = sec.kind
    if kind is None or sec.version > kind.version:
        return {"(raw)": V(bytes(sec.data).hex(), "bytes")}
    fn = VIEWS.get(kind.name)
    f = sec.fields
    return fn(f, sec) if fn is not None else flatten(f)


# ----------------------------------------------------------------- results

@dataclass
class FieldChange:
    path: str                    # full dotted path, e.g. "x86.regs[0].rip"
    a: Any                       # JSON value in A (None when added)
    b: Any                       # JSON value in B (None when removed)
    text: str                    # human description ("0x202 -> 0x246  (+ZF)")
    ignored: bool = False

    def as_dict(self) -> dict:
        return {"path": self.path, "a": self.a, "b": self.b, "change": self.text}


@dataclass
class SectionDiff:
    name: str
    instance: int
    label: str
    status: str                  # same | changed | added | removed
    changes: list[FieldChange] = field(default_factory=list)
    ignored: int = 0             # changes matched by --ignore / --ignore-volatile
    note: str = ""

    def as_dict(self) -> dict:
        return {"section": self.name, "instance": self.instance, "label": self.label,
                "status": self.status, "changes": [c.as_dict() for c in self.changes],
                "ignored": self.ignored, "note": self.note}


@dataclass
class DiffResult:
    a: str
    b: str
    header: list[FieldChange]
    sections: list[SectionDiff]
    ram: RamDiff | None
    ram_ignored: bool = False
    ram_categories: np.ndarray | None = field(default=None, repr=False)

    @property
    def same(self) -> bool:
        return (not self.header and all(s.status == "same" for s in self.sections)
                and (self.ram is None or self.ram.same))

    def as_dict(self, max_ranges: int | None = 1000) -> dict:
        return {"a": self.a, "b": self.b, "same": self.same,
                "header": [c.as_dict() for c in self.header],
                "summary": {"sections_compared": len(self.sections),
                            "sections_changed": sum(s.status == "changed" for s in self.sections),
                            "sections_added": sum(s.status == "added" for s in self.sections),
                            "sections_removed": sum(s.status == "removed" for s in self.sections),
                            "ram_pages_changed": self.ram.total("changed") if self.ram else None},
                "sections": [s.as_dict() for s in self.sections if s.status != "same"],
                "ram": None if self.ram is None else self.ram.as_dict(max_ranges),
                "ram_ignored": self.ram_ignored}

    def render(self, color: bool = False, max_ranges: int = 20) -> str:
        return _render(self, color, max_ranges)


# ----------------------------------------------------------------- comparison

def _instance_tags(a: Snapshot, b: Snapshot) -> dict:
    """(type_id, instance) -> "[n]" or "" (global/VM singletons)."""
    counts: dict[int, set] = {}
    for s in list(a.sections) + list(b.sections):
        counts.setdefault(s.type_id, set()).add(s.instance)
    tags = {}
    for s in list(a.sections) + list(b.sections):
        k = s.kind
        single = k is not None and k.scope in (registry.SCOPE_GLOBAL, registry.SCOPE_VM) \
            and counts[s.type_id] == {0}
        tags[(s.type_id, s.instance)] = "" if single else f"[{s.instance}]"
    return tags


def _compare_views(name, tag, va: dict, vb: dict, ignore: Ignore) -> tuple[list, int]:
    changes, ignored = [], 0
    keys = list(va) + [k for k in vb if k not in va]
    for k in keys:
        a, b = va.get(k), vb.get(k)
        if a is not None and b is not None and a.value == b.value:
            continue
        rest = k if k.startswith("[") else f".{k}"
        path = f"{name}{tag}{rest}"
        if ignore.match(name, tag, rest):
            ignored += 1
            continue
        changes.append(FieldChange(path, a.json() if a else None, b.json() if b else None,
                                   describe_change(a, b)))
    return changes, ignored


def _compare_section(sa, sb, tag: str, ignore: Ignore) -> SectionDiff:
    name = (sa or sb).name
    inst = (sa or sb).instance
    label = (sa or sb).label
    if sa is None or sb is None:
        st = "added" if sa is None else "removed"
        if ignore.match(name, tag, ""):
            return SectionDiff(name, inst, label, "same", ignored=1, note=f"{st} (ignored)")
        return SectionDiff(name, inst, label, st)
    meta = []
    for attr in ("version", "flags"):
        x, y = getattr(sa, attr), getattr(sb, attr)
        if x != y:
            meta.append(FieldChange(f"{name}{tag}.<{attr}>", x, y, f"{x} -> {y}"))
    if not meta and sa.length == sb.length and sa.crc32c == sb.crc32c and \
            bytes(sa.data) == bytes(sb.data):
        return SectionDiff(name, inst, label, "same")
    try:
        va, vb = section_view(sa), section_view(sb)
    except FormatError as e:
        va = {"(raw)": V(bytes(sa.data).hex(), "bytes")}
        vb = {"(raw)": V(bytes(sb.data).hex(), "bytes")}
        note = f"cannot decode ({e.message}); compared as bytes"
    else:
        note = ""
    changes, ignored = _compare_views(name, tag, va, vb, ignore)
    if not changes and not ignored and bytes(sa.data) != bytes(sb.data):
        # bytes differ only outside the named fields (padding, reserved)
        rest = ".(unnamed bytes)"
        if ignore.match(name, tag, rest):
            ignored += 1
        else:
            changes.append(FieldChange(f"{name}{tag}{rest}", None, None, _bytes_delta(
                bytes(sa.data).hex(), bytes(sb.data).hex())))
    changes = meta + changes
    return SectionDiff(name, inst, label, "changed" if changes else "same", changes, ignored,
                       note)


def _header_changes(a: Snapshot, b: Snapshot, ignore: Ignore) -> list[FieldChange]:
    from .jsonio import header_flag_names
    out = []
    pairs = {"version": (f"{a.version[0]}.{a.version[1]}", f"{b.version[0]}.{b.version[1]}"),
             "compat_version": (f"{a.compat_version[0]}.{a.compat_version[1]}",
                                f"{b.compat_version[0]}.{b.compat_version[1]}"),
             "arch": (a.arch, b.arch), "page_size": (a.page_size, b.page_size),
             "flags": (a.flags, b.flags)}
    for k, (x, y) in pairs.items():
        if x != y and not ignore.match("header", "", f".{k}"):
            if k == "flags":
                fa, fb = set(header_flag_names(x)), set(header_flag_names(y))
                txt = f"0x{x:x} -> 0x{y:x}  (" + " ".join(
                    [f"+{n}" for n in sorted(fb - fa)] + [f"-{n}" for n in sorted(fa - fb)]) + ")"
            else:
                txt = f"{x} -> {y}"
            out.append(FieldChange(f"header.{k}", x, y, txt))
    return out


def _regions(snap: Snapshot) -> list[dict]:
    from .sections_core import MEM_BACKING_SECTION
    try:
        return [r for r in snap.memory_regions() if r["backing"] == MEM_BACKING_SECTION]
    except FormatError:
        return []


def diff_ram(a: Snapshot, b: Snapshot, *, parents=None, progress: bool | None = None,
             keep_categories: bool = False, chunk_bytes: int | None = None
             ) -> tuple[RamDiff, np.ndarray | None]:
    """Page-level diff of the guest RAM of ``a`` and ``b``, region by region (by GPA)."""
    import time
    from . import layers
    from .ramdiff import DEFAULT_CHUNK_BYTES
    if a.page_size != b.page_size:
        raise FormatError(f"page sizes differ ({a.page_size} vs {b.page_size}): RAM cannot be "
                          f"compared page by page", section="header", field="page_size",
                          code="bad-value")
    ps = a.page_size
    opened: list = []
    cand = list(parents or [])
    if b.path:
        cand.append(b.path)
    if a.path:
        cand.append(a.path)
    known = {}
    src_a = layers.ram_sources(a, cand, _opened=opened)
    if a.path:
        known[os.path.realpath(a.path)] = src_a
    src_b = layers.ram_sources(b, cand, known=known, _opened=opened)
    if b.path and not layers.is_layer(b) and layers.is_layer(a):
        # a layer on the left over the file on the right: resolve A again sharing B's sources
        src_a = layers.ram_sources(a, cand, known={os.path.realpath(b.path): src_b},
                                   _opened=opened)
    ra = {r["guest_phys_addr"]: r for r in _regions(a)}
    rb = {r["guest_phys_addr"]: r for r in _regions(b)}
    total = 0
    for gpa in set(ra) | set(rb):
        total += max(ra[gpa]["memory_size"] if gpa in ra else 0,
                     rb[gpa]["memory_size"] if gpa in rb else 0)
    prog = Progress(2 * total, enabled=progress)
    t0 = time.perf_counter()
    regions: list[RegionDiff] = []
    cats = []
    try:
        for gpa in sorted(set(ra) | set(rb)):
            sa = src_a.get(ra[gpa]["section_instance"]) if gpa in ra else None
            sb = src_b.get(rb[gpa]["section_instance"]) if gpa in rb else None
            rd = compare_sources(sa, sb, gpa, ps, progress=prog,
                                 chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
                                 keep_categories=keep_categories)
            regions.append(rd)
            if keep_categories:
                cats.append(rd.categories)
                rd.categories = None
    finally:
        prog.close()
    rdiff = RamDiff(ps, regions, bytes_compared=prog.done, seconds=time.perf_counter() - t0)
    rdiff._keepalive = opened
    allcats = None
    if keep_categories:
        allcats = np.concatenate(cats) if cats else np.zeros(0, np.uint8)
    return rdiff, allcats


def diff_snapshots(a: Snapshot, b: Snapshot, *, ignore: Iterable[str] = (),
                   ignore_volatile: bool = False, ram: bool = True, sections: bool = True,
                   parents=None, progress: bool | None = False,
                   keep_ram_map: bool = False) -> DiffResult:
    """Compare two loaded snapshots.

    ``ignore``: globs on dotted paths (``x86.msrs.IA32_TSC``, ``x86.clock``,
    ``x86.regs[1].*``); ``ignore_volatile`` adds :data:`VOLATILE`.
    ``ram=False`` skips guest RAM, ``sections=False`` compares RAM only.
    ``parents``: candidate parent files for diff layers (the name hint and the
    other operand are tried too).
    """
    pats = list(ignore) + (list(VOLATILE) if ignore_volatile else [])
    ig = Ignore(pats)
    header = _header_changes(a, b, ig) if sections else []
    secs: list[SectionDiff] = []
    if sections:
        tags = _instance_tags(a, b)
        keys = []
        seen = set()
        for s in list(a.sections) + list(b.sections):
            k = (s.type_id, s.instance)
            if k not in seen and s.type_id != _RAM_ID:
                seen.add(k)
                keys.append(k)
        for k in keys:
            sa, sb = a.find(k[0], k[1]), b.find(k[0], k[1])
            secs.append(_compare_section(sa, sb, tags[k], ig))
    rd, cats = None, None
    ram_ignored = ig.match("ram", "", "")
    if ram and not ram_ignored:
        rd, cats = diff_ram(a, b, parents=parents, progress=progress,
                            keep_categories=keep_ram_map)
    return DiffResult(a.path or "<a>", b.path or "<b>", header, secs, rd, ram_ignored, cats)


_RAM_ID = 0x0003


def diff_files(path_a, path_b, **kw) -> DiffResult:
    a = load(path_a)
    b = load(path_b)
    return diff_snapshots(a, b, **kw)


# ----------------------------------------------------------------- rendering

class _C:
    def __init__(self, on: bool):
        self.on = on

    def __call__(self, code: str, s: str) -> str:
        return f"\x1b[{code}m{s}\x1b[0m" if self.on else s


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _human(n: int) -> str:
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(n)


def _render(r: DiffResult, color: bool, max_ranges: int) -> str:
    c = _C(color)
    lines = [c("1", f"--- {r.a}"), c("1", f"+++ {r.b}"), ""]
    changed = [s for s in r.sections if s.status != "same"]
    ignored = sum(s.ignored for s in r.sections)
    lines.append(c("1", "Summary"))
    if r.header:
        lines.append(f"  {'header':<28} {c('33', 'changed'):<10} {len(r.header)} field(s)")
    for s in changed:
        st = {"changed": c("33", "changed"), "added": c("32", "added"),
              "removed": c("31", "removed")}[s.status]
        extra = f"{len(s.changes)} field(s)" if s.status == "changed" else ""
        if s.ignored:
            extra += f" (+{s.ignored} ignored)"
        lines.append(f"  {s.label:<28} {st:<10} {extra}".rstrip())
    nsame = len(r.sections) - len(changed)
    lines.append(f"  {nsame} section(s) identical" + (f", {ignored} change(s) ignored"
                                                      if ignored else ""))
    if r.ram is not None:
        ram = r.ram
        zero = ram.total("zero") if all(x.zero is not None for x in ram.regions) else None
        s = (f"  {'guest RAM':<28} {c('33', 'changed') if not ram.same else 'same':<10} "
             f"{ram.total('changed')} of {ram.pages} pages changed "
             f"({_human(ram.total('changed') * ram.page_size)}); "
             f"{_pct(ram.shared_fraction)} still shared")
        lines.append(s)
        if zero is not None:
            lines.append(f"  {'':<28} {'':<10} {zero} zero page(s) in both; "
                         f"{ram.total('zeroed')} zeroed, {ram.total('filled')} filled")
        if ram.total("only_a") or ram.total("only_b"):
            lines.append(f"  {'':<28} {'':<10} {ram.total('only_a')} page(s) only in A, "
                         f"{ram.total('only_b')} only in B")
    elif r.ram_ignored:
        lines.append(f"  {'guest RAM':<28} ignored")
    if r.header or any(s.changes for s in changed) or (r.ram and not r.ram.same):
        lines += ["", c("1", "Details")]
    if r.header:
        lines.append("header:")
        for ch in r.header:
            lines.append(f"  {ch.path[len('header.'):]}: {ch.text}")
    for s in changed:
        if s.status in ("added", "removed"):
            lines.append(c("32" if s.status == "added" else "31",
                           f"{s.label}: {s.status} in B" if s.status == "added"
                           else f"{s.label}: only in A"))
            continue
        lines.append(f"{s.label}:" + (f"  [{s.note}]" if s.note else ""))
        prefix_len = len(s.name)
        for ch in s.changes:
            p = ch.path[prefix_len:]
            p = re.sub(r"^\[\d+\]", "", p).lstrip(".")
            lines.append(f"  {p}: {_color_change(c, ch.text)}")
    if r.ram is not None and not r.ram.same:
        lines.append("guest RAM:")
        for rg in r.ram.regions:
            if not rg.changed and not rg.only_a and not rg.only_b:
                continue
            where = f"[0x{rg.gpa:x}, 0x{rg.gpa + rg.size:x})"
            zs = "" if rg.zero is None else f", {rg.zero} zero"
            lines.append(f"  region {where}: {rg.changed}/{rg.pages} pages changed "
                         f"({_pct(rg.changed / max(rg.pages, 1))}){zs}"
                         + (f", {rg.only_a} only in A" if rg.only_a else "")
                         + (f", {rg.only_b} only in B" if rg.only_b else "")
                         + (" [bitmap]" if rg.method == "bitmap" else ""))
            for a0, a1 in rg.changed_ranges[:max_ranges]:
                n = (a1 - a0) // r.ram.page_size
                lines.append(f"    0x{a0:012x}-0x{a1:012x}  {n} page(s)")
            more = len(rg.changed_ranges) - max_ranges
            if more > 0:
                lines.append(f"    ... {more} more range(s) (--max-ranges, --json)")
    lines.append("")
    lines.append("same" if r.same else "different")
    return "\n".join(lines) + "\n"


def _color_change(c: _C, text: str) -> str:
    if not c.on:
        return text
    text = re.sub(r"(?<![\w])\+([\w.{}x]+)", lambda m: c("32", "+" + m.group(1)), text)
    return re.sub(r"(?<![\w>])-([A-Za-z_][\w.]*|0x[0-9a-f]+|\d+)",
                  lambda m: c("31", "-" + m.group(1)), text)


# ----------------------------------------------------------------- CLI

def _split_globs(values) -> list[str]:
    out = []
    for v in values or []:
        out += [x for x in v.split(",") if x.strip()]
    return out


def cmd_diff(args) -> int:
    a = load(args.a)
    b = load(args.b)
    res = diff_snapshots(a, b, ignore=_split_globs(args.ignore),
                         ignore_volatile=args.ignore_volatile, ram=not args.no_ram,
                         sections=not args.ram_only, parents=args.parent,
                         progress=None,
                         keep_ram_map=bool(args.ram_map))
    if args.ram_map:
        if res.ram_categories is None:
            raise FormatError("--ram-map needs the RAM comparison (not with --no-ram or an "
                              "ignored RAM)", section="ram", code="inval")
        write_png(args.ram_map, res.ram_categories, args.ram_map_width)
    if args.json:
        mr = 1000 if args.max_ranges is None else args.max_ranges
        sys.stdout.write(json.dumps(res.as_dict(max_ranges=mr), indent=1) + "\n")
    elif not args.quiet:
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty()
                                           and os.environ.get("NO_COLOR") is None)
        sys.stdout.write(res.render(color=color, max_ranges=20 if args.max_ranges is None
                                    else args.max_ranges))
    return 0 if res.same else 1


def register_cli(sub) -> None:
    s = sub.add_parser("diff", help="field-level semantic diff of two snapshots (exit 0 same, "
                                    "1 different, 2 trouble)")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--json", action="store_true")
    s.add_argument("--ignore", action="append", metavar="GLOB[,GLOB...]",
                   help="ignore fields whose dotted path matches (e.g. 'x86.msrs.IA32_TSC', "
                        "'x86.clock', 'x86.regs[1].*', 'ram')")
    s.add_argument("--ignore-volatile", action="store_true",
                   help="ignore clocks and counters: " + ", ".join(VOLATILE[:6]) + ", ...")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--ram-only", action="store_true", help="compare guest RAM only")
    g.add_argument("--no-ram", action="store_true", help="do not compare guest RAM")
    s.add_argument("--ram-map", metavar="OUT.png",
                   help="draw where the RAM differs: one pixel per page (black zero, grey "
                        "identical, red changed, orange zeroed, yellow filled, blue only in A, "
                        "green only in B)")
    s.add_argument("--ram-map-width", type=int, default=512, metavar="PAGES")
    s.add_argument("--max-ranges", type=int, default=None, metavar="N",
                   help="changed RAM ranges listed per region (text; JSON lists up to 1000 "
                        "by default)")
    s.add_argument("--parent", action="append", metavar="FILE",
                   help="parent snapshot of a diff layer operand (default: its name hint)")
    s.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    s.add_argument("-q", "--quiet", action="store_true", help="exit status only")
    s.set_defaults(func=cmd_diff)
