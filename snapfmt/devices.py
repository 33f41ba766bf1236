"""Device sections: ``virtio.mmio`` (one virtio-MMIO device + its queues) and
``x86.gsi_routing`` (the KVM_SET_GSI_ROUTING table).

virtio.mmio (scope device, instance = device index), little-endian::

    VirtioMmioHeader   80 bytes   device identity, transport registers, counts
    config             config_len bytes: the device config space
    config_pad         (-config_len) % 8 bytes (kept as written; writers use 0)
    shm_regions[]      shm_count x 24 bytes (virtio shared memory: virtio-fs DAX window)
    queues[]           queue_count x 40 bytes (split virtqueues)

Hard limits: ``queue_count <= 1024``, ``shm_count <= 16``, ``config_len <=
4096`` (LimitError, code "limit"); a length that does not match the counts is
a FormatError with code "bad-length".

x86.gsi_routing (scope vm, x86_64) holds exactly ``struct kvm_irq_routing``:
``u32 nr; u32 flags; struct kvm_irq_routing_entry entries[nr]`` (48 bytes
each: gsi, type, flags, pad, then the 32-byte union ``u``).  The union is
decoded as ``irqchip`` (type 1) or ``msi`` (type 2) with its unused tail kept
as ``reserved`` hex so the round trip is byte-identical; other types keep
the 32 bytes as hex.

Semantic checks (registered with :func:`snapfmt.findings.check`) read the
rings' ``idx`` words straight from the snapshot's guest RAM (a numpy view
of the mmap, no copy) and apply the QUIESCED rule for templates.
"""

from __future__ import annotations

import construct as c
import numpy as np

from . import typeids
from .decl import HexBytes
from .errors import EncodeError, FormatError, LimitError
from .findings import ERROR, INFO, WARNING, Finding, check
from .registry import SCOPE_DEVICE, SCOPE_VM, SectionKind, _clean, register

u8 = c.Int8ul
u16 = c.Int16ul
u32 = c.Int32ul
u64 = c.Int64ul

# ---------------------------------------------------------------------------
# virtio constants
# ---------------------------------------------------------------------------

MAX_QUEUES = 1024
MAX_SHM_REGIONS = 16
MAX_CONFIG_LEN = 4096
MAX_SPLIT_QUEUE_SIZE = 32768

VIRTIO_DEVICE_NAMES = {
    1: "net", 2: "block", 3: "console", 4: "rng", 5: "balloon", 8: "scsi", 9: "9p",
    16: "gpu", 18: "input", 19: "vsock", 20: "crypto", 24: "mem", 25: "sound", 26: "fs",
    27: "pmem", 35: "snd",
}
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_FS = 26

# device status bits (virtio 1.2, 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128
STATUS_NAMES = {0: "ACKNOWLEDGE", 1: "DRIVER", 2: "DRIVER_OK", 3: "FEATURES_OK",
                6: "DEVICE_NEEDS_RESET", 7: "FAILED"}
STATUS_KNOWN = 0xCF

# transport feature bits (virtio 1.2, 6)
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38
F_NOTIF_CONFIG_DATA = 39
F_RING_RESET = 40
FEATURE_NAMES = {F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY", F_ANY_LAYOUT: "ANY_LAYOUT",
                 F_RING_INDIRECT_DESC: "RING_INDIRECT_DESC", F_RING_EVENT_IDX: "RING_EVENT_IDX",
                 F_VERSION_1: "VERSION_1", F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
                 F_RING_PACKED: "RING_PACKED", F_IN_ORDER: "IN_ORDER",
                 F_ORDER_PLATFORM: "ORDER_PLATFORM", F_SR_IOV: "SR_IOV",
                 F_NOTIFICATION_DATA: "NOTIFICATION_DATA", F_NOTIF_CONFIG_DATA: "NOTIF_CONFIG_DATA",
                 F_RING_RESET: "RING_RESET"}

# device-specific feature bits (virtio 1.2, 5.x), for annotations
DEVICE_FEATURE_NAMES = {
    2: {1: "BLK_SIZE_MAX", 2: "BLK_SEG_MAX", 4: "BLK_GEOMETRY", 5: "BLK_RO", 6: "BLK_BLK_SIZE",
        9: "BLK_FLUSH", 10: "BLK_TOPOLOGY", 11: "BLK_CONFIG_WCE", 12: "BLK_MQ",
        13: "BLK_DISCARD", 14: "BLK_WRITE_ZEROES"},
    26: {0: "FS_NOTIFICATION"},
}

# split ring geometry (virtio 1.2, 2.7): alignment and size of each area
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4


def desc_table_size(qsize: int) -> int:
    return 16 * qsize


def avail_ring_size(qsize: int) -> int:
    return 6 + 2 * qsize           # flags, idx, ring[qsize], used_event


def used_ring_size(qsize: int) -> int:
    return 6 + 8 * qsize           # flags, idx, ring[qsize] {id, len}, avail_event


# ---------------------------------------------------------------------------
# virtio.mmio declaration
# ---------------------------------------------------------------------------

VirtioMmioHeader = c.Struct(
    "device_type" / u32,           # virtio device id (2 = block, 26 = fs, ...)
    "irq" / u32,                   # GSI the device interrupt is wired to
    "mmio_base" / u64,             # guest physical base of the MMIO register window
    "mmio_len" / u64,              # its length in bytes
    "device_features" / u64,       # features offered by the device (all 64 bits)
    "driver_features" / u64,       # features acked by the driver
    "status" / u32,                # device status register (STATUS_*)
    "config_generation" / u32,     # ConfigGeneration register
    "interrupt_status" / u32,      # InterruptStatus register (bit 0 used ring, bit 1 config)
    "queue_sel" / u32,             # QueueSel register
    "device_features_sel" / u32,   # DeviceFeaturesSel register
    "driver_features_sel" / u32,   # DriverFeaturesSel register
    "activated" / u8,              # 1 once the VMM activated the device backend
    "reserved0" / HexBytes(3),     # kept as written; writers use 0
    "config_len" / u32,            # bytes of device config space that follow
    "shm_count" / u32,             # VirtioShmRegion records
    "queue_count" / u32,           # VirtioQueue records
)

VirtioShmRegion = c.Struct(
    "id" / u8,                     # shared memory region id (virtio-fs: 0 = DAX cache)
    "reserved" / HexBytes(7),
    "guest_addr" / u64,            # guest physical base
    "length" / u64,                # bytes
)

VirtioQueue = c.Struct(
    "max_size" / u16,              # QueueNumMax offered by the device
    "size" / u16,                  # QueueNum set by the driver
    "ready" / u8,                  # QueueReady
    "event_idx" / u8,              # 1 when VIRTIO_F_RING_EVENT_IDX was negotiated for it
    "reserved0" / HexBytes(2),
    "desc_addr" / u64,             # descriptor table guest address (16-aligned)
    "avail_addr" / u64,            # driver area (avail ring) guest address (2-aligned)
    "used_addr" / u64,             # device area (used ring) guest address (4-aligned)
    "next_avail" / u16,            # next avail ring index the device will read
    "next_used" / u16,             # next used ring index the device will write
    "num_added" / u16,             # used entries added since the last notification
    "reserved1" / HexBytes(2),
)

HEADER_SIZE = VirtioMmioHeader.sizeof()
SHM_SIZE = VirtioShmRegion.sizeof()
QUEUE_SIZE = VirtioQueue.sizeof()
assert HEADER_SIZE == 80 and SHM_SIZE == 24 and QUEUE_SIZE == 40


def _hexlen(ctx, key):
    return len(ctx[key]) // 2


VirtioMmio = c.Struct(
    *VirtioMmioHeader.subcons[:-3],
    "config_len" / c.Rebuild(u32, lambda ctx: _hexlen(ctx, "config")),
    "shm_count" / c.Rebuild(u32, c.len_(c.this.shm_regions)),
    "queue_count" / c.Rebuild(u32, c.len_(c.this.queues)),
    "config" / HexBytes(c.this.config_len),
    "config_pad" / HexBytes(lambda ctx: -ctx.config_len % 8),
    "shm_regions" / c.Array(c.this.shm_count, VirtioShmRegion),
    "queues" / c.Array(c.this.queue_count, VirtioQueue),
)

_HDR_OFF = {}
_o = 0
for _sc in VirtioMmioHeader.subcons:
    _HDR_OFF[_sc.name] = _o
    _o += _sc.sizeof()
del _o, _sc

MMIO = "virtio.mmio"


def check_virtio_mmio(buf) -> int:
    """Structural check: counts vs limits vs length.  Returns the expected length."""
    n = len(buf)
    if n < HEADER_SIZE:
        raise FormatError(f"{n} bytes, shorter than its {HEADER_SIZE}-byte header",
                          section=MMIO, field="length", offset=0, code="bad-length")
    b = bytes(buf[HEADER_SIZE - 12:HEADER_SIZE])
    config_len = int.from_bytes(b[0:4], "little")
    shm_count = int.from_bytes(b[4:8], "little")
    queue_count = int.from_bytes(b[8:12], "little")
    for name, val, lim in (("config_len", config_len, MAX_CONFIG_LEN),
                           ("shm_count", shm_count, MAX_SHM_REGIONS),
                           ("queue_count", queue_count, MAX_QUEUES)):
        if val > lim:
            raise LimitError(f"{name} {val} > limit {lim}", section=MMIO, field=name,
                             offset=_HDR_OFF[name])
    want = (HEADER_SIZE + config_len + (-config_len % 8) + shm_count * SHM_SIZE
            + queue_count * QUEUE_SIZE)
    if want != n:
        raise FormatError(f"config_len {config_len}, shm_count {shm_count} and queue_count "
                          f"{queue_count} need {want} bytes, section has {n}", section=MMIO,
                          field="queue_count", offset=_HDR_OFF["queue_count"],
                          code="bad-length")
    return want


def decode_virtio_mmio(buf) -> dict:
    buf = bytes(buf)
    check_virtio_mmio(buf)
    try:
        return _clean(VirtioMmio.parse(buf))
    except c.ConstructError as e:   # not reachable after the length check; kept defensive
        raise FormatError(f"cannot decode: {' '.join(str(e).split())}", section=MMIO,
                          code="bad-length") from None


_SHM_DEFAULTS = {"reserved": "00" * 7}
_QUEUE_DEFAULTS = {"reserved0": "0000", "reserved1": "0000", "event_idx": 0, "num_added": 0}


def encode_virtio_mmio(fields: dict) -> bytes:
    """Build a virtio.mmio section; counts are derived, reserved fields default to 0."""
    try:
        obj = dict(fields)
        obj.setdefault("reserved0", "000000")
        obj.setdefault("config", "")
        cfg_len = len(obj["config"]) // 2 if isinstance(obj["config"], str) else len(obj["config"])
        obj.setdefault("config_pad", "00" * (-cfg_len % 8))
        obj["shm_regions"] = [{**_SHM_DEFAULTS, **r} for r in obj.get("shm_regions", [])]
        obj["queues"] = [{**_QUEUE_DEFAULTS, **q} for q in obj.get("queues", [])]
        for name, val, lim in (("config_len", cfg_len, MAX_CONFIG_LEN),
                               ("shm_count", len(obj["shm_regions"]), MAX_SHM_REGIONS),
                               ("queue_count", len(obj["queues"]), MAX_QUEUES)):
            if name in fields and fields[name] != val:
                raise EncodeError(f"{name} {fields[name]} does not match the content ({val})",
                                  section=MMIO, field=name)
            if val > lim:
                raise EncodeError(f"{name} {val} > limit {lim}", section=MMIO, field=name)
        if isinstance(obj["config"], (bytes, bytearray)):
            obj["config"] = bytes(obj["config"]).hex()
        out = VirtioMmio.build(obj)
    except (c.ConstructError, KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, EncodeError):
            raise
        raise EncodeError(f"cannot encode: {' '.join(str(e).split())}", section=MMIO) from None
    check_virtio_mmio(out)
    return out


def _bits(value: int, table: dict[int, str]) -> list[str]:
    return [table.get(b, f"bit{b}") for b in range(max(64, value.bit_length())) if value >> b & 1]


def device_name(device_type: int) -> str:
    return VIRTIO_DEVICE_NAMES.get(device_type, f"type {device_type}")


def _annotate_virtio_mmio(f: dict) -> dict:
    names = {**FEATURE_NAMES, **DEVICE_FEATURE_NAMES.get(f["device_type"], {})}
    queues = []
    for q in f["queues"]:
        queues.append({"desc": f"0x{q['desc_addr']:x}", "avail": f"0x{q['avail_addr']:x}",
                       "used": f"0x{q['used_addr']:x}",
                       "in_flight_hint": (q["next_avail"] - q["next_used"]) & 0xFFFF})
    return {
        "device": device_name(f["device_type"]),
        "mmio": f"[0x{f['mmio_base']:x}, 0x{f['mmio_base'] + f['mmio_len']:x})",
        "status": _bits(f["status"], STATUS_NAMES),
        "device_features": _bits(f["device_features"], names),
        "driver_features": _bits(f["driver_features"], names),
        "interrupt_status": _bits(f["interrupt_status"], {0: "USED_BUFFER", 1: "CONFIG_CHANGE"}),
        "shm_regions": [f"id {r['id']}: [0x{r['guest_addr']:x}, "
                        f"0x{r['guest_addr'] + r['length']:x})" for r in f["shm_regions"]],
        "queues": queues,
    }


# ---------------------------------------------------------------------------
# x86.gsi_routing: struct kvm_irq_routing
# ---------------------------------------------------------------------------

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQ_ROUTING_S390_ADAPTER = 3
KVM_IRQ_ROUTING_HV_SINT = 4
KVM_IRQ_ROUTING_XEN_EVTCHN = 5
ROUTING_TYPE_NAMES = {1: "irqchip", 2: "msi", 3: "s390_adapter", 4: "hv_sint", 5: "xen_evtchn"}
KVM_MSI_VALID_DEVID = 1 << 0
KVM_MAX_IRQ_ROUTES = 4096          # include/linux/kvm_host.h
KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2
PIC_NUM_PINS, IOAPIC_NUM_PINS = 8, 24

KvmIrqRoutingIrqchip = c.Struct(
    "irqchip" / u32,               # 0 PIC master, 1 PIC slave, 2 IOAPIC
    "pin" / u32,
    "reserved" / HexBytes(24),     # rest of the 32-byte union (u.pad[8])
)

KvmIrqRoutingMsi = c.Struct(
    "address_lo" / u32,
    "address_hi" / u32,
    "data" / u32,
    "devid" / u32,                 # union { pad; devid } (valid with KVM_MSI_VALID_DEVID)
    "reserved" / HexBytes(16),
)

KvmIrqRoutingEntry = c.Struct(
    "gsi" / u32,
    "type" / u32,                  # KVM_IRQ_ROUTING_*
    "flags" / u32,                 # KVM_MSI_VALID_DEVID
    "pad" / u32,
    "u" / c.Switch(c.this.type, {KVM_IRQ_ROUTING_IRQCHIP: KvmIrqRoutingIrqchip,
                                 KVM_IRQ_ROUTING_MSI: KvmIrqRoutingMsi},
                   default=HexBytes(32)),
)

KvmIrqRoutingHeader = c.Struct(
    "nr" / u32,
    "flags" / u32,
)

KvmIrqRouting = c.Struct(
    "nr" / c.Rebuild(u32, c.len_(c.this.entries)),
    "flags" / u32,
    "entries" / c.Array(c.this.nr, KvmIrqRoutingEntry),
)

ROUTING_ENTRY_SIZE = 48
GSI = "x86.gsi_routing"


def check_gsi_routing(buf) -> int:
    n = len(buf)
    if n < 8:
        raise FormatError(f"{n} bytes, shorter than its 8-byte header", section=GSI,
                          field="nr", offset=0, code="bad-length")
    nr = int.from_bytes(bytes(buf[0:4]), "little")
    if nr > KVM_MAX_IRQ_ROUTES:
        raise LimitError(f"nr {nr} > limit {KVM_MAX_IRQ_ROUTES}", section=GSI, field="nr",
                         offset=0)
    want = 8 + nr * ROUTING_ENTRY_SIZE
    if want != n:
        raise FormatError(f"nr {nr} needs {want} bytes, section has {n}", section=GSI,
                          field="nr", offset=0, code="bad-length")
    return nr


def decode_gsi_routing(buf) -> dict:
    buf = bytes(buf)
    check_gsi_routing(buf)
    try:
        return _clean(KvmIrqRouting.parse(buf))
    except c.ConstructError as e:
        raise FormatError(f"cannot decode: {' '.join(str(e).split())}", section=GSI,
                          code="bad-length") from None


def encode_gsi_routing(fields: dict) -> bytes:
    try:
        entries = fields["entries"]
        if "nr" in fields and fields["nr"] != len(entries):
            raise EncodeError(f"nr {fields['nr']} != {len(entries)} entries", section=GSI,
                              field="nr")
        if len(entries) > KVM_MAX_IRQ_ROUTES:
            raise EncodeError(f"{len(entries)} entries > limit {KVM_MAX_IRQ_ROUTES}",
                              section=GSI, field="entries")
        ents = []
        for e in entries:
            e = dict(e)
            e.setdefault("flags", 0)
            e.setdefault("pad", 0)
            u = e.get("u")
            if isinstance(u, dict):
                u = dict(u)
                if e["type"] == KVM_IRQ_ROUTING_IRQCHIP:
                    u.setdefault("reserved", "00" * 24)
                elif e["type"] == KVM_IRQ_ROUTING_MSI:
                    u.setdefault("devid", 0)
                    u.setdefault("reserved", "00" * 16)
                e["u"] = u
            ents.append(e)
        return KvmIrqRouting.build({"flags": fields.get("flags", 0), "entries": ents})
    except (c.ConstructError, KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, EncodeError):
            raise
        raise EncodeError(f"cannot encode: {' '.join(str(e).split())}", section=GSI) from None


def _annotate_gsi_routing(f: dict) -> dict:
    out = []
    for e in f["entries"]:
        d = {"gsi": e["gsi"], "type": ROUTING_TYPE_NAMES.get(e["type"], f"unknown({e['type']})")}
        u = e["u"]
        if e["type"] == KVM_IRQ_ROUTING_IRQCHIP:
            d["chip"] = {0: "pic-master", 1: "pic-slave", 2: "ioapic"}.get(
                u["irqchip"], f"unknown({u['irqchip']})")
            d["pin"] = u["pin"]
        elif e["type"] == KVM_IRQ_ROUTING_MSI:
            addr = u["address_hi"] << 32 | u["address_lo"]
            d["address"] = f"0x{addr:x}"
            d["dest_id"] = (u["address_lo"] >> 12) & 0xFF
            d["vector"] = u["data"] & 0xFF
            d["delivery_mode"] = (u["data"] >> 8) & 7
            d["trigger"] = "level" if u["data"] >> 15 & 1 else "edge"
        out.append(d)
    return {"entries": out}


VIRTIO_MMIO_KIND = register(SectionKind(
    typeids.VIRTIO_MMIO, MMIO, SCOPE_DEVICE, VirtioMmio,
    "One virtio-MMIO device: transport registers, features, config space, shared memory "
    "regions and split virtqueue state.",
    decode_fn=decode_virtio_mmio, encode_fn=encode_virtio_mmio,
    annotate_fn=_annotate_virtio_mmio, check_fn=check_virtio_mmio,
    extra={"header": VirtioMmioHeader, "shm": VirtioShmRegion, "queue": VirtioQueue,
           "max_queues": MAX_QUEUES, "max_shm": MAX_SHM_REGIONS,
           "max_config": MAX_CONFIG_LEN,
           "length_rule": (
               ("min", HEADER_SIZE),
               ("limit", _HDR_OFF["config_len"], 4, MAX_CONFIG_LEN),
               ("limit", _HDR_OFF["shm_count"], 4, MAX_SHM_REGIONS),
               ("limit", _HDR_OFF["queue_count"], 4, MAX_QUEUES),
               ("exact", HEADER_SIZE, ((_HDR_OFF["config_len"], 4, 1, 8),
                                       (_HDR_OFF["shm_count"], 4, SHM_SIZE),
                                       (_HDR_OFF["queue_count"], 4, QUEUE_SIZE))))}))

GSI_ROUTING_KIND = register(SectionKind(
    typeids.X86_GSI_ROUTING, GSI, SCOPE_VM, KvmIrqRouting,
    "GSI routing table as given to KVM_SET_GSI_ROUTING (header + nr entries).",
    arch="x86_64", kernel_struct="struct kvm_irq_routing", ioctl="KVM_SET_GSI_ROUTING",
    decode_fn=decode_gsi_routing, encode_fn=encode_gsi_routing,
    annotate_fn=_annotate_gsi_routing, check_fn=check_gsi_routing,
    extra={"header": KvmIrqRoutingHeader, "entry_struct": "struct kvm_irq_routing_entry",
           "count_field": "nr", "entries_field": "entries", "max_count": KVM_MAX_IRQ_ROUTES,
           "entry_size": ROUTING_ENTRY_SIZE,
           "length_rule": (("min", 8), ("limit", 0, 4, KVM_MAX_IRQ_ROUTES),
                           ("exact", 8, ((0, 4, ROUTING_ENTRY_SIZE),)))}))


# ---------------------------------------------------------------------------
# Semantic checks
# ---------------------------------------------------------------------------

def _decoded(sec):
    """fields, or None when the decoder rejects the bytes (validate reports that)."""
    try:
        return sec.fields
    except FormatError:
        return None


def _dev_label(sec, f) -> str:
    return f"virtio.mmio[dev {sec.instance}]"


def _region_of(regions, gpa: int, length: int):
    for r in regions:
        base, size = r["guest_phys_addr"], r["memory_size"]
        if base <= gpa and gpa + length <= base + size:
            return r
    return None


VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
_DESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])


def _desc_table(snap, gpa: int, n: int):
    try:
        return snap.guest_ram(gpa, n * 16).view(_DESC)
    except FormatError:
        return None


def _chain_device_writable(snap, table, head: int, limit: int) -> bool:
    """True when every descriptor of the chain at ``head`` is device-writable.

    Indirect tables are followed one level (the spec forbids nesting); loops are
    bounded by the table size, so a hostile ring cannot make this spin.
    """
    i, seen = head, 0
    while True:
        if i >= len(table) or seen > limit:
            return False
        d = table[i]
        flags = int(d["flags"])
        if flags & VRING_DESC_F_INDIRECT:
            ln = int(d["len"])
            if ln % 16 or ln == 0:
                return False
            ind = _desc_table(snap, int(d["addr"]), ln // 16)
            if ind is None or not all(int(x) & VRING_DESC_F_WRITE for x in ind["flags"]):
                return False
        elif not flags & VRING_DESC_F_WRITE:
            return False
        if not flags & VRING_DESC_F_NEXT:
            return True
        i = int(d["next"])
        seen += 1


def _posted_receive_buffers(snap, q, next_avail: int, pending: int, size: int) -> bool:
    """Are the ``pending`` published-but-untaken avail entries all empty receive buffers?

    A driver keeps receive queues (net rx, vsock rx/event, console rx) stocked
    with device-writable buffers even when idle; those are not I/O in flight:
    nothing was submitted to the device, a restored device fills them later.
    A pending chain with any device-readable buffer is a request (tx, block,
    fs) that every child would process again, so it is in flight.
    """
    table = _desc_table(snap, q["desc_addr"], size)
    if table is None:
        return False
    try:
        ring = snap.guest_ram(q["avail_addr"] + 4, 2 * size).view("<u2")
    except FormatError:
        return False
    for k in range(pending):
        head = int(ring[(next_avail + k) % size])
        if not _chain_device_writable(snap, table, head, size):
            return False
    return True


def _u16_at(snap, gpa: int) -> int | None:
    """The little-endian u16 at guest address ``gpa`` (numpy view of the mmap, no copy)."""
    try:
        v = snap.guest_ram(gpa, 2)
    except FormatError:
        return None
    return int(v.view("<u2")[0])


@check("virtio-device")
def check_virtio_devices(snap):
    regions = snap.memory_regions()
    template = bool(snap.flags & 1)
    devs = []
    for sec in snap.all(typeids.VIRTIO_MMIO):
        f = _decoded(sec)
        if f is None:
            continue
        devs.append((sec, f))
        yield from _check_one_device(snap, sec, f, regions, template)
    yield from _check_device_placement(devs, regions)


def _check_one_device(snap, sec, f, regions, template):
    loc = _dev_label(sec, f)
    dname = device_name(f["device_type"])
    offered, acked = f["device_features"], f["driver_features"]
    status = f["status"]
    if f["device_type"] == 0:
        yield Finding("virtio-device-type", ERROR, f"{loc}.device_type",
                      "device type 0 is reserved (no device)")
    extra = acked & ~offered
    if extra:
        yield Finding("virtio-features-not-offered", ERROR, f"{loc}.driver_features",
                      f"driver acked features the device did not offer: "
                      f"{', '.join(_bits(extra, FEATURE_NAMES))} (0x{extra:x})")
    unknown = status & ~STATUS_KNOWN
    if unknown:
        yield Finding("virtio-status-bits", ERROR, f"{loc}.status",
                      f"undefined status bits 0x{unknown:x} set (status 0x{status:x})")
    order = [(STATUS_DRIVER, STATUS_ACKNOWLEDGE, "DRIVER without ACKNOWLEDGE"),
             (STATUS_FEATURES_OK, STATUS_DRIVER, "FEATURES_OK without DRIVER"),
             (STATUS_DRIVER_OK, STATUS_FEATURES_OK, "DRIVER_OK without FEATURES_OK"),
             (STATUS_DRIVER_OK, STATUS_DRIVER, "DRIVER_OK without DRIVER"),
             (STATUS_DRIVER_OK, STATUS_ACKNOWLEDGE, "DRIVER_OK without ACKNOWLEDGE")]
    for bit, need, what in order:
        if status & bit and not status & need:
            yield Finding("virtio-status-order", ERROR, f"{loc}.status",
                          f"{what} (status 0x{status:x}: {', '.join(_bits(status, STATUS_NAMES))})")
    if status & STATUS_FAILED:
        yield Finding("virtio-status-failed", ERROR, f"{loc}.status",
                      f"device {sec.instance} ({dname}) has FAILED set: the driver gave up on it")
    if status & STATUS_DEVICE_NEEDS_RESET:
        yield Finding("virtio-needs-reset", ERROR if template else WARNING, f"{loc}.status",
                      f"device {sec.instance} ({dname}) has DEVICE_NEEDS_RESET set")
    if status & STATUS_FEATURES_OK and not acked >> F_VERSION_1 & 1:
        yield Finding("virtio-legacy", WARNING, f"{loc}.driver_features",
                      "FEATURES_OK without VERSION_1: a virtio-mmio v2 device needs VERSION_1")
    if f["activated"] not in (0, 1):
        yield Finding("virtio-activated", ERROR, f"{loc}.activated",
                      f"activated is {f['activated']}, must be 0 or 1")
    if f["activated"] and not status & STATUS_DRIVER_OK:
        yield Finding("virtio-activated-without-driver-ok", WARNING, f"{loc}.activated",
                      "device backend activated but status lacks DRIVER_OK")
    nq = len(f["queues"])
    if f["queue_sel"] >= nq and nq:
        yield Finding("virtio-queue-sel", INFO, f"{loc}.queue_sel",
                      f"queue_sel {f['queue_sel']} >= {nq} queues (reads return 0)")
    packed = bool(acked >> F_RING_PACKED & 1)
    if packed:
        yield Finding("virtio-packed-ring", WARNING, f"{loc}.driver_features",
                      "RING_PACKED negotiated: ring checks here cover split rings only")
        return
    event_idx = bool(acked >> F_RING_EVENT_IDX & 1)
    features_ok = bool(status & STATUS_FEATURES_OK)
    for qi, q in enumerate(f["queues"]):
        yield from _check_queue(snap, sec, f, qi, q, regions, template, event_idx, features_ok)


def _check_queue(snap, sec, f, qi, q, regions, template, event_idx, features_ok):
    loc = f"{_dev_label(sec, f)}.queues[{qi}]"
    dname = device_name(f["device_type"])
    size, maxs = q["size"], q["max_size"]
    if maxs > MAX_SPLIT_QUEUE_SIZE:
        yield Finding("virtio-queue-size", ERROR, f"{loc}.max_size",
                      f"max_size {maxs} > {MAX_SPLIT_QUEUE_SIZE}")
    if q["ready"] not in (0, 1):
        yield Finding("virtio-queue-ready", ERROR, f"{loc}.ready",
                      f"ready is {q['ready']}, must be 0 or 1")
    if not q["ready"]:
        return
    if features_ok and bool(q["event_idx"]) != event_idx:
        yield Finding("virtio-event-idx", ERROR, f"{loc}.event_idx",
                      f"event_idx {q['event_idx']} but RING_EVENT_IDX is "
                      f"{'' if event_idx else 'not '}negotiated")
    bad_size = False
    if size == 0 or size & (size - 1) or size > MAX_SPLIT_QUEUE_SIZE:
        yield Finding("virtio-queue-size", ERROR, f"{loc}.size",
                      f"size {size} is not a power of two in [1, {MAX_SPLIT_QUEUE_SIZE}]")
        bad_size = True
    if size > maxs:
        yield Finding("virtio-queue-size", ERROR, f"{loc}.size",
                      f"size {size} > max_size {maxs}")
        bad_size = True
    rings_ok = True
    for field, align, length in (("desc_addr", DESC_ALIGN, desc_table_size(size)),
                                 ("avail_addr", AVAIL_ALIGN, avail_ring_size(size)),
                                 ("used_addr", USED_ALIGN, used_ring_size(size))):
        gpa = q[field]
        if gpa % align:
            yield Finding("virtio-ring-align", ERROR, f"{loc}.{field}",
                          f"0x{gpa:x} not {align}-byte aligned")
            rings_ok = False
        if _region_of(regions, gpa, length) is None:
            yield Finding("virtio-ring-outside-ram", ERROR, f"{loc}.{field}",
                          f"[0x{gpa:x}, 0x{gpa + length:x}) not inside one guest RAM region")
            rings_ok = False
    if not rings_ok or bad_size:
        return
    avail_idx = _u16_at(snap, q["avail_addr"] + 2)
    used_idx = _u16_at(snap, q["used_addr"] + 2)
    if avail_idx is None or used_idx is None:
        yield Finding("virtio-ring-not-stored", WARNING, loc,
                      "ring memory is not stored in this file: idx checks skipped")
        return
    na, nu = q["next_avail"], q["next_used"]
    pending = (avail_idx - na) & 0xFFFF
    if pending > size:
        yield Finding("virtio-avail-idx", ERROR, f"{loc}.next_avail",
                      f"device {sec.instance} ({dname}) queue {qi}: avail.idx {avail_idx} is "
                      f"{pending} ahead of next_avail {na}, more than the queue size {size} "
                      f"(guest moved the avail index out of range)")
        return
    inflight = (na - used_idx) & 0xFFFF
    if inflight > size:
        yield Finding("virtio-used-idx", ERROR, f"{loc}.next_used",
                      f"device {sec.instance} ({dname}) queue {qi}: used.idx {used_idx} is "
                      f"{inflight} behind next_avail {na}, more than the queue size {size}")
        return
    posted = bool(pending) and _posted_receive_buffers(snap, q, na, pending, size)
    if template and ((pending and not posted) or used_idx != nu or na != nu):
        parts = []
        if pending and not posted:
            parts.append(f"{pending} request(s) published but not taken "
                         f"(avail.idx {avail_idx} != next_avail {na}) with device-readable "
                         f"buffers: every child would process them again")
        if used_idx != nu:
            parts.append(f"used.idx {used_idx} != next_used {nu}")
        if (na - nu) & 0xFFFF:
            parts.append(f"{(na - nu) & 0xFFFF} request(s) taken but not completed "
                         f"(next_avail {na} != next_used {nu})")
        yield Finding("virtio-inflight", ERROR, loc,
                      f"in-flight I/O at snapshot: device {sec.instance} ({dname}) queue {qi}: "
                      + "; ".join(parts))
    elif template and q["num_added"]:
        yield Finding("virtio-inflight", ERROR, f"{loc}.num_added",
                      f"in-flight I/O at snapshot: device {sec.instance} ({dname}) queue {qi}: "
                      f"{q['num_added']} used entries added but the guest not yet notified")
    elif template and posted:
        yield Finding("virtio-posted-buffers", INFO, loc,
                      f"device {sec.instance} ({dname}) queue {qi}: {pending} empty receive "
                      f"buffer(s) posted by the guest (all descriptors device-writable, not yet "
                      f"taken): not I/O in flight, children fill them after restore")


def _check_device_placement(devs, regions):
    spans = []   # (start, end, description, location or None for guest RAM)
    for sec, f in devs:
        loc = _dev_label(sec, f)
        if f["mmio_len"] == 0:
            yield Finding("virtio-mmio-window", ERROR, f"{loc}.mmio_len", "MMIO window is empty")
        else:
            spans.append((f["mmio_base"], f["mmio_base"] + f["mmio_len"], f"{loc} MMIO window",
                          f"{loc}.mmio_base"))
        ids = set()
        for ri, r in enumerate(f["shm_regions"]):
            rloc = f"{loc}.shm_regions[{ri}]"
            if r["id"] in ids:
                yield Finding("virtio-shm-duplicate-id", ERROR, f"{rloc}.id",
                              f"shared memory id {r['id']} used twice")
            ids.add(r["id"])
            if r["length"]:
                spans.append((r["guest_addr"], r["guest_addr"] + r["length"],
                              f"{rloc} (shm id {r['id']})", f"{rloc}.guest_addr"))
    for r in regions:
        spans.append((r["guest_phys_addr"], r["guest_phys_addr"] + r["memory_size"],
                      f"guest RAM [0x{r['guest_phys_addr']:x}, "
                      f"0x{r['guest_phys_addr'] + r['memory_size']:x})", None))
    spans.sort(key=lambda s: (s[0], s[1]))
    for i, (a0, a1, aw, aloc) in enumerate(spans):
        for b0, b1, bw, bloc in spans[i + 1:]:
            if b0 >= a1:
                break
            if aloc is None and bloc is None:
                continue          # RAM vs RAM: the memory-layout check reports it
            yield Finding("virtio-address-overlap", ERROR, bloc or aloc,
                          f"{bw} [0x{b0:x}, 0x{b1:x}) overlaps {aw} [0x{a0:x}, 0x{a1:x})")
    irqs: dict[int, str] = {}
    for sec, f in devs:
        loc = _dev_label(sec, f)
        if f["irq"] in irqs:
            yield Finding("virtio-irq-shared", WARNING, f"{loc}.irq",
                          f"GSI {f['irq']} also used by {irqs[f['irq']]}")
        irqs.setdefault(f["irq"], loc)


@check("gsi-routing", arch="x86_64")
def check_gsi_routing_table(snap):
    for sec in snap.all(typeids.X86_GSI_ROUTING):
        f = _decoded(sec)
        if f is None:
            continue
        base = sec.label
        if f["flags"]:
            yield Finding("gsi-routing-flags", ERROR, f"{base}.flags",
                          f"flags 0x{f['flags']:x}: KVM_SET_GSI_ROUTING requires 0")
        per_gsi: dict[int, list[tuple[int, dict]]] = {}
        for i, e in enumerate(f["entries"]):
            loc = f"{base}.entries[{i}]"
            if e["gsi"] >= KVM_MAX_IRQ_ROUTES:
                yield Finding("gsi-routing-gsi", ERROR, f"{loc}.gsi",
                              f"gsi {e['gsi']} >= KVM_MAX_IRQ_ROUTES {KVM_MAX_IRQ_ROUTES}")
            if e["flags"] & ~KVM_MSI_VALID_DEVID or (
                    e["flags"] and e["type"] != KVM_IRQ_ROUTING_MSI):
                yield Finding("gsi-routing-entry-flags", ERROR, f"{loc}.flags",
                              f"flags 0x{e['flags']:x} invalid for a "
                              f"{ROUTING_TYPE_NAMES.get(e['type'], 'unknown')} entry")
            elif e["flags"] & KVM_MSI_VALID_DEVID:
                yield Finding("gsi-routing-devid", ERROR, f"{loc}.flags",
                              "KVM_MSI_VALID_DEVID is not supported by KVM on x86")
            if e["type"] == KVM_IRQ_ROUTING_IRQCHIP:
                chip, pin = e["u"]["irqchip"], e["u"]["pin"]
                limit = {0: PIC_NUM_PINS, 1: PIC_NUM_PINS, 2: IOAPIC_NUM_PINS}.get(chip)
                if limit is None:
                    yield Finding("gsi-routing-irqchip", ERROR, f"{loc}.u.irqchip",
                                  f"irqchip {chip} unknown (0 PIC master, 1 PIC slave, 2 IOAPIC)")
                elif pin >= limit:
                    yield Finding("gsi-routing-pin", ERROR, f"{loc}.u.pin",
                                  f"pin {pin} >= {limit} pins of irqchip {chip}")
            elif e["type"] == KVM_IRQ_ROUTING_MSI:
                lo = e["u"]["address_lo"]
                if (lo >> 20) != 0xFEE:
                    yield Finding("gsi-routing-msi-address", WARNING, f"{loc}.u.address_lo",
                                  f"MSI address 0x{lo:08x} outside the 0xfee00000 window")
            else:
                yield Finding("gsi-routing-type", ERROR, f"{loc}.type",
                              f"routing type {e['type']} "
                              f"({ROUTING_TYPE_NAMES.get(e['type'], 'unknown')}) not valid on x86 KVM"
                              if e["type"] not in (KVM_IRQ_ROUTING_HV_SINT,
                                                   KVM_IRQ_ROUTING_XEN_EVTCHN)
                              else f"routing type {ROUTING_TYPE_NAMES[e['type']]} is not "
                                   f"restorable by snapfmt VMMs")
            per_gsi.setdefault(e["gsi"], []).append((i, e))
        for gsi, ents in per_gsi.items():
            # KVM (setup_routing_entry): several routes per GSI only when all are irqchip
            # routes to different chips.
            seen_chips: dict[int, int] = {}
            for i, e in ents:
                if len(ents) > 1 and e["type"] != KVM_IRQ_ROUTING_IRQCHIP:
                    yield Finding("gsi-routing-conflict", ERROR, f"{base}.entries[{i}]",
                                  f"gsi {gsi} has {len(ents)} routes and this one is not "
                                  f"an irqchip route (KVM rejects it)")
                elif e["type"] == KVM_IRQ_ROUTING_IRQCHIP:
                    chip = e["u"]["irqchip"]
                    if chip in seen_chips:
                        yield Finding("gsi-routing-conflict", ERROR, f"{base}.entries[{i}]",
                                      f"gsi {gsi} routed twice to irqchip {chip} (also "
                                      f"entries[{seen_chips[chip]}])")
                    seen_chips.setdefault(chip, i)
