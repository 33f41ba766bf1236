"""tools/kvm_capture.py: ioctl numbers vs <linux/kvm.h>, real /dev/kvm capture, golden blobs.

The /dev/kvm tests skip with a reason when /dev/kvm is not usable, unless
SNAPFMT_REQUIRE_KVM=1 (then they fail).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

import snapfmt
from snapfmt import jsonio, kvm_x86 as kx, registry

from conftest import GOLDEN, ROOT, require_kvm

CC = shutil.which("gcc") or shutil.which("cc")


def _load_tool():
    spec = importlib.util.spec_from_file_location("kvm_capture", ROOT / "tools" / "kvm_capture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cap = _load_tool()


@pytest.mark.skipif(CC is None or not os.path.exists("/usr/include/linux/kvm.h"),
                    reason="needs a C compiler and <linux/kvm.h>")
def test_ioctl_numbers_match_kernel_headers(tmp_path):
    names = sorted(cap.IOCTLS)
    src = tmp_path / "ioctls.c"
    exe = tmp_path / "ioctls"
    body = "\n".join(f'  printf("%s %lu\\n", "{n}", (unsigned long)({n}));' for n in names)
    src.write_text("#include <stdio.h>\n#include <linux/kvm.h>\nint main(void) {\n"
                   f"{body}\n  return 0;\n}}\n")
    subprocess.run([CC, "-Wall", "-Werror", "-o", str(exe), str(src)], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = {n: int(v) for n, v in (line.split() for line in out.splitlines())}
    assert {n: cap.IOCTLS[n] for n in names} == got


def test_ioc_encoding_rejects_oversized_struct():
    with pytest.raises(ValueError):
        cap._IOR(0x81, 1 << 14)


def _check_blobs_decode(blobs: dict[str, dict[int, bytes]]) -> None:
    """Every captured blob decodes with its declaration and re-encodes byte-identically."""
    for name, per in blobs.items():
        kind = registry.by_name(name)
        assert kind is not None and kind.arch == "x86_64", name
        for inst, data in per.items():
            fields = kind.decode(data)
            assert kind.encode(fields) == data, f"{name}[{inst}]"
            json.dumps(kind.annotate(fields))
            if kind.check_fn is not None:
                kind.check_fn(data)
    assert set(blobs) == {k.name for k in kx.X86_KINDS}


@pytest.fixture(scope="module")
def captured():
    require_kvm()
    return cap.capture(2)


def test_capture_regs_read_back_equal_what_was_set(captured):
    for i in (0, 1):
        assert kx.REGS.decode(captured["x86.regs"][i]) == cap.regs_for(i)
    assert kx.REGS.decode(captured["x86.regs"][0])["rax"] == 0x1122334455667788


def test_capture_every_blob_decodes(captured):
    _check_blobs_decode(captured)
    assert set(captured["x86.regs"]) == {0, 1} and set(captured["x86.pic"]) == {0, 1}


def test_capture_state_is_what_was_loaded(captured):
    for i in (0, 1):
        s = kx.SREGS.decode(captured["x86.sregs"][i])
        want = cap.long_mode_sregs(s)
        assert (s["cr0"], s["cr4"], s["efer"]) == (want["cr0"], want["cr4"], want["efer"])
        assert s["cs"]["l"] == 1 and s["cs"]["selector"] == want["cs"]["selector"]
        assert kx.SREGS.annotate(s)["mode"].startswith("long")
        msrs = {int(e["index"]): int(e["data"]) for e in kx.msr_entries(captured["x86.msrs"][i])}
        for idx, val in cap.msrs_for(i).items():
            assert msrs[idx] == val, kx.msr_name(idx)
        xs = kx.XSAVE.annotate(kx.XSAVE.decode(captured["x86.xsave"][i]))
        assert xs["xmm"][0] == "0x" + cap.XMM0_VALUE[::-1].hex()
        lapic = kx.LAPIC.annotate(kx.LAPIC.decode(captured["x86.lapic"][i]))
        assert lapic["id"] == i
        cpuid = kx.cpuid_entries(captured["x86.cpuid2"][i])
        leaf1 = cpuid[cpuid["function"] == 1][0]
        assert int(leaf1["ebx"]) >> 24 == i
    assert kx.LAPIC.annotate(kx.LAPIC.decode(captured["x86.lapic"][0]))["lvt_lint0"][
        "delivery_mode"] == "ExtINT"
    assert kx.IOAPIC.decode(captured["x86.ioapic"][0])["chip_id"] == kx.KVM_IRQCHIP_IOAPIC
    assert [kx.PIC.decode(captured["x86.pic"][c])["chip_id"] for c in (0, 1)] == [0, 1]
    assert kx.TSC_KHZ.decode(captured["x86.tsc_khz"][0])["tsc_khz"] > 0


def test_capture_snapshot_validates_and_roundtrips(captured, tmp_path):
    snap = cap.to_snapshot(captured, 2)
    p = tmp_path / "cap.snap"
    snap.save(p)
    loaded = snapfmt.load(p)
    findings = snapfmt.validate(loaded)
    assert not snapfmt.has_errors(findings), [str(f) for f in findings]
    assert [f for f in findings if f.code.startswith("x86-")] == []
    assert loaded.metadata["template"]["vcpus"] == "2"
    assert bytes(loaded.find("x86.xsave", 1).data) == captured["x86.xsave"][1]
    assert jsonio.loads_json(jsonio.dumps(loaded)).to_bytes() == p.read_bytes()


def test_main_writes_snapshot_and_json(tmp_path):
    require_kvm()
    out, js = tmp_path / "m.snap", tmp_path / "m.json"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "kvm_capture.py"), str(out),
                        "--json", str(js), "--vcpus", "1"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    snap = snapfmt.load(out)
    assert snap.vcpu_indices == [0]
    doc = json.loads(js.read_text())
    assert set(doc["sections"]["x86.regs"]) == {"0"}


def test_main_reports_missing_device(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "kvm_capture.py"),
                        str(tmp_path / "x.snap"), "--dev", str(tmp_path / "no-kvm")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.startswith("kvm_capture: ") and "cannot open" in p.stderr
    assert "Traceback" not in p.stderr


# --- golden: real kernel bytes captured once (tools/make_goldens.py --capture-kvm) ------

GOLDEN_REAL = GOLDEN / "x86-kvm-real.snap"


def _golden_blobs() -> dict[str, dict[int, bytes]]:
    snap = snapfmt.load(GOLDEN_REAL)
    out: dict[str, dict[int, bytes]] = {}
    for s in snap.sections:
        if s.name.startswith("x86."):
            out.setdefault(s.name, {})[s.instance] = bytes(s.data)
    return out


def test_golden_capture_decodes_and_roundtrips():
    blobs = _golden_blobs()
    _check_blobs_decode(blobs)
    for i in blobs["x86.regs"]:
        assert kx.REGS.decode(blobs["x86.regs"][i]) == cap.regs_for(i)
    assert len(blobs["x86.regs"]) >= 2


def test_golden_capture_validates_clean():
    snap = snapfmt.load(GOLDEN_REAL)
    findings = snapfmt.validate(snap)
    assert not snapfmt.has_errors(findings), [str(f) for f in findings]
    assert [f for f in findings if f.code.startswith("x86-")] == []


def test_golden_capture_mangled_sregs_is_caught():
    blobs = _golden_blobs()
    s = kx.SREGS.decode(blobs["x86.sregs"][1])
    s["cr0"] &= ~kx.CR0_PE
    blobs["x86.sregs"][1] = kx.SREGS.encode(s)
    snap = snapfmt.loads(cap.to_snapshot(blobs, len(blobs["x86.regs"])).to_bytes())
    found = [f for f in snapfmt.validate(snap) if f.code.startswith("x86-")]
    assert [(f.code, f.location) for f in found] == [("x86-cr0-pg-without-pe",
                                                      "x86.sregs[vcpu 1].cr0")]
