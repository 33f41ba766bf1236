"""Global sections: metadata, guest memory layout, RAM blobs."""

from __future__ import annotations

import construct as c

from . import typeids
from .decl import HexBytes
from .errors import EncodeError, FormatError
from .registry import SCOPE_GLOBAL, SCOPE_RAM, SectionKind, register

MAX_META_ENTRIES = 4096
MAX_MEM_REGIONS = 1024

_Str16 = c.PascalString(c.Int16ul, "utf8")

MetadataEntry = c.Struct(
    "key" / _Str16,                              # e.g. "image.digest", "vcpus", "memory_mib"
    "value" / c.PascalString(c.Int32ul, "utf8"),  # free-form UTF-8 value
)

Metadata = c.Struct(
    "created_unix_ns" / c.Int64ul,   # creation time, UTC, nanoseconds since the Unix epoch
    "producer" / _Str16,             # program that wrote the snapshot, e.g. "snapvm"
    "producer_version" / _Str16,     # its version
    "kernel_release" / _Str16,       # host `uname -r` at snapshot time
    "cpu_vendor" / _Str16,           # host CPUID vendor string, e.g. "GenuineIntel"
    "cpu_model" / _Str16,            # host CPU model name
    "template" / c.PrefixedArray(c.Int32ul, MetadataEntry),  # template key/values (order kept)
)

MEM_BACKING_SECTION = 0   # bytes in a RAM section of this file (instance = section_instance)
MEM_BACKING_FILE = 1      # bytes in a sibling file named in the string table
MEM_BACKING_ZERO = 2      # zero-filled anonymous memory
MEM_BACKINGS = {MEM_BACKING_SECTION: "section", MEM_BACKING_FILE: "file", MEM_BACKING_ZERO: "zero"}
MEM_F_READONLY = 1 << 0   # map read-only into the guest (KVM_MEM_READONLY)
MEM_F_KNOWN = MEM_F_READONLY

MemoryRegion = c.Struct(
    "guest_phys_addr" / c.Int64ul,  # guest physical address (page-aligned)
    "memory_size" / c.Int64ul,      # bytes (multiple of the page size)
    "backing" / c.Int32ul,          # 0 = RAM section, 1 = sibling file, 2 = zero
    "flags" / c.Int32ul,            # MEM_F_*
    "section_instance" / c.Int32ul, # backing 0: instance of the RAM section holding the bytes
    "name_len" / c.Int32ul,         # backing 1: length of the file name in the string table
    "name_offset" / c.Int64ul,      # backing 1: offset of the file name in the string table
    "file_offset" / c.Int64ul,      # backing 1: byte offset of the region in that file
    "file_size" / c.Int64ul,        # backing 1: size of that file at snapshot time
    "reserved" / c.Int64ul,         # must be 0
    "sha256" / HexBytes(32),        # backing 1: SHA-256 of the region's bytes; else zero
)

MemoryLayoutHeader = c.Struct(
    "nregions" / c.Int32ul,         # number of MemoryRegion records that follow
    "strings_len" / c.Int32ul,      # bytes of string table after the records
)

MemoryLayout = c.Struct(
    "nregions" / c.Int32ul,
    "strings_len" / c.Int32ul,
    "regions" / c.Array(c.this.nregions, MemoryRegion),
    "strings" / HexBytes(c.this.strings_len),
)


def _decode_metadata(buf: bytes) -> dict:
    try:
        obj = Metadata.parse(buf)
    except (c.ConstructError, UnicodeDecodeError) as e:
        raise FormatError(f"cannot decode: {' '.join(str(e).split())}", section="metadata",
                          code="bad-length") from None
    if len(obj.template) > MAX_META_ENTRIES:
        raise FormatError(f"{len(obj.template)} template entries > limit {MAX_META_ENTRIES}",
                          section="metadata", field="template", code="limit")
    used = len(Metadata.build(obj))
    if used != len(buf):
        raise FormatError(f"{len(buf) - used} trailing bytes after the declared content",
                          section="metadata", offset=used, code="bad-length")
    template: dict[str, str] = {}
    for e in obj.template:
        if e.key in template:
            raise FormatError(f"duplicate template key {e.key!r}", section="metadata",
                              field=f"template.{e.key}", code="bad-value")
        template[e.key] = e.value
    return {"created_unix_ns": obj.created_unix_ns, "producer": obj.producer,
            "producer_version": obj.producer_version, "kernel_release": obj.kernel_release,
            "cpu_vendor": obj.cpu_vendor, "cpu_model": obj.cpu_model, "template": template}


def _encode_metadata(f: dict) -> bytes:
    try:
        tmpl = f.get("template", {})
        obj = dict(created_unix_ns=f["created_unix_ns"], producer=f["producer"],
                   producer_version=f["producer_version"], kernel_release=f["kernel_release"],
                   cpu_vendor=f["cpu_vendor"], cpu_model=f["cpu_model"],
                   template=[dict(key=k, value=str(v)) for k, v in tmpl.items()])
        return Metadata.build(obj)
    except (c.ConstructError, KeyError, TypeError, AttributeError, UnicodeEncodeError) as e:
        raise EncodeError(f"cannot encode: {e}", section="metadata") from None


def _annotate_metadata(f: dict) -> dict:
    import datetime
    t = datetime.datetime.fromtimestamp(f["created_unix_ns"] / 1e9, tz=datetime.timezone.utc)
    return {"created_utc": t.isoformat().replace("+00:00", "Z")}


def _decode_memory_layout(buf: bytes) -> dict:
    if len(buf) < 8:
        raise FormatError("shorter than its 8-byte header", section="memory_layout",
                          code="bad-length")
    n = int.from_bytes(buf[0:4], "little")
    slen = int.from_bytes(buf[4:8], "little")
    if n > MAX_MEM_REGIONS:
        raise FormatError(f"nregions {n} > limit {MAX_MEM_REGIONS}", section="memory_layout",
                          field="nregions", offset=0, code="limit")
    want = 8 + n * MemoryRegion.sizeof() + slen
    if want != len(buf):
        raise FormatError(f"nregions {n} and strings_len {slen} need {want} bytes, "
                          f"section has {len(buf)}", section="memory_layout", field="nregions",
                          code="bad-length")
    obj = MemoryLayout.parse(buf)
    out = {"regions": [], "strings": obj.strings}
    for r in obj.regions:
        out["regions"].append({k: v for k, v in r.items() if not k.startswith("_")})
    return out


def _encode_memory_layout(f: dict) -> bytes:
    try:
        regs = f["regions"]
        strings = f.get("strings", "")
        return MemoryLayout.build(dict(nregions=len(regs), strings_len=len(bytes.fromhex(strings)),
                                       regions=regs, strings=strings))
    except (c.ConstructError, KeyError, TypeError, ValueError) as e:
        raise EncodeError(f"cannot encode: {e}", section="memory_layout") from None


def region_name(layout_fields: dict, region: dict) -> bytes:
    strings = bytes.fromhex(layout_fields["strings"])
    off, ln = region["name_offset"], region["name_len"]
    if off + ln > len(strings):
        raise FormatError(f"name [{off}, {off + ln}) outside string table [0, {len(strings)})",
                          section="memory_layout", field="name_offset", code="bad-offset")
    return strings[off:off + ln]


def _annotate_memory_layout(f: dict) -> dict:
    out = []
    for r in f["regions"]:
        d = {"backing": MEM_BACKINGS.get(r["backing"], f"unknown({r['backing']})"),
             "range": f"[0x{r['guest_phys_addr']:x}, 0x{r['guest_phys_addr'] + r['memory_size']:x})",
             "size_mib": r["memory_size"] / (1 << 20)}
        if r["backing"] == MEM_BACKING_FILE:
            try:
                d["file"] = region_name(f, r).decode("utf-8", "backslashreplace")
            except FormatError as e:
                d["file"] = f"<{e}>"
        out.append(d)
    return {"regions": out}


def _decode_ram(buf: bytes, page_size: int = 4096) -> dict:
    """Sparse JSON form: only non-zero pages, as hex, keyed by page index."""
    pages = {}
    mv = memoryview(buf)
    zero = bytes(page_size)
    for i in range(0, len(buf), page_size):
        p = mv[i:i + page_size]
        if p != zero[:len(p)]:
            pages[str(i // page_size)] = bytes(p).hex()
    return {"size": len(buf), "page_size": page_size, "pages": pages}


def _encode_ram(f: dict) -> bytes:
    try:
        size, ps = int(f["size"]), int(f["page_size"])
        out = bytearray(size)
        for k, hx in f["pages"].items():
            b = bytes.fromhex(hx)
            off = int(k) * ps
            if off + len(b) > size or len(b) > ps:
                raise EncodeError(f"page {k} outside the {size}-byte blob", section="ram",
                                  field=f"pages.{k}")
            out[off:off + len(b)] = b
        return bytes(out)
    except (KeyError, TypeError, ValueError) as e:
        raise EncodeError(f"cannot encode: {e}", section="ram") from None


METADATA = register(SectionKind(
    typeids.METADATA, "metadata", SCOPE_GLOBAL, Metadata,
    "Producer, host and template key/values used to decide when a template is stale.",
    critical=False, decode_fn=_decode_metadata, encode_fn=_encode_metadata,
    annotate_fn=_annotate_metadata))

MEMORY_LAYOUT = register(SectionKind(
    typeids.MEMORY_LAYOUT, "memory_layout", SCOPE_GLOBAL, MemoryLayout,
    "Guest physical memory regions and where their bytes live.",
    decode_fn=_decode_memory_layout, encode_fn=_encode_memory_layout,
    annotate_fn=_annotate_memory_layout))

RAM = register(SectionKind(
    typeids.RAM, "ram", SCOPE_RAM, None,
    "Guest RAM bytes (BULK: page-aligned so a VMM can mmap(MAP_PRIVATE) it from the file).",
    bulk=True, decode_fn=_decode_ram, encode_fn=_encode_ram))
