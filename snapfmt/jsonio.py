"""JSON <-> image: `snapfmt dump` and `snapfmt build`.

``build(dump(x)) == x`` byte for byte for every canonically laid out image
(every image snapfmt or the shim writes): each known section is dumped as its
decoded fields (which keep every byte), unknown ones as hex.
"""

from __future__ import annotations

import json

from . import layout as L
from . import registry
from .container import Snapshot
from .errors import EncodeError, FormatError

DUMP_FORMAT = "snapfmt-dump/1"


def header_flag_names(flags: int) -> list[str]:
    names = []
    if flags & L.HDR_F_TEMPLATE:
        names.append("TEMPLATE")
    if flags & L.HDR_F_DIFF_LAYER:
        names.append("DIFF_LAYER")
    rest = flags & ~L.HDR_F_KNOWN_REQUIRED
    if rest:
        names.append(f"0x{rest:x}")
    return names


def section_flag_names(flags: int) -> list[str]:
    return [n for b, n in ((L.SEC_F_CRITICAL, "CRITICAL"), (L.SEC_F_BULK, "BULK")) if flags & b] \
        or ["ANCILLARY"]


def dump(snap: Snapshot, *, annotate: bool = True) -> dict:
    out = {
        "format": DUMP_FORMAT,
        "header": {
            "version": f"{snap.version[0]}.{snap.version[1]}",
            "compat_version": f"{snap.compat_version[0]}.{snap.compat_version[1]}",
            "arch": snap.arch,
            "page_size": snap.page_size,
            "flags": snap.flags,
            "flag_names": header_flag_names(snap.flags),
            "header_len": snap.header_len,
        },
        "sections": [],
    }
    for s in snap.sections:
        d = {"type": s.name, "type_id": s.type_id, "instance": s.instance, "version": s.version,
             "flags": s.flags, "flag_names": section_flag_names(s.flags), "length": s.length}
        kind = s.kind
        if kind is None or s.version > kind.version:
            d["raw"] = bytes(s.data).hex()
        else:
            d["fields"] = s.fields
            if annotate:
                ann = kind.annotate(d["fields"])
                if ann is not None:
                    d["decoded"] = ann
        out["sections"].append(d)
    return out


def _parse_version(v, where: str) -> tuple[int, int]:
    try:
        a, b = str(v).split(".")
        return int(a), int(b)
    except ValueError:
        raise EncodeError(f"version {v!r} is not MAJOR.MINOR", section="header",
                          field=where) from None


def build(doc: dict) -> Snapshot:
    """A dump document (as produced by :func:`dump`) back to a Snapshot."""
    if not isinstance(doc, dict) or doc.get("format") != DUMP_FORMAT:
        raise EncodeError(f"not a snapfmt dump (expected \"format\": \"{DUMP_FORMAT}\")",
                          section="json", field="format")
    try:
        h = doc["header"]
        snap = Snapshot(h["arch"], int(h["page_size"]), int(h["flags"]),
                        _parse_version(h["version"], "version"),
                        _parse_version(h["compat_version"], "compat_version"))
        hl = int(h.get("header_len", L.HEADER_SIZE))
        if hl < L.HEADER_SIZE or hl > L.MAX_HEADER_LEN or hl % 8:
            raise EncodeError(f"header_len {hl} invalid", section="header", field="header_len")
        snap.header_len = hl
        secs = doc["sections"]
    except (KeyError, TypeError, ValueError) as e:
        raise EncodeError(f"malformed header: {e!r}", section="json.header") from None
    for i, d in enumerate(secs):
        where = f"json.sections[{i}]"
        try:
            tid = int(d["type_id"])
            inst = int(d["instance"])
            ver = int(d["version"])
            flags = int(d["flags"])
            if "raw" in d:
                data = bytes.fromhex(d["raw"])
            else:
                kind = registry.by_id(tid)
                if kind is None:
                    raise EncodeError(f"type 0x{tid:x} unknown: needs \"raw\"", section=where)
                data = kind.encode(d["fields"])
        except EncodeError as e:
            e.section = f"{where} ({d.get('type', '?')})" if isinstance(d, dict) else where
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EncodeError(f"malformed section entry: {e!r}", section=where) from None
        snap.add(tid, inst, data=data, flags=flags, version=ver)
    return snap


def dumps(snap: Snapshot, **kw) -> str:
    return json.dumps(dump(snap, **kw), indent=1, sort_keys=False) + "\n"


def loads_json(text: str) -> Snapshot:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise EncodeError(f"invalid JSON: {e.msg}", section="json", offset=e.pos) from None
    return build(doc)


def check_roundtrip(snap: Snapshot) -> None:
    """Raise FormatError unless dump -> build reproduces the bytes."""
    a = snap.to_bytes()
    b = build(json.loads(dumps(snap))).to_bytes()
    if a != b:
        i = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        raise FormatError("dump/build round trip differs", offset=i)
