"""Golden images: bytes, expected dumps, concrete values; kept forever."""

import json
import subprocess
import sys

import pytest

import snapfmt
from snapfmt import jsonio

from conftest import GOLDEN, ROOT, run_cli

SNAPS = sorted(GOLDEN.glob("*.snap"))


def test_there_are_goldens():
    names = {p.name for p in SNAPS}
    assert {"x86-4vcpu.snap", "x86-unknown-ancillary.snap"} <= names


@pytest.mark.parametrize("path", SNAPS, ids=[p.name for p in SNAPS])
def test_dump_matches_expected_json(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    assert jsonio.dump(snapfmt.load(path)) == expected


@pytest.mark.parametrize("path", SNAPS, ids=[p.name for p in SNAPS])
def test_build_from_expected_json_is_byte_identical(path):
    snap = jsonio.loads_json(path.with_suffix(".json").read_text())
    assert snap.to_bytes() == path.read_bytes()


@pytest.mark.parametrize("path", SNAPS, ids=[p.name for p in SNAPS])
def test_cli_dump_build_roundtrip(path, tmp_path):
    j = tmp_path / "d.json"
    out = tmp_path / "o.snap"
    run_cli("dump", path, "-o", j, check=0)
    run_cli("build", j, "-o", out, check=0)
    assert out.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("path", SNAPS, ids=[p.name for p in SNAPS])
def test_goldens_validate(path):
    findings = snapfmt.validate(snapfmt.load(path))
    assert not snapfmt.has_errors(findings), [str(f) for f in findings]
    assert run_cli("validate", path).returncode == 0


def test_deterministic_goldens_regenerate_identically():
    p = subprocess.run([sys.executable, "tools/make_goldens.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_x86_4vcpu_values():
    snap = snapfmt.load(GOLDEN / "x86-4vcpu.snap")
    assert snap.arch == "x86_64" and snap.is_template
    assert snap.vcpu_indices == [0, 1, 2, 3]
    assert snap.metadata["template"]["vcpus"] == "4"
    assert snap.find("x86.regs", 2).fields["rip"] == 0x100020
    assert snap.find("x86.regs", 3).fields["rax"] == 0x4444
    sregs = snap.find("x86.sregs", 1).fields
    assert sregs["cr0"] == 0x80050033 and sregs["efer"] == 0xD01 and sregs["cs"]["l"] == 1
    msrs = {e["index"]: e["data"] for e in snap.find("x86.msrs", 0).fields["entries"]}
    assert msrs[0xC0000082] == 0xFFFFFFFF81800000
    io = snap.find("x86.ioapic").fields["chip"]["ioapic"]
    assert io["redirtbl"][4] == 0x24 and io["redirtbl"][5] & (1 << 16)
    assert len(snap.find("x86.cpuid2", 0).fields["entries"]) == 8
    ram = snap.guest_ram(0, 16)
    assert bytes(ram[8:16]) == (0x5EED).to_bytes(8, "little")


def test_unknown_ancillary_golden_is_skipped_and_preserved(tmp_path):
    p = GOLDEN / "x86-unknown-ancillary.snap"
    snap = snapfmt.load(p)
    s = snap.find(0xF0000042, 7)
    assert s is not None and s.kind is None and not s.critical and s.version == 3
    assert bytes(s.data).startswith(b"vendor extension")
    # rewrite through the CLI: dump/build keeps it byte for byte
    j = tmp_path / "d.json"
    run_cli("dump", p, "-o", j, check=0)
    doc = json.loads(j.read_text())
    anc = [x for x in doc["sections"] if x["type_id"] == 0xF0000042][0]
    assert anc["raw"] == bytes(s.data).hex() and anc["flag_names"] == ["ANCILLARY"]


def test_real_kvm_golden_values():
    p = GOLDEN / "x86-kvm-real.snap"
    if not p.exists():
        pytest.fail("tests/golden/x86-kvm-real.snap (captured from /dev/kvm) is missing")
    snap = snapfmt.load(p)
    regs = snap.find("x86.regs", 0).fields
    assert regs["rax"] == 0x1122334455667788
    msrs = snap.find("x86.msrs", 0).fields
    assert msrs["nmsrs"] >= 20
    assert snap.find("x86.xsave", 0).length >= 4096
    assert snap.metadata["producer"] == "tools/kvm_capture.py"


@pytest.mark.parametrize("name", ["x86-kvm-real.snap", "x86-unknown-ancillary.snap"])
def test_truncation_at_every_offset_of_golden(name):
    data = (GOLDEN / name).read_bytes()
    for n in range(len(data)):
        with pytest.raises(snapfmt.TruncatedError):
            snapfmt.loads(data[:n])


def test_every_single_bit_flip_in_real_golden_is_detected():
    """Every byte of the header, table and every section, one bit each (rotating)."""
    data = (GOLDEN / "x86-kvm-real.snap").read_bytes()
    snap = snapfmt.loads(data)
    spans = [(0, snap.header_len), (len(data) - 32 * len(snap.sections), len(data))]
    spans += [(s.offset, s.offset + s.length) for s in snap.sections]
    n = 0
    for lo, hi in spans:
        for off in range(lo, hi):
            m = bytearray(data)
            m[off] ^= 1 << (off % 8)
            try:
                bad = snapfmt.loads(bytes(m)).deep_verify()
            except snapfmt.SnapfmtError:
                bad = [True]
            assert bad, f"flip at byte {off} bit {off % 8} not detected"
            n += 1
    assert n > 20000
