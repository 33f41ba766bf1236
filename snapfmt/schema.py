"""`snapfmt schema`: every section's declared layout (like QEMU -dump-vmstate)."""

from __future__ import annotations

import construct as c

from . import layout as L
from . import registry
from .decl import type_name


def describe(decl, base: int | None = 0, prefix: str = "") -> list[dict]:
    """Fields of a construct declaration: name, offset (None once variable), size, type."""
    out = []
    while isinstance(decl, (c.Renamed, c.Transformed)) or (
            isinstance(decl, c.Adapter) and hasattr(decl, "subcon")
            and not type(decl).__name__ == "_HexAdapter"):
        decl = decl.subcon
    if not isinstance(decl, c.Struct):
        return out
    off = base
    for sc in decl.subcons:
        name = f"{prefix}{sc.name}"
        try:
            size = sc.sizeof()
        except (c.SizeofError, KeyError, AttributeError):
            size = None
        inner = sc
        while isinstance(inner, c.Renamed):
            inner = inner.subcon
        entry = {"name": name, "offset": off, "size": size, "type": _tname(inner)}
        out.append(entry)
        elem = _element_struct(inner)
        if isinstance(inner, c.Struct) and size is not None:
            out.extend(describe(inner, off, name + "."))
        elif elem is not None:
            entry["element"] = describe(elem, 0, "")
            try:
                entry["element_size"] = elem.sizeof()
            except c.SizeofError:
                entry["element_size"] = None
        off = None if (off is None or size is None) else off + size
    return out


def _element_struct(sc):
    while isinstance(sc, (c.Renamed, c.Prefixed)) or (isinstance(sc, c.Adapter)
                                                       and hasattr(sc, "subcon")):
        sc = sc.subcon
    if isinstance(sc, c.FocusedSeq):
        sc = next((x.subcon for x in sc.subcons if x.name == "items"), None)
        if sc is None:
            return None
    if isinstance(sc, (c.Array, c.GreedyRange)) or type(sc).__name__ == "PrefixedArray":
        sub = sc.subcon
        while isinstance(sub, c.Renamed):
            sub = sub.subcon
        if isinstance(sub, c.Struct):
            return sub
    return None


def _tname(sc) -> str:
    if isinstance(sc, c.FocusedSeq):     # PrefixedArray
        cnt = sc.subcons[0]
        while hasattr(cnt, "subcon") and not isinstance(cnt, c.FormatField):
            cnt = cnt.subcon
        return f"prefixed-array[{type_name(cnt)}]"
    if isinstance(sc, c.StringEncoded):
        return "string"
    if isinstance(sc, c.Array) and not isinstance(sc.count, int):
        return f"array[{_count_expr(sc.count)}]"
    name = type_name(sc)
    return name


def _count_expr(cnt) -> str:
    s = repr(cnt)
    return s.replace("this.", "").replace("this['", "").replace("']", "")


def schema() -> dict:
    kinds = []
    for k in registry.all_kinds():
        d = {"name": k.name, "type_id": k.type_id, "version": k.version,
             "scope": k.scope, "arch": k.arch, "critical": k.critical, "bulk": k.bulk,
             "size": k.fixed_size, "kernel_struct": k.kernel_struct, "ioctl": k.ioctl,
             "doc": k.doc}
        d["fields"] = describe(k.decl) if k.decl is not None else []
        kinds.append(d)
    return {
        "format_version": f"{L.VERSION[0]}.{L.VERSION[1]}",
        "compat_version": f"{L.COMPAT_VERSION[0]}.{L.COMPAT_VERSION[1]}",
        "container": {"header": describe(L.Header), "table_entry": describe(L.TableEntry)},
        "sections": kinds,
    }


def render_text(sch: dict) -> str:
    lines = [f"snapfmt format {sch['format_version']} (compat {sch['compat_version']})", ""]
    for part, fields in sch["container"].items():
        lines.append(f"container.{part}")
        lines += _field_lines(fields, "  ")
        lines.append("")
    for k in sch["sections"]:
        flags = ("CRITICAL" if k["critical"] else "ANCILLARY") + (" BULK" if k["bulk"] else "")
        size = k["size"] if k["size"] is not None else "variable"
        extra = f"  {k['kernel_struct']}" if k["kernel_struct"] else ""
        lines.append(f"0x{k['type_id']:04x} {k['name']} v{k['version']} [{k['scope']}, "
                     f"{k['arch'] or 'any'}, {flags}] size={size}{extra}")
        lines += _field_lines(k["fields"], "  ")
        lines.append("")
    return "\n".join(lines)


def _field_lines(fields, ind):
    out = []
    for f in fields:
        off = f"{f['offset']:>5}" if f["offset"] is not None else "    *"
        size = f"{f['size']:>5}" if f["size"] is not None else "    *"
        out.append(f"{ind}{off} {size}  {f['type']:<14} {f['name']}")
        if "element" in f:
            out.append(f"{ind}      element ({f.get('element_size')} bytes):")
            out += _field_lines(f["element"], ind + "        ")
    return out
