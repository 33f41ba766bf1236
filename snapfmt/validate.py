"""snapfmt.validate: structural + semantic findings for a loaded snapshot."""

from __future__ import annotations

from . import layout as L
from . import registry
from .errors import FormatError
from .findings import ERROR, INFO, WARNING, Finding, check, registered_checks
from .sections_core import MEM_BACKING_FILE, MEM_BACKING_SECTION, MEM_BACKING_ZERO, MEM_F_KNOWN

_CHECK_MODULES = ("x86_checks", "arm64_checks", "devices", "inode_map", "layers")


def _load_check_modules() -> None:
    registry.all_kinds()
    for mod in _CHECK_MODULES:
        try:
            __import__(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise


def validate(snap, *, deep: bool = True) -> list[Finding]:
    """All findings for ``snap``: section problems, decode errors, semantic checks.

    ``deep`` also verifies the CRC of BULK sections (guest RAM).
    """
    _load_check_modules()
    out: list[Finding] = []
    failures = snap.deep_verify() if deep else list(snap._crc_failures)
    bad_labels = set()
    for e in failures:
        out.append(Finding(e.code, ERROR, e.location, e.message))
        bad_labels.add(e.section)
    for s in snap.sections:
        if s.kind is None:
            out.append(Finding("unknown-ancillary", INFO, s.label,
                               f"ancillary section of unknown type 0x{s.type_id:08x} "
                               f"({s.length} bytes) skipped; tools preserve it"))
            continue
        if s.kind.arch is not None and s.kind.arch != snap.arch:
            out.append(Finding("wrong-arch", ERROR, s.label,
                               f"{s.kind.arch} section in a {snap.arch} snapshot"))
            continue
        if not s.kind.needs_decode_check or s.label in bad_labels:
            continue
        try:
            s.fields
        except FormatError as e:
            out.append(Finding(e.code, ERROR, e.location, e.message))
            bad_labels.add(s.label)
    for name, fn in registered_checks(snap.arch):
        try:
            out.extend(fn(snap))
        except FormatError as e:
            # a check tripped over bytes a decoder rejects; those are reported above
            if e.section not in bad_labels:
                out.append(Finding(e.code, ERROR, e.location, f"{name}: {e.message}"))
    return out


def has_errors(findings) -> bool:
    return any(f.severity == ERROR for f in findings)


# --------------------------------------------------------------- core checks

@check("memory-layout")
def _check_memory_layout(snap):
    ram = {s.instance: s for s in snap.all("ram")}
    lay = snap.find("memory_layout")
    if lay is None:
        if ram:
            yield Finding("ram-without-layout", ERROR, "memory_layout",
                          f"{len(ram)} RAM section(s) but no memory_layout section")
        return
    try:
        f = lay.fields
    except FormatError:
        return
    ps = snap.page_size
    used = set()
    spans = []
    for i, r in enumerate(f["regions"]):
        loc = f"memory_layout.regions[{i}]"
        gpa, size = r["guest_phys_addr"], r["memory_size"]
        if gpa % ps or size % ps or size == 0:
            yield Finding("mem-region-align", ERROR, loc,
                          f"[0x{gpa:x}, +0x{size:x}) not page-aligned / empty (page {ps})")
        if r["flags"] & ~MEM_F_KNOWN:
            yield Finding("mem-region-flags", ERROR, f"{loc}.flags",
                          f"unknown flags 0x{r['flags'] & ~MEM_F_KNOWN:x}")
        if r["reserved"]:
            yield Finding("mem-region-reserved", ERROR, f"{loc}.reserved", "must be 0")
        spans.append((gpa, gpa + size, i))
        b = r["backing"]
        if b == MEM_BACKING_SECTION:
            sec = ram.get(r["section_instance"])
            if sec is None:
                yield Finding("mem-region-missing-ram", ERROR, f"{loc}.section_instance",
                              f"RAM section {r['section_instance']} not in the file")
            else:
                used.add(sec.instance)
                # a diff layer's RAM holds only dirty pages (layers.py checks those sizes)
                if sec.length != size and not snap.flags & L.HDR_F_DIFF_LAYER:
                    yield Finding("mem-region-size", ERROR, f"{loc}.memory_size",
                                  f"region is {size} bytes, RAM section {sec.instance} has "
                                  f"{sec.length}")
        elif b == MEM_BACKING_FILE:
            strings_len = len(f["strings"]) // 2
            if r["name_offset"] + r["name_len"] > strings_len or r["name_len"] == 0:
                yield Finding("mem-region-name", ERROR, f"{loc}.name_offset",
                              f"name [{r['name_offset']}, {r['name_offset'] + r['name_len']}) "
                              f"not inside the {strings_len}-byte string table")
            if r["file_offset"] % ps:
                yield Finding("mem-region-align", ERROR, f"{loc}.file_offset",
                              f"file offset {r['file_offset']} not page-aligned")
        elif b != MEM_BACKING_ZERO:
            yield Finding("mem-region-backing", ERROR, f"{loc}.backing",
                          f"unknown backing {b} (0 section, 1 file, 2 zero)")
    spans.sort()
    for (a0, a1, ia), (b0, b1, ib) in zip(spans, spans[1:]):
        if b0 < a1:
            yield Finding("mem-region-overlap", ERROR, f"memory_layout.regions[{ib}]",
                          f"[0x{b0:x}, 0x{b1:x}) overlaps regions[{ia}] [0x{a0:x}, 0x{a1:x})")
    for inst in sorted(set(ram) - used):
        yield Finding("ram-unreferenced", WARNING, ram[inst].label,
                      "RAM section not referenced by any memory region")


@check("metadata")
def _check_metadata(snap):
    if snap.find("metadata") is None:
        yield Finding("metadata-missing", WARNING, "metadata",
                      "no metadata section: templates cannot be checked for staleness")


@check("header")
def _check_header(snap):
    unknown_info = snap.flags & ~L.HDR_F_REQUIRED_MASK
    if unknown_info:
        yield Finding("header-info-flags", INFO, "header.flags",
                      f"informational flags 0x{unknown_info:x} not known to this reader")
