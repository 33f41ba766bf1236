"""virtio.mmio and x86.gsi_routing: layout, round trip, every check triggered by
mangling one field of the devices golden, hypothesis on the decoders."""

import copy
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import snapfmt
from snapfmt import devices as D
from snapfmt.errors import SnapfmtError

from conftest import GOLDEN

GOLD = GOLDEN / "devices.snap"


def golden():
    return snapfmt.loads(GOLD.read_bytes())


def codes(snap, severity=None):
    return {f.code for f in snapfmt.validate(snap)
            if severity is None or f.severity == severity}


def findings(snap, code):
    return [f for f in snapfmt.validate(snap) if f.code == code]


def with_fields(snap, name, inst, fn):
    f = copy.deepcopy(snap.find(name, inst).fields)
    for count in ("queue_count", "shm_count", "config_len", "nr"):   # derived on encode
        f.pop(count, None)
    fn(f)
    snap.replace(name, inst, fields=f)
    return snap


def poke_ram(snap, gpa, fmt, *vals):
    ram = bytearray(snap.find("ram", 0).data)
    struct.pack_into(fmt, ram, gpa, *vals)
    snap.replace("ram", 0, data=bytes(ram))
    return snap


# ---------------------------------------------------------------- layout

def test_sizes_and_registration():
    assert (D.HEADER_SIZE, D.SHM_SIZE, D.QUEUE_SIZE, D.ROUTING_ENTRY_SIZE) == (80, 24, 40, 48)
    from snapfmt import registry
    assert registry.by_name("virtio.mmio").type_id == 0x0300
    k = registry.by_name("x86.gsi_routing")
    assert k.type_id == 0x0184 and k.arch == "x86_64" and k.scope == "vm"
    assert k.kernel_struct == "struct kvm_irq_routing"


def test_golden_is_clean_and_quiesced():
    snap = golden()
    assert snap.is_template
    bad = [str(f) for f in snapfmt.validate(snap) if f.severity != "info"]
    assert bad == []
    blk = snap.find("virtio.mmio", 0).fields
    q = blk["queues"][0]
    assert (q["size"], q["next_avail"], q["next_used"], q["event_idx"]) == (16, 5, 5, 1)
    # the ring words really are in guest RAM
    assert int(snap.guest_ram(q["avail_addr"] + 2, 2).view("<u2")[0]) == 5
    assert int(snap.guest_ram(q["used_addr"] + 2, 2).view("<u2")[0]) == 5
    fs = snap.find("virtio.mmio", 1).fields
    assert fs["device_type"] == 26 and fs["shm_regions"][0]["length"] == 64 << 20
    assert bytes.fromhex(fs["config"])[:6] == b"golden"
    assert len(bytes.fromhex(blk["config"])) == 28 and blk["config_pad"] == "00000000"


@pytest.mark.parametrize("name,inst", [("virtio.mmio", 0), ("virtio.mmio", 1),
                                       ("x86.gsi_routing", 0)])
def test_roundtrip_byte_identical(name, inst):
    sec = golden().find(name, inst)
    raw = sec.data.tobytes()
    assert sec.kind.encode(sec.kind.decode(raw)) == raw


def test_roundtrip_keeps_reserved_and_padding_bytes():
    raw = bytearray(golden().find("virtio.mmio", 0).data)
    raw[D._HDR_OFF["reserved0"]] = 0xAB
    raw[D.HEADER_SIZE + 28] = 0xCD                 # config_pad
    k = D.VIRTIO_MMIO_KIND
    f = k.decode(bytes(raw))
    assert f["reserved0"] == "ab0000" and f["config_pad"] == "cd000000"
    assert k.encode(f) == bytes(raw)


def test_gsi_union_decoded_by_type():
    f = golden().find("x86.gsi_routing").fields
    assert f["nr"] == 24 + 16 + 1
    e0 = f["entries"][0]
    assert e0["type"] == 1 and e0["u"]["irqchip"] == 0 and e0["u"]["pin"] == 0
    msi = f["entries"][-1]
    assert msi["u"]["address_lo"] == 0xFEE00000 and msi["u"]["data"] == 0x4041
    ann = D.GSI_ROUTING_KIND.annotate(f)
    assert ann["entries"][-1]["vector"] == 0x41 and ann["entries"][-1]["type"] == "msi"


# ---------------------------------------------------------------- structural errors

def _mmio_raw():
    return bytearray(golden().find("virtio.mmio", 1).data)


@pytest.mark.parametrize("field,value,code", [
    ("queue_count", 3, "bad-length"), ("shm_count", 0, "bad-length"),
    ("config_len", 41, "bad-length"), ("queue_count", 1025, "limit"),
    ("shm_count", 17, "limit"), ("config_len", 4097, "limit")])
def test_virtio_counts_vs_length(field, value, code):
    raw = _mmio_raw()
    struct.pack_into("<I", raw, D._HDR_OFF[field], value)
    with pytest.raises(snapfmt.FormatError) as ei:
        D.VIRTIO_MMIO_KIND.decode(bytes(raw))
    assert ei.value.code == code
    assert ei.value.field == (field if code == "limit" else "queue_count")


def test_virtio_truncated_and_trailing():
    raw = bytes(_mmio_raw())
    for bad in (raw[:79], raw[:-1], raw + b"\0" * 8):
        with pytest.raises(snapfmt.FormatError) as ei:
            D.VIRTIO_MMIO_KIND.decode(bad)
        assert ei.value.code == "bad-length"


def test_load_rejects_bad_length_with_absolute_offset():
    snap = golden()
    sec = snap.find("virtio.mmio", 1)
    raw = bytearray(sec.data)
    struct.pack_into("<I", raw, D._HDR_OFF["queue_count"], 7)
    snap.replace("virtio.mmio", 1, data=bytes(raw))
    b = snap.to_bytes()
    with pytest.raises(snapfmt.FormatError) as ei:
        snapfmt.loads(b)
    e = ei.value
    assert e.code == "bad-length" and e.section.startswith("virtio.mmio")
    off = snapfmt.loads(b, strict=False).find("virtio.mmio", 1).offset
    assert e.offset == off + D._HDR_OFF["queue_count"]


def test_gsi_counts():
    raw = bytearray(golden().find("x86.gsi_routing").data)
    struct.pack_into("<I", raw, 0, 40)
    with pytest.raises(snapfmt.FormatError) as ei:
        D.GSI_ROUTING_KIND.decode(bytes(raw))
    assert ei.value.code == "bad-length"
    struct.pack_into("<I", raw, 0, 4097)
    with pytest.raises(snapfmt.LimitError):
        D.GSI_ROUTING_KIND.decode(bytes(raw))


def test_encode_rejects_inconsistent_counts():
    f = golden().find("virtio.mmio", 0).fields
    with pytest.raises(snapfmt.EncodeError):
        D.VIRTIO_MMIO_KIND.encode({**f, "queue_count": 2})
    with pytest.raises(snapfmt.EncodeError):
        D.VIRTIO_MMIO_KIND.encode({**f, "queues": f["queues"] * 1025})


# ---------------------------------------------------------------- semantic checks

def _q(f, i=0):
    return f["queues"][i]


MANGLES = [
    # (code, severity, section instance, fields mutator)
    ("virtio-features-not-offered", "error", 0,
     lambda f: f.update(driver_features=f["driver_features"] | 1 << 40)),
    ("virtio-status-bits", "error", 0, lambda f: f.update(status=f["status"] | 0x10)),
    ("virtio-status-order", "error", 0, lambda f: f.update(status=0x7)),
    ("virtio-status-order", "error", 0, lambda f: f.update(status=0x2)),
    ("virtio-status-failed", "error", 0, lambda f: f.update(status=f["status"] | 0x80)),
    ("virtio-needs-reset", "error", 0, lambda f: f.update(status=f["status"] | 0x40)),
    ("virtio-legacy", "warning", 1, lambda f: f.update(driver_features=0)),
    ("virtio-device-type", "error", 1, lambda f: f.update(device_type=0)),
    ("virtio-activated", "error", 1, lambda f: f.update(activated=2)),
    ("virtio-activated-without-driver-ok", "warning", 1, lambda f: f.update(status=0xB)),
    ("virtio-queue-sel", "info", 1, lambda f: f.update(queue_sel=9)),
    ("virtio-queue-size", "error", 0, lambda f: _q(f).update(size=12)),
    ("virtio-queue-size", "error", 0, lambda f: _q(f).update(size=512)),
    ("virtio-queue-size", "error", 0, lambda f: _q(f).update(max_size=40000)),
    ("virtio-queue-ready", "error", 0, lambda f: _q(f).update(ready=3)),
    ("virtio-event-idx", "error", 0, lambda f: _q(f).update(event_idx=0)),
    ("virtio-ring-align", "error", 0, lambda f: _q(f).update(desc_addr=_q(f)["desc_addr"] + 8)),
    ("virtio-ring-align", "error", 0, lambda f: _q(f).update(used_addr=_q(f)["used_addr"] + 2)),
    ("virtio-ring-align", "error", 1, lambda f: _q(f, 1).update(avail_addr=0x12101)),
    ("virtio-ring-outside-ram", "error", 0, lambda f: _q(f).update(used_addr=0x3FFF0)),
    ("virtio-ring-outside-ram", "error", 1, lambda f: _q(f, 1).update(desc_addr=1 << 40)),
    ("virtio-inflight", "error", 0, lambda f: _q(f).update(next_used=4)),
    ("virtio-inflight", "error", 0, lambda f: _q(f).update(num_added=1)),
    ("virtio-packed-ring", "warning", 0,
     lambda f: f.update(device_features=f["device_features"] | 1 << 34,
                        driver_features=f["driver_features"] | 1 << 34)),
    ("virtio-mmio-window", "error", 1, lambda f: f.update(mmio_len=0)),
    ("virtio-address-overlap", "error", 1,
     lambda f: f["shm_regions"][0].update(guest_addr=0x1000)),
    ("virtio-address-overlap", "error", 1, lambda f: f.update(mmio_base=0xD0000800)),
    ("virtio-shm-duplicate-id", "error", 1,
     lambda f: f["shm_regions"].append(dict(id=0, guest_addr=0x2_0000_0000, length=4096))),
    ("virtio-irq-shared", "warning", 1, lambda f: f.update(irq=5)),
]


def test_golden_has_none_of_the_mangle_codes():
    assert not codes(golden()) & {m[0] for m in MANGLES}


@pytest.mark.parametrize("code,severity,inst,fn", MANGLES,
                         ids=[f"{m[0]}-{i}" for i, m in enumerate(MANGLES)])
def test_virtio_rule(code, severity, inst, fn):
    snap = with_fields(golden(), "virtio.mmio", inst, fn)
    got = findings(snap, code)
    assert got, [str(f) for f in snapfmt.validate(snap)]
    assert {f.severity for f in got} == {severity}
    assert all(f.location.startswith(f"virtio.mmio[dev ") for f in got)


def test_inflight_avail_published_not_taken():
    snap = golden()
    q = snap.find("virtio.mmio", 0).fields["queues"][0]
    poke_ram(snap, q["avail_addr"] + 2, "<H", 7)          # guest published 2 more requests
    got = findings(snap, "virtio-inflight")
    assert len(got) == 1 and got[0].severity == "error"
    assert got[0].message.startswith("in-flight I/O at snapshot: device 0 (block) queue 0")
    assert "2 request(s) published but not taken" in got[0].message
    assert got[0].location == "virtio.mmio[dev 0].queues[0]"
    # the same state is fine when the snapshot is not a template
    snap.flags = 0
    assert not findings(snap, "virtio-inflight")


def test_inflight_on_fs_request_queue():
    snap = golden()
    q = snap.find("virtio.mmio", 1).fields["queues"][1]
    poke_ram(snap, q["used_addr"] + 2, "<H", 2)             # device completed one fewer
    got = findings(snap, "virtio-inflight")
    assert len(got) == 1
    assert "device 1 (fs) queue 1" in got[0].message and "used.idx 2 != next_used 3" in \
        got[0].message


def test_avail_index_out_of_range_like_qemu():
    snap = golden()
    q = snap.find("virtio.mmio", 0).fields["queues"][0]
    poke_ram(snap, q["avail_addr"] + 2, "<H", (5 + 17) & 0xFFFF)   # 17 > size 16
    got = findings(snap, "virtio-avail-idx")
    assert len(got) == 1 and got[0].location.endswith("queues[0].next_avail")
    assert not findings(snap, "virtio-inflight")        # reported once, as the worse problem
    # wrap-around is fine: next_avail 65535, avail.idx 3 -> 4 pending
    snap = golden()
    with_fields(snap, "virtio.mmio", 0, lambda f: _q(f).update(next_avail=65535, next_used=65535))
    poke_ram(snap, q["avail_addr"] + 2, "<H", 3)
    poke_ram(snap, q["used_addr"] + 2, "<H", 65535)
    snap.flags = 0
    assert not codes(snap) & {"virtio-avail-idx", "virtio-used-idx"}


def test_used_index_out_of_range():
    snap = golden()
    q = snap.find("virtio.mmio", 0).fields["queues"][0]
    poke_ram(snap, q["used_addr"] + 2, "<H", (5 - 17) & 0xFFFF)
    assert findings(snap, "virtio-used-idx")


def test_not_ready_queue_is_not_checked():
    snap = with_fields(golden(), "virtio.mmio", 0,
                       lambda f: _q(f).update(ready=0, size=3, desc_addr=1))
    assert not codes(snap) & {"virtio-queue-size", "virtio-ring-align"}


def test_ring_reads_are_zero_copy_views():
    snap = snapfmt.load(GOLD)
    q = snap.find("virtio.mmio", 0).fields["queues"][0]
    v = snap.guest_ram(q["avail_addr"], 4)
    assert not v.flags.owndata and not v.flags.writeable


GSI_MANGLES = [
    ("gsi-routing-flags", lambda f: f.update(flags=1)),
    ("gsi-routing-gsi", lambda f: f["entries"][-1].update(gsi=5000)),
    ("gsi-routing-entry-flags", lambda f: f["entries"][0].update(flags=1)),
    ("gsi-routing-entry-flags", lambda f: f["entries"][-1].update(flags=2)),
    ("gsi-routing-devid", lambda f: f["entries"][-1].update(flags=1)),
    ("gsi-routing-irqchip", lambda f: f["entries"][0]["u"].update(irqchip=3)),
    ("gsi-routing-pin", lambda f: f["entries"][1]["u"].update(pin=24)),
    ("gsi-routing-pin", lambda f: f["entries"][0]["u"].update(pin=8)),
    ("gsi-routing-msi-address", lambda f: f["entries"][-1]["u"].update(address_lo=0x1000)),
    ("gsi-routing-type", lambda f: f["entries"].append(dict(gsi=30, type=3, flags=0, pad=0,
                                                              u="00" * 32))),
    ("gsi-routing-conflict", lambda f: f["entries"][-1].update(gsi=0)),
    ("gsi-routing-conflict", lambda f: f["entries"][1]["u"].update(irqchip=0)),
]


def test_golden_gsi_clean():
    assert not {c for c in codes(golden()) if c.startswith("gsi-")}


@pytest.mark.parametrize("code,fn", GSI_MANGLES, ids=[f"{m[0]}-{i}" for i, m in
                                                      enumerate(GSI_MANGLES)])
def test_gsi_rule(code, fn):
    snap = with_fields(golden(), "x86.gsi_routing", 0, fn)
    got = findings(snap, code)
    assert got and all(f.severity in ("error", "warning") for f in got)
    assert all(f.location.startswith("x86.gsi_routing") for f in got)


# ---------------------------------------------------------------- hypothesis

_GOOD = None


def _good_sections():
    global _GOOD
    if _GOOD is None:
        s = golden()
        _GOOD = [s.find("virtio.mmio", 0).data.tobytes(), s.find("virtio.mmio", 1).data.tobytes(),
                 s.find("x86.gsi_routing").data.tobytes()]
    return _GOOD


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_decoders_only_raise_snapfmt_errors_on_random_bytes(b):
    for k in (D.VIRTIO_MMIO_KIND, D.GSI_ROUTING_KIND):
        try:
            f = k.decode(b)
        except SnapfmtError:
            continue
        assert k.encode(f) == b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                   min_size=1, max_size=6), st.integers(-9, 9))
def test_decoders_on_mutated_sections(which, flips, resize):
    b = bytearray(_good_sections()[which])
    for pos, val in flips:
        b[pos % len(b)] = val
    if resize > 0:
        b += bytes(resize)
    elif resize < 0:
        del b[resize:]
    b = bytes(b)
    k = (D.VIRTIO_MMIO_KIND, D.VIRTIO_MMIO_KIND, D.GSI_ROUTING_KIND)[which]
    try:
        f = k.decode(b)
    except SnapfmtError:
        return
    assert k.encode(f) == b
    k.annotate(f)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_checks_never_crash_on_mutated_devices(flips):
    snap = golden()
    raw = bytearray(snap.find("virtio.mmio", 0).data)
    for pos, val in flips:
        raw[D.HEADER_SIZE - 12 + pos % (len(raw) - D.HEADER_SIZE + 12)
            if pos % 2 else pos % len(raw)] = val
    snap.replace("virtio.mmio", 0, data=bytes(raw))
    for f in snapfmt.validate(snap):          # decode problems become findings, never raise
        assert f.severity in ("error", "warning", "info")


def test_golden_regenerates_identically():
    import subprocess
    import sys
    from conftest import ROOT
    p = subprocess.run([sys.executable, "tools/make_golden_devices.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def _post(snap, dev, qi, buffers_writable):
    """Guest posts 2 one-descriptor buffers (free descriptors 14, 15) the device has not taken."""
    q = snap.find("virtio.mmio", dev).fields["queues"][qi]
    na, size = q["next_avail"], q["size"]
    flags = 2 if buffers_writable else 0                   # VRING_DESC_F_WRITE
    for k, d in enumerate((14, 15)):
        poke_ram(snap, q["desc_addr"] + 16 * d, "<QIHH", 0x80000 + 0x1000 * k, 0x1000, flags, 0)
        poke_ram(snap, q["avail_addr"] + 4 + 2 * ((na + k) % size), "<H", d)
    poke_ram(snap, q["avail_addr"] + 2, "<H", (na + 2) & 0xFFFF)
    return q


def test_posted_receive_buffers_are_not_in_flight():
    """An idle rx queue keeps empty device-writable buffers posted: allowed in a template."""
    snap = golden()
    _post(snap, 0, 0, buffers_writable=True)
    assert not findings(snap, "virtio-inflight")
    info = findings(snap, "virtio-posted-buffers")
    assert len(info) == 1 and info[0].severity == "info"
    assert "2 empty receive buffer(s)" in info[0].message


def test_posted_request_with_readable_buffer_is_in_flight():
    snap = golden()
    _post(snap, 0, 0, buffers_writable=False)
    got = findings(snap, "virtio-inflight")
    assert len(got) == 1 and "device-readable" in got[0].message


def test_posted_chain_with_descriptor_loop_is_in_flight_not_a_hang():
    snap = golden()
    q = _post(snap, 0, 0, buffers_writable=True)
    poke_ram(snap, q["desc_addr"] + 16 * 14, "<QIHH", 0x80000, 0x1000, 2 | 1, 14)  # NEXT -> itself
    got = findings(snap, "virtio-inflight")
    assert len(got) == 1
