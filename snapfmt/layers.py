"""Layered guest memory: diff layers over a parent snapshot (spec/LAYERS.md).

A *layer* is a snapshot with the DIFF_LAYER header flag and one ``parent_ref``
section (type 0x0400, CRITICAL).  The section names its parent by *content
digest* (SHA-256 of the parent file's bytes ``[0, file_size)``, which are
canonical, so the digest is a function of the parent's content) plus a file
name hint, and carries one dirty bitmap per RAM blob.  Each RAM section of the
layer holds only the dirty pages of its blob, packed in bitmap order; a clean
page is the parent's page of the same RAM instance and index.  Every other
section (vCPU, device state, memory layout) is complete in the layer.

Chains work: the parent may itself be a layer (base -> +python -> +numpy);
resolving a layer verifies every digest on the way down and refuses a chain
whose base changed.

Library API: :func:`content_digest`, :func:`make_layer`, :func:`rebase`,
:func:`ram_sources` (page sources of every RAM blob, resolving layers),
:func:`find_parent`, :func:`check_chain`.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass

import construct as c
import numpy as np

from . import layout as L
from . import typeids
from .container import Section, Snapshot, load
from .crc import crc32c
from .decl import HexBytes
from .errors import EncodeError, FormatError, LimitError, SnapfmtError, SnapfmtOSError
from .findings import ERROR, INFO, WARNING, Finding, check
from .ramdiff import ArraySource, LayerSource, PageSource, section_bytes
from .registry import SCOPE_GLOBAL, SectionKind, register

u32 = c.Int32ul
u64 = c.Int64ul

SECTION = "parent_ref"
DIGEST_SHA256 = 1
DIGEST_ALGS = {DIGEST_SHA256: "sha256"}
MAX_BLOBS = 1024                 # = memory_layout's region limit
MAX_NAME_LEN = 4096
MAX_PAGES = 1 << 36              # 256 TiB of 4 KiB pages per blob: bitmap <= 8 GiB... capped
                                 # further by the 1 GiB section limit

ParentRefHeader = c.Struct(
    "digest_alg" / u32,          # 1 = SHA-256 of the parent file's bytes [0, file_size)
    "flags" / u32,               # none defined; must be 0
    "page_size" / u32,           # page size of the bitmaps (= the header page_size)
    "nblobs" / u32,              # BlobRef records that follow
    "parent_file_size" / u64,    # the parent file's size in bytes
    "name_len" / u32,            # bytes of the parent file name hint (UTF-8)
    "reserved" / u32,            # must be 0
    "parent_digest" / HexBytes(32),  # content digest of the parent
)

BlobRef = c.Struct(
    "instance" / u32,            # RAM section instance (same in layer and parent)
    "reserved" / u32,            # must be 0
    "npages" / u64,              # pages of the whole blob (its memory region / page_size)
    "ndirty" / u64,              # set bits in its bitmap = pages in the layer's RAM section
)

#: The whole section: header, blob records, name hint (padded to 8), then one
#: bitmap per blob in blob order, ceil(npages / 64) u64 words each, bit i of
#: word w (LSB first) = page 64 * w + i is dirty.  Bits past npages are zero.
ParentRef = c.Struct(
    *ParentRefHeader.subcons,
    "blobs" / c.Array(c.this.nblobs, BlobRef),
    "name" / HexBytes(c.this.name_len),
    "name_pad" / HexBytes(lambda ctx: -ctx.name_len % 8),
    "bitmaps" / HexBytes(lambda ctx: sum(8 * (-(-b["npages"] // 64)) for b in ctx.blobs)),
)

HEADER_SIZE = ParentRefHeader.sizeof()
BLOB_SIZE = BlobRef.sizeof()
assert HEADER_SIZE == 64 and BLOB_SIZE == 24


def _bitmap_words(npages: int) -> int:
    return -(-npages // 64)


@dataclass
class ParentRefInfo:
    """Parsed parent_ref section (numpy bitmaps, no JSON)."""
    digest_alg: int
    page_size: int
    parent_file_size: int
    parent_digest: str
    name: bytes
    blobs: list[dict]              # instance, npages, ndirty, dirty (bool[npages])


def parse(buf) -> ParentRefInfo:
    """Structural checks + parse.  FormatError/LimitError on bad bytes."""
    b = bytes(buf)
    n = len(b)
    if n < HEADER_SIZE:
        raise FormatError(f"{n} bytes, shorter than its {HEADER_SIZE}-byte header",
                          section=SECTION, field="length", offset=0, code="bad-length")
    h = ParentRefHeader.parse(b[:HEADER_SIZE])
    if h.digest_alg not in DIGEST_ALGS:
        raise FormatError(f"digest_alg {h.digest_alg} unknown (1 = SHA-256)", section=SECTION,
                          field="digest_alg", offset=0, code="bad-value")
    if h.flags or h.reserved:
        which = "flags" if h.flags else "reserved"
        raise FormatError(f"{which} must be 0", section=SECTION, field=which,
                          offset=4 if h.flags else 28, code="bad-value")
    if h.page_size not in L.PAGE_SIZES:
        raise FormatError(f"page_size {h.page_size} not one of {L.PAGE_SIZES}", section=SECTION,
                          field="page_size", offset=8, code="bad-value")
    if h.nblobs > MAX_BLOBS:
        raise LimitError(f"nblobs {h.nblobs} > limit {MAX_BLOBS}", section=SECTION,
                         field="nblobs", offset=12)
    if h.name_len > MAX_NAME_LEN:
        raise LimitError(f"name_len {h.name_len} > limit {MAX_NAME_LEN}", section=SECTION,
                         field="name_len", offset=24)
    off = HEADER_SIZE + h.nblobs * BLOB_SIZE
    if n < off:
        raise FormatError(f"nblobs {h.nblobs} needs at least {off} bytes, section has {n}",
                          section=SECTION, field="nblobs", offset=12, code="bad-length")
    blobs = []
    seen = set()
    total_words = 0
    for i in range(h.nblobs):
        r = BlobRef.parse(b[HEADER_SIZE + i * BLOB_SIZE:HEADER_SIZE + (i + 1) * BLOB_SIZE])
        where = f"blobs[{i}]"
        roff = HEADER_SIZE + i * BLOB_SIZE
        if r.npages > MAX_PAGES:
            raise LimitError(f"{where}.npages {r.npages} > limit {MAX_PAGES}", section=SECTION,
                             field=f"{where}.npages", offset=roff + 8)
        if r.instance in seen:
            raise FormatError(f"{where}: RAM instance {r.instance} listed twice", section=SECTION,
                              field=f"{where}.instance", offset=roff, code="duplicate")
        if r.reserved:
            raise FormatError(f"{where}.reserved must be 0", section=SECTION,
                              field=f"{where}.reserved", offset=roff + 4, code="bad-value")
        seen.add(r.instance)
        total_words += _bitmap_words(r.npages)
        blobs.append({"instance": r.instance, "npages": r.npages, "ndirty": r.ndirty,
                      "offset": roff})
    name_end = off + h.name_len
    bm_off = name_end + (-h.name_len % 8)
    want = bm_off + 8 * total_words
    if want != n:
        raise FormatError(f"nblobs {h.nblobs}, name_len {h.name_len} and the blobs' npages need "
                          f"{want} bytes, section has {n}", section=SECTION, field="nblobs",
                          offset=12, code="bad-length")
    if any(b[name_end:bm_off]):
        raise FormatError("non-zero padding after the parent name", section=SECTION,
                          field="name_pad", offset=name_end, code="bad-value")
    words = np.frombuffer(b, dtype="<u8", count=total_words, offset=bm_off)
    w0 = 0
    for i, bl in enumerate(blobs):
        nw = _bitmap_words(bl["npages"])
        bits = np.unpackbits(words[w0:w0 + nw].view(np.uint8), bitorder="little").astype(bool)
        if bits[bl["npages"]:].any():
            raise FormatError(f"blobs[{i}]: bitmap bits set past npages {bl['npages']}",
                              section=SECTION, field=f"blobs[{i}].bitmap",
                              offset=bm_off + 8 * w0, code="bad-value")
        dirty = bits[:bl["npages"]]
        cnt = int(dirty.sum())
        if cnt != bl["ndirty"]:
            raise FormatError(f"blobs[{i}].ndirty is {bl['ndirty']}, its bitmap has {cnt} set "
                              f"bits", section=SECTION, field=f"blobs[{i}].ndirty",
                              offset=bl["offset"] + 16, code="bad-value")
        bl["dirty"] = dirty
        bl["bitmap"] = words[w0:w0 + nw]
        w0 += nw
    return ParentRefInfo(h.digest_alg, h.page_size, h.parent_file_size, h.parent_digest,
                         b[off:name_end], blobs)


def check_parent_ref(buf) -> None:
    parse(buf)


def _name_json(b: bytes):
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": b.hex()}


def decode_parent_ref(buf) -> dict:
    p = parse(buf)
    return {"digest_alg": p.digest_alg, "flags": 0, "page_size": p.page_size,
            "parent_file_size": p.parent_file_size, "reserved": 0,
            "parent_digest": p.parent_digest, "parent_name": _name_json(p.name),
            "blobs": [{"instance": bl["instance"], "reserved": 0, "npages": bl["npages"],
                       "ndirty": bl["ndirty"], "bitmap": bl["bitmap"].tobytes().hex()}
                      for bl in p.blobs]}


def encode_parent_ref(f: dict) -> bytes:
    try:
        name = f.get("parent_name", "")
        if isinstance(name, dict):
            name = bytes.fromhex(name["hex"])
        elif isinstance(name, str):
            name = name.encode("utf-8")
        else:
            name = bytes(name)
        blobs, bitmaps = [], []
        for i, bl in enumerate(f["blobs"]):
            bm = bl["bitmap"]
            bm = bytes.fromhex(bm) if isinstance(bm, str) else bytes(bm)
            if len(bm) != 8 * _bitmap_words(bl["npages"]):
                raise EncodeError(f"bitmap is {len(bm)} bytes, npages {bl['npages']} needs "
                                  f"{8 * _bitmap_words(bl['npages'])}", section=SECTION,
                                  field=f"blobs[{i}].bitmap")
            cnt = int(np.unpackbits(np.frombuffer(bm, np.uint8)).sum())
            if bl.get("ndirty", cnt) != cnt:
                raise EncodeError(f"ndirty {bl['ndirty']} != {cnt} set bits", section=SECTION,
                                  field=f"blobs[{i}].ndirty")
            blobs.append(dict(instance=bl["instance"], reserved=bl.get("reserved", 0),
                              npages=bl["npages"], ndirty=cnt))
            bitmaps.append(bm)
        out = ParentRef.build(dict(
            digest_alg=f.get("digest_alg", DIGEST_SHA256), flags=f.get("flags", 0),
            page_size=f["page_size"], nblobs=len(blobs),
            parent_file_size=f["parent_file_size"], name_len=len(name),
            reserved=f.get("reserved", 0), parent_digest=f["parent_digest"], blobs=blobs,
            name=name, name_pad=bytes(-len(name) % 8), bitmaps=b"".join(bitmaps)))
    except (c.ConstructError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, EncodeError):
            raise
        raise EncodeError(f"cannot encode: {' '.join(str(e).split())}", section=SECTION) from None
    try:
        parse(out)
    except FormatError as e:
        raise EncodeError(e.message, section=SECTION, field=e.field) from None
    return out


def _annotate_parent_ref(f: dict) -> dict:
    out = []
    for bl in f["blobs"]:
        out.append({"instance": bl["instance"], "dirty": f"{bl['ndirty']}/{bl['npages']} pages",
                    "dirty_mib": bl["ndirty"] * f["page_size"] / (1 << 20)})
    return {"parent": f"sha256:{f['parent_digest']}", "blobs": out}


PARENT_REF_KIND = register(SectionKind(
    typeids.PARENT_REF, SECTION, SCOPE_GLOBAL, ParentRef,
    "Diff layer: content digest and name hint of the parent snapshot, one dirty-page bitmap "
    "per RAM blob (the layer's RAM sections hold only the dirty pages, in bitmap order).",
    decode_fn=decode_parent_ref, encode_fn=encode_parent_ref, annotate_fn=_annotate_parent_ref,
    check_fn=check_parent_ref,
    # the prefix of parse() a table can express (per-blob checks and the bitmap
    # sizes follow in Python only)
    extra={"length_rule": (("min", HEADER_SIZE), ("value_in", 0, 4, tuple(DIGEST_ALGS)),
                           ("value_in", 4, 4, (0,)), ("value_in", 28, 4, (0,)),
                           ("value_in", 8, 4, tuple(L.PAGE_SIZES)),
                           ("limit", 12, 4, MAX_BLOBS), ("limit", 24, 4, MAX_NAME_LEN),
                           ("atleast", HEADER_SIZE, ((12, 4, BLOB_SIZE),)))}))


# ------------------------------------------------------------------ digests

_DIGEST_CACHE: dict[tuple, str] = {}


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns)


def content_digest(what) -> str:
    """SHA-256 (hex) of a snapshot's canonical bytes: a file path, or a Snapshot.

    For a file it is the digest of bytes [0, file_size) as stored (holes read as
    zeros).  For a Snapshot built in memory it is the digest of the bytes
    :meth:`Snapshot.save` would write, so both agree.
    """
    if isinstance(what, Snapshot):
        if what.path is not None and what.file_size is not None:
            return content_digest(what.path)
        return hashlib.sha256(what.to_bytes()).hexdigest()
    path = os.fspath(what)
    try:
        key = _file_key(path)
        if key in _DIGEST_CACHE:
            return _DIGEST_CACHE[key]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size:
                with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                    step = 64 << 20
                    for o in range(0, size, step):
                        h.update(mm[o:o + step])
    except OSError as e:
        raise SnapfmtOSError(f"cannot read {path}: {e.strerror}") from None
    d = h.hexdigest()
    _DIGEST_CACHE[key] = d
    return d


# ------------------------------------------------------------------ queries

def is_layer(snap: Snapshot) -> bool:
    return bool(snap.flags & L.HDR_F_DIFF_LAYER) or snap.find(SECTION) is not None


def parent_info(snap: Snapshot) -> ParentRefInfo | None:
    s = snap.find(SECTION)
    if s is None:
        return None
    try:
        return parse(s.data)
    except FormatError as e:
        e.section = s.label
        raise


class LayerParentChanged(FormatError):
    code = "changed"


def _candidates(snap: Snapshot, info: ParentRefInfo, parents) -> list[str]:
    out = [os.fspath(p) for p in (parents or [])]
    if info.name:
        hint = info.name.decode("utf-8", "surrogateescape")
        base = os.path.dirname(os.path.abspath(snap.path)) if snap.path else os.getcwd()
        out.append(hint if os.path.isabs(hint) else os.path.join(base, hint))
    return out


def find_parent(snap: Snapshot, parents=None) -> str:
    """Path of ``snap``'s parent: the first of ``parents`` whose content digest
    matches, else the name hint (beside the layer) if its digest matches.

    Raises LayerParentChanged when the hinted parent exists but its digest
    differs (the base changed), FormatError(notfound) when there is none.
    """
    info = parent_info(snap)
    if info is None:
        raise FormatError("not a diff layer (no parent_ref section)", section=SECTION,
                          code="notfound")
    changed = []
    explicit = [os.fspath(p) for p in (parents or [])]
    for cand in _candidates(snap, info, parents):
        if not os.path.exists(cand):
            continue
        d = content_digest(cand)
        if d == info.parent_digest:
            return cand
        changed.append((cand, d))
    if changed:
        cand, d = changed[-1] if not explicit else changed[0]
        raise LayerParentChanged(
            f"parent {cand} has content digest sha256:{d[:16]}..., the layer was made over "
            f"sha256:{info.parent_digest[:16]}... (the base changed)", section=SECTION,
            field="parent_digest", hint="rebuild the layer over the new base, or find the old one")
    hint = info.name.decode("utf-8", "backslashreplace")
    raise FormatError(f"parent snapshot not found (hint {hint!r}, sha256:"
                      f"{info.parent_digest[:16]}...)", section=SECTION, field="parent_name",
                      code="notfound", hint="pass the parent explicitly (--parent FILE)")


# ------------------------------------------------------------------ page sources

def _ram_instances(snap: Snapshot) -> dict[int, Section]:
    return {s.instance: s for s in snap.all("ram")}


def ram_sources(snap: Snapshot, parents=None, *, known: dict | None = None, _depth: int = 0,
                _opened: list | None = None) -> dict[int, PageSource]:
    """PageSource of every RAM blob (instance -> source), resolving a layer chain.

    Parents are opened with :func:`snapfmt.load` and stay mapped while the
    sources live (their snapshots are kept in ``_opened`` when given).
    ``known`` maps the real path of an already opened snapshot to its sources:
    a parent found there is reused (so a layer compared with its own parent
    shares the parent's source object and `diff` can use the bitmap).
    """
    if _depth > 64:
        raise FormatError("layer chain deeper than 64 (a cycle?)", section=SECTION,
                          code="limit")
    info = parent_info(snap)
    ps = snap.page_size
    if info is None:
        return {i: ArraySource(section_bytes(s), ps) for i, s in _ram_instances(snap).items()}
    if info.page_size != ps:
        raise FormatError(f"parent_ref page_size {info.page_size} != header page_size {ps}",
                          section=SECTION, field="page_size", code="bad-value")
    ppath = find_parent(snap, parents)
    rp = os.path.realpath(ppath)
    if known is not None and rp in known:
        base = known[rp]
    else:
        parent = load(ppath)
        if _opened is not None:
            _opened.append(parent)
        if parent.page_size != ps:
            raise FormatError(f"parent {ppath} has page size {parent.page_size}, the layer {ps}",
                              section=SECTION, field="page_size", code="bad-value")
        base = ram_sources(parent, parents, known=known, _depth=_depth + 1, _opened=_opened)
    rams = _ram_instances(snap)
    out = {}
    for i, bl in enumerate(info.blobs):
        sec = rams.get(bl["instance"])
        if sec is None:
            raise FormatError(f"blobs[{i}]: RAM section {bl['instance']} missing",
                              section=SECTION, field=f"blobs[{i}].instance", code="notfound")
        out[bl["instance"]] = LayerSource(base.get(bl["instance"]), bl["dirty"],
                                          section_bytes(sec), ps, info.parent_digest)
    for inst, sec in rams.items():
        if inst not in out:
            raise FormatError(f"RAM section {inst} has no bitmap in parent_ref",
                              section=sec.label, code="bad-value")
    return out


# ------------------------------------------------------------------ building

def _add_bulk(snap: Snapshot, instance: int, arr: np.ndarray, *, version=None,
              flags=None) -> Section:
    """Add a RAM section whose bytes are a numpy array (no copy into bytes)."""
    from .registry import by_id
    arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if arr.size % snap.page_size:
        raise EncodeError(f"RAM blob of {arr.size} bytes not a multiple of the page size",
                          section="ram")
    if snap.find("ram", instance) is not None:
        raise EncodeError(f"RAM section {instance} already present", section="ram",
                          code="duplicate")
    kind = by_id(typeids.RAM)
    sec = Section(snap, len(snap.sections), typeids.RAM, instance,
                  kind.version if version is None else version,
                  (L.SEC_F_CRITICAL | L.SEC_F_BULK) if flags is None else flags,
                  crc32c(arr), None, arr.size, arr)
    snap.sections.append(sec)
    snap.__dict__.pop("_idx", None)
    return sec


def _copy_section(out: Snapshot, s: Section) -> None:
    out.add(s.type_id, s.instance, data=bytes(s.data), flags=s.flags, version=s.version)


def _new_like(snap: Snapshot, flags: int) -> Snapshot:
    out = Snapshot(snap.arch, snap.page_size, flags, snap.version, snap.compat_version)
    return out


def _bitmap_bytes(dirty: np.ndarray) -> bytes:
    nw = _bitmap_words(dirty.size)
    bits = np.zeros(nw * 64, bool)
    bits[:dirty.size] = dirty
    return np.packbits(bits, bitorder="little").tobytes()


def _parent_ref_fields(digest: str, file_size: int, name: str, page_size: int,
                       blobs: list[tuple[int, np.ndarray]]) -> dict:
    return {"digest_alg": DIGEST_SHA256, "page_size": page_size, "parent_file_size": file_size,
            "parent_digest": digest, "parent_name": name,
            "blobs": [{"instance": inst, "npages": int(d.size), "ndirty": int(d.sum()),
                       "bitmap": _bitmap_bytes(d).hex()} for inst, d in blobs]}


def _dirty_mask(child: PageSource, base: PageSource | None, chunk_pages: int = 1024) -> np.ndarray:
    n = child.npages
    dirty = np.ones(n, bool)
    nb = base.npages if base is not None else 0
    common = min(n, nb)
    for p0 in range(0, common, chunk_pages):
        p1 = min(p0 + chunk_pages, common)
        dirty[p0:p1] = (child.chunk(p0, p1) != base.chunk(p0, p1)).any(axis=1)
    return dirty


@dataclass
class LayerStats:
    pages: int
    dirty: int
    parent_digest: str


def make_layer(child: Snapshot, parent_path, *, parents=None, name_hint: str | None = None,
               out_dir: str | None = None) -> tuple[Snapshot, LayerStats]:
    """A layer holding ``child``'s state with only the pages that differ from the
    parent file ``parent_path`` (which may itself be a layer).

    ``name_hint`` defaults to the parent's path relative to ``out_dir`` (the
    directory the layer will be written to) or its base name.
    """
    parent_path = os.fspath(parent_path)
    opened: list = []
    parent = load(parent_path)
    opened.append(parent)
    if parent.page_size != child.page_size or parent.arch != child.arch:
        raise FormatError(f"parent is {parent.arch}/page {parent.page_size}, child is "
                          f"{child.arch}/page {child.page_size}", section="header",
                          code="bad-value")
    digest = content_digest(parent_path)
    base_src = ram_sources(parent, parents, _opened=opened)
    child_src = ram_sources(child, parents, _opened=opened)
    if name_hint is None:
        name_hint = os.path.relpath(os.path.abspath(parent_path), out_dir) if out_dir \
            else os.path.basename(parent_path)
    out = _new_like(child, (child.flags | L.HDR_F_DIFF_LAYER))
    blobs = []
    packed = {}
    total = dirty_total = 0
    for inst in sorted(child_src):
        src = child_src[inst]
        dirty = _dirty_mask(src, base_src.get(inst))
        blobs.append((inst, dirty))
        idx = np.flatnonzero(dirty)
        packed[inst] = src.pages(idx) if idx.size else np.zeros((0, child.page_size // 8),
                                                                 np.uint64)
        total += src.npages
        dirty_total += idx.size
    ref_fields = _parent_ref_fields(digest, os.path.getsize(parent_path), name_hint,
                                    child.page_size, blobs)
    ref_added = False
    for s in child.sections:
        if s.type_id == typeids.PARENT_REF:
            continue
        if not ref_added and (s.type_id in (typeids.MEMORY_LAYOUT, typeids.RAM)):
            out.add(SECTION, 0, fields=ref_fields)
            ref_added = True
        if s.type_id == typeids.RAM:
            _add_bulk(out, s.instance, packed[s.instance], version=s.version, flags=s.flags)
        else:
            _copy_section(out, s)
    if not ref_added:
        out.add(SECTION, 0, fields=ref_fields)
    out._layer_keepalive = opened            # parents' mmaps back the packed views
    return out, LayerStats(total, dirty_total, digest)


def rebase(layer: Snapshot, onto_path, *, parents=None, out_dir: str | None = None) -> Snapshot:
    """Merge ``layer`` into its parent ``onto_path``.

    A full parent gives a full snapshot (the layer's state, the merged RAM);
    a parent that is itself a layer gives a layer over the grandparent with
    the union of both bitmaps (the chain gets one link shorter).
    """
    onto_path = os.fspath(onto_path)
    info = parent_info(layer)
    if info is None:
        raise FormatError("not a diff layer (no parent_ref section): nothing to rebase",
                          section="header", field="flags", code="inval")
    got = content_digest(onto_path)
    if got != info.parent_digest:
        raise LayerParentChanged(
            f"{onto_path} has content digest sha256:{got[:16]}..., the layer was made over "
            f"sha256:{info.parent_digest[:16]}... (not its parent, or the base changed)",
            section=SECTION, field="parent_digest")
    opened: list = []
    onto = load(onto_path)
    opened.append(onto)
    srcs = ram_sources(layer, [onto_path, *(parents or [])], _opened=opened)
    onto_info = parent_info(onto)
    flags = layer.flags & ~L.HDR_F_DIFF_LAYER
    if onto_info is not None:
        flags |= L.HDR_F_DIFF_LAYER
        onto_dirty = {bl["instance"]: bl["dirty"] for bl in onto_info.blobs}
    out = _new_like(layer, flags)
    ram_data = {}
    blobs = []
    for inst, src in sorted(srcs.items()):
        if onto_info is None:
            full = np.empty((src.npages, layer.page_size // 8), np.uint64)
            step = 4096
            for p0 in range(0, src.npages, step):
                p1 = min(p0 + step, src.npages)
                full[p0:p1] = src.chunk(p0, p1)
            ram_data[inst] = full
        else:
            d = src.dirty.copy()
            od = onto_dirty.get(inst)
            if od is not None:
                d[:min(d.size, od.size)] |= od[:min(d.size, od.size)]
            idx = np.flatnonzero(d)
            ram_data[inst] = src.pages(idx) if idx.size else \
                np.zeros((0, layer.page_size // 8), np.uint64)
            blobs.append((inst, d))
    ref_added = onto_info is None
    for s in layer.sections:
        if s.type_id == typeids.PARENT_REF:
            if not ref_added:
                out.add(SECTION, 0, fields=_parent_ref_fields(
                    onto_info.parent_digest, onto_info.parent_file_size,
                    _rebased_hint(onto, onto_info, out_dir), layer.page_size, blobs))
                ref_added = True
            continue
        if s.type_id == typeids.RAM:
            _add_bulk(out, s.instance, ram_data[s.instance], version=s.version, flags=s.flags)
        else:
            _copy_section(out, s)
    out._layer_keepalive = opened
    return out


def _rebased_hint(onto: Snapshot, info: ParentRefInfo, out_dir: str | None) -> str:
    """The grandparent's name hint (relative to the parent's directory), made
    relative to the directory the rebased layer is written to."""
    name = info.name.decode("utf-8", "surrogateescape")
    if os.path.isabs(name) or not onto.path or out_dir is None:
        return name
    target = os.path.join(os.path.dirname(os.path.abspath(onto.path)), name)
    return os.path.relpath(target, out_dir)


# ------------------------------------------------------------------ validation

#: Parent candidates for `snapfmt validate --parent` (set by the CLI wrapper).
VALIDATE_PARENTS: list[str] = []


def check_chain(snap: Snapshot, parents=None) -> list[Finding]:
    """Structure of a layer against its own sections, and its parent chain's digests."""
    out: list[Finding] = []
    info_sec = snap.find(SECTION)
    flagged = bool(snap.flags & L.HDR_F_DIFF_LAYER)
    if info_sec is None:
        if flagged:
            out.append(Finding("layer-missing-parent-ref", ERROR, "header.flags",
                               "DIFF_LAYER flag set but no parent_ref section"))
        return out
    if not flagged:
        out.append(Finding("layer-flag-missing", ERROR, "header.flags",
                           "parent_ref section present but the DIFF_LAYER flag is not set"))
    try:
        info = parse(info_sec.data)
    except FormatError:
        return out               # reported by the structural pass
    loc = info_sec.label
    if info.page_size != snap.page_size:
        out.append(Finding("layer-page-size", ERROR, f"{loc}.page_size",
                           f"{info.page_size} != header page_size {snap.page_size}"))
        return out
    rams = _ram_instances(snap)
    try:
        regions = {r["section_instance"]: r for r in snap.memory_regions() if r["backing"] == 0}
    except FormatError:
        regions = {}
    listed = set()
    for i, bl in enumerate(info.blobs):
        inst = bl["instance"]
        listed.add(inst)
        sec = rams.get(inst)
        if sec is None:
            out.append(Finding("layer-ram-missing", ERROR, f"{loc}.blobs[{i}].instance",
                               f"RAM section {inst} not in the file"))
            continue
        want = bl["ndirty"] * snap.page_size
        if sec.length != want:
            out.append(Finding("layer-ram-size", ERROR, sec.label,
                               f"{sec.length} bytes, the bitmap has {bl['ndirty']} dirty pages "
                               f"({want} bytes)"))
        r = regions.get(inst)
        if r is not None and r["memory_size"] != bl["npages"] * snap.page_size:
            out.append(Finding("layer-region-size", ERROR, f"{loc}.blobs[{i}].npages",
                               f"{bl['npages']} pages, memory region of RAM {inst} is "
                               f"{r['memory_size']} bytes"))
    for inst in sorted(set(rams) - listed):
        out.append(Finding("layer-ram-unlisted", ERROR, rams[inst].label,
                           "RAM section has no bitmap in parent_ref"))
    out.extend(_chain_findings(snap, info, parents, loc, 0))
    return out


def _chain_findings(snap, info, parents, loc, depth) -> list[Finding]:
    if depth > 64:
        return [Finding("layer-chain-depth", ERROR, loc, "layer chain deeper than 64")]
    try:
        ppath = find_parent(snap, parents)
    except LayerParentChanged as e:
        return [Finding("layer-parent-changed", ERROR, f"{loc}.parent_digest", e.message)]
    except FormatError as e:
        return [Finding("layer-parent-missing", WARNING, f"{loc}.parent_name",
                        f"{e.message}: the parent digest was not checked")]
    try:
        parent = load(ppath)
    except SnapfmtError as e:
        return [Finding("layer-parent-unreadable", ERROR, f"{loc}.parent_name",
                        f"parent {ppath}: {e}")]
    try:
        out = [Finding("layer-parent-ok", INFO, f"{loc}.parent_digest",
                       f"parent {ppath} matches sha256:{info.parent_digest[:16]}...")]
        pinfo = None
        try:
            pinfo = parent_info(parent)
        except FormatError as e:
            out.append(Finding(e.code, ERROR, f"{ppath}: {e.location}", e.message))
        if pinfo is not None:
            out.extend(_chain_findings(parent, pinfo, parents, f"{ppath}: {SECTION}",
                                       depth + 1))
        for i, bl in enumerate(info.blobs):
            p = parent.find("ram", bl["instance"])
            if p is None and pinfo is None and bl["ndirty"] != bl["npages"]:
                out.append(Finding("layer-parent-ram-missing", ERROR, f"{loc}.blobs[{i}]",
                                   f"clean pages refer to RAM {bl['instance']}, which the "
                                   f"parent does not have"))
            elif p is not None and pinfo is None:
                clean = np.flatnonzero(~bl["dirty"])
                if clean.size and int(clean[-1]) >= p.length // snap.page_size:
                    out.append(Finding("layer-parent-ram-short", ERROR, f"{loc}.blobs[{i}]",
                                       f"clean page {int(clean[-1])} beyond the parent's "
                                       f"{p.length // snap.page_size}-page RAM blob"))
        return out
    finally:
        parent.close()


@check("layers")
def _check_layers(snap):
    return check_chain(snap, VALIDATE_PARENTS)


# ------------------------------------------------------------------ CLI

def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n}"


def cmd_layer(args) -> int:
    child = load(args.child)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    layer, st = make_layer(child, args.parent, parents=args.search or None,
                           name_hint=args.name_hint, out_dir=out_dir)
    layer.save(args.output)
    print(f"{args.output}: layer over {args.parent} (sha256:{st.parent_digest[:16]}...): "
          f"{st.dirty} of {st.pages} pages dirty ({_human(st.dirty * child.page_size)})")
    return 0


def cmd_rebase(args) -> int:
    layer = load(args.child)
    out = rebase(layer, args.onto, parents=args.search or None,
                 out_dir=os.path.dirname(os.path.abspath(args.output)))
    out.save(args.output)
    kind = "layer" if out.flags & L.HDR_F_DIFF_LAYER else "full snapshot"
    print(f"{args.output}: {kind} ({len(out.sections)} sections)")
    return 0


def _wrap_validate(sub) -> None:
    """Give `snapfmt validate` a --parent option for layer chains."""
    v = sub.choices.get("validate")
    if v is None or any("--parent" in a.option_strings for a in v._actions):
        return
    v.add_argument("--parent", action="append", metavar="FILE",
                   help="parent snapshot of a diff layer (repeat for a chain); default: the "
                        "name hint beside the layer")
    inner = v.get_default("func")

    def run(args):
        VALIDATE_PARENTS[:] = args.parent or []
        try:
            return inner(args)
        finally:
            VALIDATE_PARENTS[:] = []
    v.set_defaults(func=run)


def register_cli(sub) -> None:
    s = sub.add_parser("layer", help="make a diff layer: CHILD's pages that differ from PARENT")
    s.add_argument("child", help="full snapshot (or layer) of the child VM")
    s.add_argument("--parent", required=True, help="parent snapshot (full or itself a layer)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--name-hint", help="parent file name stored in the layer (default: the "
                                       "parent's path relative to the output directory)")
    s.add_argument("--search", action="append", metavar="FILE",
                   help="candidate parents for layers further down the chain")
    s.set_defaults(func=cmd_layer)

    s = sub.add_parser("rebase", help="merge a diff layer into its parent (atomic output)")
    s.add_argument("child", help="the diff layer")
    s.add_argument("--onto", required=True, help="its parent snapshot")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--search", action="append", metavar="FILE",
                   help="candidate parents for layers further down the chain")
    s.set_defaults(func=cmd_rebase)
    _wrap_validate(sub)
