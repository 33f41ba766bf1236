"""`snapfmt migrate` and `snapfmt schema-diff` (spec/MIGRATION.md).

Migration: a registry of *steps*, each a pure function from a snapshot of
format version ``src`` to one of version ``dst`` (``fn(snap, log) -> Snapshot``,
``log`` collects one line per change it makes).  :func:`plan` chains steps
(fewest steps first); :func:`migrate` runs them on a zero-copy clone, refuses
a step whose ``loss`` function reports critical data it would drop, and checks
after every step that each ANCILLARY section the code does not understand
came through byte for byte.  The format is at 1.0; the only real path today
is the identity 1.0 -> 1.0 (a canonical re-write).  Steps for later versions
are registered by the module that defines them (tests register 1.1 / 2.0
fixtures to prove the machinery).

Schema diff: compares two ``snapfmt schema --json`` documents like QEMU's
vmstate static checker and flags incompatible layout changes made without a
version bump.  ``--frozen`` compares every ``spec/schema/v*.json`` with the
live declarations.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from . import layout as L
from .container import Section, Snapshot, load, loads
from .crc import crc32c
from .atomic import write_atomic
from .errors import EncodeError, FormatError, SnapfmtOSError, VersionError

Version = tuple[int, int]


class MigrationError(FormatError):
    code = "inval"


def parse_version(v) -> Version:
    if isinstance(v, tuple):
        return v
    try:
        a, b = str(v).split(".")
        return int(a), int(b)
    except ValueError:
        raise EncodeError(f"version {v!r} is not MAJOR.MINOR", field="version") from None


def vstr(v: Version) -> str:
    return f"{v[0]}.{v[1]}"


# ------------------------------------------------------------------ registry

StepFn = Callable[[Snapshot, list], Snapshot]
LossFn = Callable[[Snapshot], list]


@dataclass(frozen=True)
class Step:
    src: Version
    dst: Version
    fn: StepFn
    description: str
    loss: LossFn | None = None        # critical data this step would drop (downgrades)
    compat: Version | None = None     # compat_version written at dst (default: computed)

    @property
    def downgrade(self) -> bool:
        return self.dst < self.src


_STEPS: dict[tuple[Version, Version], Step] = {}


def register_step(src, dst, description: str, *, loss: LossFn | None = None,
                  compat=None) -> Callable[[StepFn], StepFn]:
    """Decorator: register ``fn`` as the migration step ``src`` -> ``dst``."""
    s, d = parse_version(src), parse_version(dst)
    if s == d:
        raise ValueError("a step must change the version")

    def deco(fn: StepFn) -> StepFn:
        if (s, d) in _STEPS:
            raise ValueError(f"step {vstr(s)} -> {vstr(d)} registered twice")
        _STEPS[(s, d)] = Step(s, d, fn, description, loss,
                              parse_version(compat) if compat is not None else None)
        return fn
    return deco


def steps() -> list[Step]:
    return sorted(_STEPS.values(), key=lambda x: (x.src, x.dst))


@contextlib.contextmanager
def isolated_registry():
    """Tests: register steps inside, get the previous registry back afterwards."""
    saved = dict(_STEPS)
    try:
        yield
    finally:
        _STEPS.clear()
        _STEPS.update(saved)


def plan(src, dst) -> list[Step]:
    """The shortest chain of registered steps from ``src`` to ``dst``."""
    s, d = parse_version(src), parse_version(dst)
    if s == d:
        return []
    prev: dict[Version, Step | None] = {s: None}
    q = deque([s])
    while q:
        v = q.popleft()
        for (a, b), st in sorted(_STEPS.items()):
            if a == v and b not in prev:
                prev[b] = st
                if b == d:
                    out = []
                    cur = b
                    while prev[cur] is not None:
                        out.append(prev[cur])
                        cur = prev[cur].src
                    return out[::-1]
                q.append(b)
    known = sorted({v for k in _STEPS for v in k} | {L.VERSION})
    raise MigrationError(f"no migration path from {vstr(s)} to {vstr(d)} (known versions: "
                         f"{', '.join(vstr(v) for v in known)})", section="header",
                         field="version", code="bad-version")


# ------------------------------------------------------------------ loading

def load_any(path) -> Snapshot:
    """Load a file of any format version with the v1 container reader.

    Versions this reader accepts go through :func:`snapfmt.load` (mmap, no
    copy).  Others (a newer minor/major the registry has steps for) are read
    into memory, parsed with their version fields set to this reader's, and
    get their own version back on the Snapshot.  Section-level problems are
    kept (``strict=False``) for the steps to handle.
    """
    try:
        return load(path, strict=False)
    except VersionError:
        pass
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except OSError as e:
        raise SnapfmtOSError(f"cannot read {path}: {e.strerror}") from None
    ho = L.HEADER_FIELD_OFFSETS
    ver = struct.unpack_from("<HH", data, ho["version_major"])
    compat = struct.unpack_from("<HH", data, ho["compat_major"])
    struct.pack_into("<HHHH", data, ho["version_major"], *L.VERSION, *L.COMPAT_VERSION)
    hlen = struct.unpack_from("<I", data, ho["header_len"])[0]
    struct.pack_into("<I", data, ho["header_crc32c"], 0)
    struct.pack_into("<I", data, ho["header_crc32c"], crc32c(bytes(data[:hlen])))
    snap = loads(bytes(data), strict=False)
    snap.version, snap.compat_version = tuple(ver), tuple(compat)
    snap.path = os.fspath(path)
    return snap


def clone(snap: Snapshot) -> Snapshot:
    """A copy sharing the section bytes (zero-copy views of BULK data)."""
    from .ramdiff import section_bytes
    out = Snapshot(snap.arch, snap.page_size, snap.flags, snap.version, snap.compat_version)
    out.header_len = L.HEADER_SIZE
    for s in snap.sections:
        data = section_bytes(s) if s.bulk else bytes(s.data)
        out.sections.append(Section(out, len(out.sections), s.type_id, s.instance, s.version,
                                    s.flags, s.crc32c, None, s.length, data))
    out._keepalive = snap
    return out


def _opaque_ancillary(snap: Snapshot) -> dict:
    """Ancillary sections this code does not understand: key -> (version, flags, crc, len)."""
    out = {}
    for s in snap.sections:
        k = s.kind
        if not s.critical and (k is None or s.version > k.version):
            out[(s.type_id, s.instance)] = (s.version, s.flags, crc32c(s.data), s.length)
    return out


# ------------------------------------------------------------------ migrating

@dataclass
class MigrationResult:
    snapshot: Snapshot
    src: Version
    dst: Version
    steps: list[Step]
    log: list[tuple[str, list[str]]] = field(default_factory=list)   # (step, changes)


def _default_compat(snap: Snapshot, dst: Version) -> Version:
    # a writer of dst that uses nothing newer than the oldest compatible reader
    if dst[0] != snap.compat_version[0] or snap.compat_version > dst:
        return (dst[0], 0)
    return snap.compat_version


def migrate(snap: Snapshot, to=None, *, verify: bool = True) -> MigrationResult:
    """Run the chain of steps from ``snap.version`` to ``to`` (default: current)."""
    dst = parse_version(to) if to is not None else L.VERSION
    src = tuple(snap.version)
    chain = plan(src, dst)
    bad = [e for e in (snap.deep_verify() if verify else snap._crc_failures)
           if e.code != "unknown-critical"]
    if bad:
        raise MigrationError(f"input is damaged: {bad[0]}", section=bad[0].section,
                             code=bad[0].code)
    cur = clone(snap)
    opaque = _opaque_ancillary(snap)
    res = MigrationResult(cur, src, dst, chain)
    for st in chain:
        name = f"{vstr(st.src)} -> {vstr(st.dst)}"
        if st.loss is not None:
            lost = list(st.loss(cur))
            if lost:
                raise MigrationError(f"step {name} would drop critical data: {'; '.join(lost)}",
                                     section="header", field="version",
                                     hint="keep the newer version, or re-create the snapshot")
        log: list[str] = []
        nxt = st.fn(cur, log)
        if not isinstance(nxt, Snapshot):
            raise MigrationError(f"step {name} returned {type(nxt).__name__}, not a Snapshot")
        nxt.version = st.dst
        nxt.compat_version = st.compat or _default_compat(cur, st.dst)
        still = _opaque_ancillary(nxt)
        for key, meta in opaque.items():
            s = nxt.find(key[0], key[1])
            if s is None or (s.version, s.flags, crc32c(s.data), s.length) != meta:
                raise MigrationError(f"step {name} did not preserve the unknown ancillary "
                                     f"section (type 0x{key[0]:08x}, instance {key[1]})",
                                     section="migrate", code="inval")
        opaque = still
        res.log.append((name, log))
        cur = nxt
    if dst == L.VERSION:
        for s in cur.sections:
            k = s.kind
            if s.critical and (k is None or s.version > k.version):
                raise MigrationError(f"after migration {s.label} is a CRITICAL section of "
                                     f"version {s.version} this code does not know",
                                     section=s.label, code="unknown-critical")
    res.snapshot = cur
    return res


# ------------------------------------------------------------------ schema diff

INCOMPATIBLE = "incompatible"
COMPATIBLE = "compatible"
INFO = "info"


@dataclass(frozen=True)
class SchemaIssue:
    severity: str         # incompatible | compatible | info
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper()}: {self.where}: {self.message}"

    def as_dict(self) -> dict:
        return {"severity": self.severity, "where": self.where, "message": self.message}


def _fields_diff(old: list, new: list, where: str) -> list[str]:
    """Layout changes between two field lists (by name): one message each."""
    out = []
    nmap = {f["name"]: f for f in new}
    omap = {f["name"]: f for f in old}
    for f in old:
        g = nmap.get(f["name"])
        if g is None:
            out.append(f"field {f['name']} removed")
            continue
        for attr in ("offset", "size", "type"):
            if f.get(attr) != g.get(attr):
                out.append(f"field {f['name']} {attr} {f.get(attr)} -> {g.get(attr)}")
        if f.get("element_size") != g.get("element_size"):
            out.append(f"field {f['name']} element size {f.get('element_size')} -> "
                       f"{g.get('element_size')}")
        out += _fields_diff(f.get("element", []), g.get("element", []),
                            f"{where}.{f['name']}[]")
    for f in new:
        if f["name"] not in omap:
            out.append(f"field {f['name']} added at offset {f.get('offset')}")
    return out


_FN_REPR = re.compile(r"<function .*? at 0x[0-9a-fA-F]+>")


def normalize_schema(doc):
    """Drop what is not layout: object reprs of computed lengths (``<function <lambda>
    at 0x...>``, different in every process) become ``<computed>``."""
    if isinstance(doc, dict):
        return {k: normalize_schema(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [normalize_schema(v) for v in doc]
    if isinstance(doc, str):
        return _FN_REPR.sub("<computed>", doc)
    return doc


def live_schema() -> dict:
    from .schema import schema
    return normalize_schema(json.loads(json.dumps(schema())))


def freeze(path: str | None = None) -> str:
    """Write the live schema as the frozen schema of the current format version."""
    path = path or os.path.join(frozen_dir(), f"v{vstr(L.VERSION)}.json")
    text = json.dumps(live_schema(), indent=1, sort_keys=False) + "\n"
    write_atomic(path, text)
    return path


def schema_diff(old: dict, new: dict) -> list[SchemaIssue]:
    """Issues between two schema documents (``snapfmt schema --json``)."""
    out: list[SchemaIssue] = []
    old, new = normalize_schema(old), normalize_schema(new)
    try:
        ov, nv = parse_version(old["format_version"]), parse_version(new["format_version"])
    except (KeyError, TypeError) as e:
        raise FormatError(f"not a snapfmt schema document (missing {e})", section="schema",
                          code="inval") from None
    major_bump = nv[0] > ov[0]
    if nv < ov:
        out.append(SchemaIssue(INCOMPATIBLE, "format_version",
                               f"went backwards: {vstr(ov)} -> {vstr(nv)}"))
    for part in ("header", "table_entry"):
        msgs = _fields_diff(old["container"][part], new["container"][part], part)
        for m in msgs:
            added_tail = m.startswith("field ") and " added " in m
            if major_bump or (added_tail and nv > ov):
                out.append(SchemaIssue(INFO, f"container.{part}",
                                       f"{m} (format version {vstr(ov)} -> {vstr(nv)})"))
            else:
                out.append(SchemaIssue(INCOMPATIBLE, f"container.{part}",
                                       f"{m} without a format version bump"))
    old_by_id = {k["type_id"]: k for k in old["sections"]}
    new_by_id = {k["type_id"]: k for k in new["sections"]}
    new_by_name = {k["name"]: k for k in new["sections"]}
    for tid, o in sorted(old_by_id.items()):
        where = f"0x{tid:04x} {o['name']}"
        n = new_by_id.get(tid)
        if n is None:
            moved = new_by_name.get(o["name"])
            if moved is not None:
                msg = f"renumbered to 0x{moved['type_id']:04x} (type ids are forever)"
            else:
                msg = "section type removed (old files carry it)"
            out.append(SchemaIssue(INFO if major_bump else INCOMPATIBLE, where,
                                   msg + (f" (format {vstr(ov)} -> {vstr(nv)})" if major_bump
                                          else " without a format major version bump")))
            continue
        if n["name"] != o["name"]:
            out.append(SchemaIssue(COMPATIBLE, where, f"renamed to {n['name']} (JSON dumps "
                                                      f"use the name)"))
        if n["version"] < o["version"]:
            out.append(SchemaIssue(INCOMPATIBLE, where,
                                   f"section version went backwards v{o['version']} -> "
                                   f"v{n['version']}"))
        bumped = n["version"] > o["version"] or major_bump
        changes = []
        for attr in ("critical", "bulk", "scope", "arch", "size"):
            if o.get(attr) != n.get(attr):
                changes.append(f"{attr} {o.get(attr)} -> {n.get(attr)}")
        changes += _fields_diff(o.get("fields", []), n.get("fields", []), where)
        for m in changes:
            if bumped:
                how = f"v{o['version']} -> v{n['version']}" if n["version"] > o["version"] \
                    else f"format {vstr(ov)} -> {vstr(nv)}"
                out.append(SchemaIssue(INFO, where, f"{m} ({how}: needs a migration step)"))
            else:
                out.append(SchemaIssue(INCOMPATIBLE, where,
                                       f"{m} without a section version bump "
                                       f"(still v{n['version']})"))
    for tid, n in sorted(new_by_id.items()):
        if tid not in old_by_id and not any(o["name"] == n["name"] for o in old["sections"]):
            out.append(SchemaIssue(COMPATIBLE, f"0x{tid:04x} {n['name']}",
                                   "new section type (compatible addition)"))
    return out


def frozen_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spec",
                        "schema")


def frozen_schemas(directory: str | None = None) -> list[str]:
    d = directory or frozen_dir()
    return sorted(glob.glob(os.path.join(d, "v*.json")))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise SnapfmtOSError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"not JSON: {e.msg} (line {e.lineno})", section=path,
                          code="inval") from None


# ------------------------------------------------------------------ CLI

def cmd_migrate(args) -> int:
    snap = load_any(args.input)
    to = parse_version(args.to) if args.to else L.VERSION
    res = migrate(snap, to, verify=not args.no_verify)
    src = vstr(res.src)
    if not res.steps:
        print(f"{args.input}: format {src} -> {vstr(to)}: no steps (canonical re-write, "
              f"{len(res.snapshot.sections)} sections kept)")
    for name, log in res.log:
        print(f"step {name}:")
        for line in log or ["(no changes to this file)"]:
            print(f"  {line}")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    if not args.output:
        raise EncodeError("-o OUTPUT is required (or --dry-run)", section="migrate",
                          field="output")
    res.snapshot.save(args.output)
    print(f"{args.output}: written (format {vstr(res.snapshot.version)}, compat "
          f"{vstr(res.snapshot.compat_version)})")
    return 0


def cmd_schema_diff(args) -> int:
    pairs = []
    if args.freeze:
        print(f"{freeze()}: written")
        return 0
    if args.frozen:
        live = live_schema()
        files = frozen_schemas(args.schema_dir)
        if not files:
            raise SnapfmtOSError(f"no frozen schemas (v*.json) in "
                                 f"{args.schema_dir or frozen_dir()}")
        pairs = [(f, "live", _read_json(f), live) for f in files]
    else:
        if not (args.old and args.new):
            raise EncodeError("give OLD.json NEW.json, or --frozen", section="schema-diff")
        pairs = [(args.old, args.new, _read_json(args.old), _read_json(args.new))]
    bad = 0
    doc = []
    for a, b, old, new in pairs:
        issues = schema_diff(old, new)
        bad += sum(i.severity == INCOMPATIBLE for i in issues)
        doc.append({"old": a, "new": b, "issues": [i.as_dict() for i in issues]})
        if not args.json:
            shown = [i for i in issues if args.verbose or i.severity != COMPATIBLE
                     or "renamed" in i.message]
            for i in shown:
                print(f"{a} -> {b}: {i}")
            n_inc = sum(i.severity == INCOMPATIBLE for i in issues)
            n_add = sum(i.severity == COMPATIBLE for i in issues)
            print(f"{a} -> {b}: {'INCOMPATIBLE' if n_inc else 'compatible'} "
                  f"({n_inc} incompatible change(s), {n_add} compatible addition(s))")
    if args.json:
        sys.stdout.write(json.dumps({"compatible": bad == 0, "comparisons": doc}, indent=1)
                         + "\n")
    return 1 if bad else 0


def register_cli(sub) -> None:
    s = sub.add_parser("migrate", help="convert a snapshot to another format version")
    s.add_argument("input")
    s.add_argument("-o", "--output")
    s.add_argument("--to", metavar="VERSION",
                   help=f"target format version (default: {vstr(L.VERSION)}, this code's)")
    s.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    s.add_argument("--no-verify", action="store_true", help="skip the CRC of guest RAM")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("schema-diff", help="incompatible layout changes between two `schema "
                                           "--json` outputs (exit 1 if any)")
    s.add_argument("old", nargs="?")
    s.add_argument("new", nargs="?")
    s.add_argument("--frozen", action="store_true",
                   help="compare every frozen spec/schema/v*.json with the live declarations")
    s.add_argument("--schema-dir", help="where the frozen schemas are (default: spec/schema)")
    s.add_argument("--freeze", action="store_true",
                   help=f"write the live schema as spec/schema/v{vstr(L.VERSION)}.json (only "
                        f"when releasing a format version, or after compatible additions)")
    s.add_argument("--json", action="store_true")
    s.add_argument("-v", "--verbose", action="store_true", help="also list compatible additions")
    s.set_defaults(func=cmd_schema_diff)
