"""`snapfmt diff`: semantic field diffs, ignore globs, RAM page diff, PNG map, CLI."""

import copy
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import snapfmt
from snapfmt import diff as D
from snapfmt import ramdiff as R
from snapfmt import synth

from conftest import GOLDEN, run_cli

PS = 4096


def _pair(nvcpus=2, ram=1 << 20):
    return synth.x86_snapshot(nvcpus, ram), synth.x86_snapshot(nvcpus, ram)


def _edit(snap, name, inst, fn):
    f = copy.deepcopy(snap.find(name, inst).fields)
    fn(f)
    snap.replace(name, inst, fields=f)


def _paths(res):
    return {c.path: c for s in res.sections for c in s.changes}


def test_identical_snapshots_are_same():
    a, b = _pair()
    r = D.diff_snapshots(a, b)
    assert r.same
    assert all(s.status == "same" for s in r.sections)
    assert r.ram.total("changed") == 0 and r.ram.shared_fraction == 1.0
    assert r.as_dict()["same"] is True


def test_named_registers_and_rflags_bits():
    a, b = _pair()
    _edit(b, "x86.regs", 1, lambda f: f.update(rip=f["rip"] + 0x10, rflags=0x246))
    r = D.diff_snapshots(a, b, ram=False)
    p = _paths(r)
    assert set(p) == {"x86.regs[1].rip", "x86.regs[1].rflags"}
    assert p["x86.regs[1].rip"].a == 0x100010 and p["x86.regs[1].rip"].b == 0x100020
    assert "+PF" in p["x86.regs[1].rflags"].text and "+ZF" in p["x86.regs[1].rflags"].text
    assert not r.same


def test_control_register_bits_and_segments():
    a, b = _pair()

    def ed(f):
        f["cr0"] &= ~2            # MP
        f["cr4"] |= 1 << 7        # PGE already? force a visible change on another bit
        f["cr4"] ^= 1 << 20       # SMEP
        f["efer"] &= ~(1 << 11)   # NXE
        f["cs"]["l"] = 0
        f["cs"]["db"] = 1
    _edit(b, "x86.sregs", 0, ed)
    p = _paths(D.diff_snapshots(a, b, ram=False))
    assert "(-MP)" in p["x86.sregs[0].cr0"].text
    assert "SMEP" in p["x86.sregs[0].cr4"].text
    assert "-NXE" in p["x86.sregs[0].efer"].text
    assert p["x86.sregs[0].cs.l"].a == 1 and p["x86.sregs[0].cs.l"].b == 0
    assert "x86.sregs[0].cs.db" in p


def test_msrs_by_name_added_removed():
    a, b = _pair()

    def ed(f):
        f["entries"][7]["data"] = 0x1234                     # LSTAR
        del f["entries"][3]                                  # SYSENTER_ESP
        f["entries"].append(dict(index=0x3B, reserved=0, data=7))   # TSC_ADJUST
        f["nmsrs"] = len(f["entries"])
    _edit(b, "x86.msrs", 0, ed)
    p = _paths(D.diff_snapshots(a, b, ram=False))
    assert p["x86.msrs[0].LSTAR"].b == 0x1234
    assert p["x86.msrs[0].IA32_SYSENTER_ESP"].text.startswith("removed")
    assert p["x86.msrs[0].IA32_TSC_ADJUST"].text.startswith("added")


def test_lapic_and_ioapic_semantic():
    a, b = _pair()
    regs = bytearray(bytes.fromhex(b.find("x86.lapic", 0).fields["regs"]))
    struct.pack_into("<I", regs, 0x110, 1 << 3)          # ISR vector 0x23
    struct.pack_into("<I", regs, 0x320, 0x000EC)         # LVT timer periodic -> one-shot
    struct.pack_into("<I", regs, 0x3F0, 9)               # an unnamed register word
    b.replace("x86.lapic", 0, fields={"regs": regs.hex()})
    _edit(b, "x86.ioapic", 0, lambda f: f["chip"]["ioapic"]["redirtbl"].__setitem__(
        3, f["chip"]["ioapic"]["redirtbl"][3] & ~(1 << 16)))
    p = _paths(D.diff_snapshots(a, b, ram=False))
    assert p["x86.lapic[0].isr"].text == "+0x23"
    assert p["x86.lapic[0].lvt_timer.timer_mode"].b == "one-shot"
    assert p["x86.lapic[0].reg[0x3f0]"].b == 9
    assert p["x86.ioapic.redirtbl[3].mask"].a == 1 and p["x86.ioapic.redirtbl[3].mask"].b == 0


def test_padding_only_change_is_reported():
    a, b = _pair()
    _edit(b, "x86.sregs", 0, lambda f: f["gdt"].update(padding=[0, 5, 0]))
    r = D.diff_snapshots(a, b, ram=False)
    p = _paths(r)
    assert list(p) == ["x86.sregs[0].(unnamed bytes)"]
    assert "1 byte(s) differ" in p["x86.sregs[0].(unnamed bytes)"].text


def test_ignore_globs_and_volatile():
    a, b = _pair()
    _edit(b, "x86.msrs", 1, lambda f: f["entries"][0].update(data=99))      # IA32_TSC
    _edit(b, "x86.clock", 0, lambda f: f.update(clock=f["clock"] + 1))
    _edit(b, "x86.regs", 1, lambda f: f.update(rax=1, rbx=2))
    _edit(b, "x86.regs", 0, lambda f: f.update(rcx=77))
    r = D.diff_snapshots(a, b, ram=False)
    assert len(_paths(r)) == 5
    r = D.diff_snapshots(a, b, ram=False, ignore_volatile=True)
    assert set(_paths(r)) == {"x86.regs[1].rax", "x86.regs[1].rbx", "x86.regs[0].rcx"}
    assert sum(s.ignored for s in r.sections) == 2
    r = D.diff_snapshots(a, b, ram=False, ignore_volatile=True, ignore=["x86.regs[1].*"])
    assert set(_paths(r)) == {"x86.regs[0].rcx"}
    r = D.diff_snapshots(a, b, ram=False, ignore_volatile=True, ignore=["x86.regs.r?x"])
    assert r.same
    r = D.diff_snapshots(a, b, ram=False, ignore_volatile=True, ignore=["x86.regs"])
    assert r.same


def test_added_removed_and_unknown_sections():
    a = snapfmt.load(GOLDEN / "x86-unknown-ancillary.snap")
    b = snapfmt.loads(a.to_bytes())
    unk = next(s for s in b.sections if s.kind is None)
    data = bytearray(unk.data)
    data[0] ^= 0xFF
    b.replace(unk.type_id, unk.instance, data=bytes(data))
    b.remove(b.find("x86.tsc_khz", 0))
    r = D.diff_snapshots(a, b, ram=False)
    st_ = {s.label: s.status for s in r.sections}
    assert st_["x86.tsc_khz[vcpu 0]"] == "removed"
    assert st_[unk.label] == "changed"
    ch = next(s for s in r.sections if s.label == unk.label).changes
    assert ch[0].path.endswith("(raw)") and "1 byte(s) differ" in ch[0].text
    r2 = D.diff_snapshots(b, a, ram=False)
    assert {s.label: s.status for s in r2.sections}["x86.tsc_khz[vcpu 0]"] == "added"


def test_header_changes():
    a, b = _pair()
    b.flags = 0
    r = D.diff_snapshots(a, b, ram=False)
    assert [c.path for c in r.header] == ["header.flags"]
    assert "-TEMPLATE" in r.header[0].text


def test_devices_and_inode_map_by_path():
    a = snapfmt.load(GOLDEN / "devices.snap")
    b = snapfmt.loads(a.to_bytes())
    _edit(b, "virtio.mmio", 0, lambda f: (f.update(driver_features=f["driver_features"]
                                                   & ~(1 << 29)),
                                          f["queues"][0].update(next_avail=f["queues"][0][
                                              "next_avail"] + 1)))
    _edit(b, "virtiofs.inode_map", 1, lambda f: f["entries"][2].update(ino=4242))
    p = _paths(D.diff_snapshots(a, b, ram=False))
    assert "-RING_EVENT_IDX" in p["virtio.mmio[0].driver_features"].text
    assert "virtio.mmio[0].queues[0].next_avail" in p
    ino = [k for k in p if k.startswith("virtiofs.inode_map[1].entries[")]
    assert ino == ['virtiofs.inode_map[1].entries["/données"].ino'] and p[ino[0]].b == 4242


def test_arm64_registers_and_gic_by_name():
    a = snapfmt.load(GOLDEN / "arm64-2vcpu.snap")
    b = snapfmt.loads(a.to_bytes())
    _edit(b, "arm64.regs", 1, lambda f: f["regs"][3].update(value_lo=f["regs"][3]["value_lo"]
                                                             + 1))
    _edit(b, "arm64.gicv3", 0, lambda f: f["regs"][3].update(value=f["regs"][3]["value"] ^ 1))
    p = _paths(D.diff_snapshots(a, b, ram=False))
    assert "arm64.regs[1].X3" in p
    assert "arm64.gicv3.cpu[0x0].GICR_CTLR" in p


# --------------------------------------------------------------------- RAM

def _ram_pair(npages=256, seed=3):
    rng = np.random.default_rng(seed)
    a = np.zeros((npages, PS // 8), np.uint64)
    nz = rng.random(npages) < 0.5
    a[nz] = rng.integers(1, 2**63, size=(int(nz.sum()), PS // 8), dtype=np.uint64)
    b = a.copy()
    return a, b


def _snap_with_ram(arr, gpa=0):
    s = synth.x86_snapshot(1, PS)
    s.remove(s.find("ram"))
    s.remove(s.find("memory_layout"))
    s.add_ram(gpa, arr.reshape(-1).view(np.uint8).tobytes())
    return s


def test_ram_counts_ranges_zero_and_shared(tmp_path):
    a, b = _ram_pair()
    nz = np.flatnonzero(a.any(axis=1))
    z = np.flatnonzero(~a.any(axis=1))
    b[nz[0]] = 0                      # zeroed
    b[z[0], 5] = 1                    # filled
    b[10:13, 0] ^= np.uint64(1)       # a run of three changed pages (some may be filled)
    b[200, 0] ^= np.uint64(1 << 40)
    changed = np.flatnonzero((a != b).any(axis=1))
    sa, sb = _snap_with_ram(a), _snap_with_ram(b)
    sa.save(tmp_path / "a.snap")
    sb.save(tmp_path / "b.snap")
    r = D.diff_files(tmp_path / "a.snap", tmp_path / "b.snap", sections=False)
    ram = r.ram
    assert ram.total("changed") == changed.size
    assert ram.total("identical") == 256 - changed.size
    same_zero = int((~a.any(axis=1) & ~b.any(axis=1)).sum())
    assert ram.total("zero") == same_zero
    assert ram.total("zeroed") == int((a.any(axis=1) & ~b.any(axis=1)).sum())
    assert ram.total("filled") == int((~a.any(axis=1) & b.any(axis=1)).sum())
    rg = ram.regions[0]
    covered = set()
    for s, e in rg.changed_ranges:
        covered |= set(range(s // PS, e // PS))
    assert covered == set(changed.tolist())
    assert (10 * PS, 13 * PS) in rg.changed_ranges or any(
        s <= 10 * PS and e >= 13 * PS for s, e in rg.changed_ranges)
    assert ram.shared_fraction == pytest.approx((256 - changed.size) / 256)
    assert not r.same


def test_ram_regions_only_in_one_and_size_change():
    a, b = _ram_pair(64)
    sa = _snap_with_ram(a)
    sb = _snap_with_ram(np.concatenate([b, np.ones((16, PS // 8), np.uint64)]))
    sb.add_ram(1 << 30, bytes(PS * 4))
    r = D.diff_snapshots(sa, sb, sections=False)
    by = {rg.gpa: rg for rg in r.ram.regions}
    assert by[0].only_b == 16 and by[0].changed == 0 and by[0].pages == 80
    assert by[1 << 30].only_b == 4 and not by[1 << 30].in_a
    assert not r.same
    r2 = D.diff_snapshots(sb, sa, sections=False)
    assert {rg.gpa: rg.only_a for rg in r2.ram.regions} == {0: 16, 1 << 30: 4}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 39), st.integers(0, PS // 8 - 1),
                          st.integers(0, 2**64 - 1)), max_size=30),
       st.integers(1, 9))
def test_chunked_compare_matches_naive(edits, chunk_pages):
    a = np.zeros((40, PS // 8), np.uint64)
    a[::3, 7] = 5
    b = a.copy()
    for page, word, val in edits:
        b[page, word] = val
    rd = R.compare_sources(R.ArraySource(a.reshape(-1).view(np.uint8), PS),
                           R.ArraySource(b.reshape(-1).view(np.uint8), PS), 0x1000, PS,
                           chunk_bytes=chunk_pages * PS, keep_categories=True)
    naive = [i for i in range(40) if a[i].tobytes() != b[i].tobytes()]
    assert rd.changed == len(naive)
    got = [p for s, e in rd.changed_ranges for p in range((s - 0x1000) // PS,
                                                         (e - 0x1000) // PS)]
    assert got == naive
    zero_both = sum(1 for i in range(40) if not a[i].any() and not b[i].any())
    assert rd.zero == zero_both
    cats = rd.categories
    assert all(cats[i] in (R.CAT_CHANGED, R.CAT_ZEROED, R.CAT_FILLED) for i in naive)
    assert all(cats[i] in (R.CAT_ZERO, R.CAT_SAME) for i in range(40) if i not in naive)


def _png_pixels(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, ctype) == (8, 3)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert (raw[:, 0] == 0).all()
    return w, h, raw[:, 1:].reshape(-1)


def test_ram_map_png(tmp_path):
    a, b = _ram_pair(100)
    b[7, 0] ^= np.uint64(1)
    sa = _snap_with_ram(a)
    sb = _snap_with_ram(np.concatenate([b, np.zeros((4, PS // 8), np.uint64)]))
    sa.save(tmp_path / "a.snap")
    sb.save(tmp_path / "b.snap")
    out = tmp_path / "map.png"
    p = run_cli("diff", "--ram-only", "--ram-map", out, "--ram-map-width", 16,
                tmp_path / "a.snap", tmp_path / "b.snap")
    assert p.returncode == 1, p.stderr
    w, h, px = _png_pixels(out.read_bytes())
    assert (w, h) == (16, 7)
    assert px[7] in (R.CAT_CHANGED, R.CAT_FILLED)
    assert (px[100:104] == R.CAT_ONLY_B).all()
    assert (px[104:] == R.CAT_NONE).all()
    zero = ~a.any(axis=1)
    for i in range(100):
        if i != 7:
            assert px[i] == (R.CAT_ZERO if zero[i] else R.CAT_SAME)


# --------------------------------------------------------------------- CLI

def test_cli_exit_codes_json_and_color(tmp_path):
    a, b = _pair()
    _edit(b, "x86.regs", 0, lambda f: f.update(rflags=0x246))
    a.save(tmp_path / "a.snap")
    b.save(tmp_path / "b.snap")
    same = run_cli("diff", tmp_path / "a.snap", tmp_path / "a.snap")
    assert same.returncode == 0 and same.stdout.rstrip().endswith("same")
    p = run_cli("diff", "--json", tmp_path / "a.snap", tmp_path / "b.snap")
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["same"] is False and doc["summary"]["sections_changed"] == 1
    assert doc["sections"][0]["changes"][0]["path"] == "x86.regs[0].rflags"
    assert doc["ram"]["changed"] == 0
    p = run_cli("diff", "--color", "always", tmp_path / "a.snap", tmp_path / "b.snap")
    assert "\x1b[" in p.stdout and "Summary" in p.stdout
    p = run_cli("diff", tmp_path / "a.snap", tmp_path / "b.snap")
    assert "\x1b[" not in p.stdout
    assert p.stdout.index("Summary") < p.stdout.index("Details")
    p = run_cli("diff", "--ignore", "x86.regs.rflags", tmp_path / "a.snap", tmp_path / "b.snap")
    assert p.returncode == 0
    p = run_cli("diff", "-q", tmp_path / "a.snap", tmp_path / "b.snap")
    assert p.returncode == 1 and p.stdout == ""


def test_cli_trouble_is_one_line_exit_2(tmp_path):
    (tmp_path / "junk").write_bytes(b"not a snapshot at all" * 10)
    p = run_cli("diff", GOLDEN / "x86-4vcpu.snap", tmp_path / "junk")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1
    assert "snapfmt diff: error:" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("diff", GOLDEN / "x86-4vcpu.snap", tmp_path / "missing.snap")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
