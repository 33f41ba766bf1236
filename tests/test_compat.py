"""`snapfmt compat` / `retarget`: logic against faked host descriptions, and the
real /dev/kvm probe (skipped without KVM unless SNAPFMT_REQUIRE_KVM=1)."""

import copy
import json

import pytest

import snapfmt
from snapfmt import compat as C
from snapfmt import kvmhost
from snapfmt import synth

from conftest import GOLDEN, require_kvm, run_cli


def _host_for(snap, **kw) -> kvmhost.HostInfo:
    """A host that offers exactly what ``snap`` uses."""
    ents = snap.find("x86.cpuid2", 0).fields["entries"]
    msrs = sorted({e["index"] for s in snap.all("x86.msrs") for e in s.fields["entries"]})
    h = kvmhost.HostInfo(arch="x86_64", kernel_release=snap.metadata["kernel_release"],
                         api_version=12,
                         cpuid=[[e["function"], e["index"], e["eax"], e["ebx"], e["ecx"],
                                 e["edx"]] for e in ents],
                         msrs=msrs, xsave_size=4096,
                         tsc_khz=snap.find("x86.tsc_khz", 0).fields["tsc_khz"],
                         tsc_scaling=False, tsc_deadline_timer=True, source="fake")
    for k, v in kw.items():
        setattr(h, k, v)
    return h


def _codes(probs, sev=C.BLOCKER):
    return [p.code for p in probs if p.severity == sev]


@pytest.fixture
def snap():
    return synth.x86_snapshot(2, 1 << 16)


def test_matching_host_has_no_blockers(snap):
    probs = C.check(snap, _host_for(snap))
    assert C.blockers(probs) == []
    assert [p.code for p in probs] == ["producer"]


def test_missing_cpuid_feature_is_a_blocker(snap):
    h = _host_for(snap)
    leaf7 = next(e for e in h.cpuid if e[0] == 7 and e[1] == 0)
    leaf7[3] &= ~(1 << 5)          # no AVX2
    leaf1 = next(e for e in h.cpuid if e[0] == 1)
    leaf1[4] &= ~(1 << 27 | 1 << 31)   # OSXSAVE / HYPERVISOR: dynamic, not blockers
    probs = C.blockers(C.check(snap, h))
    assert [p.code for p in probs] == ["cpuid-feature"]
    assert "AVX2" in probs[0].message and probs[0].where.endswith("leaf[0x7.0].ebx")


def test_missing_leaf_blocks_all_its_bits(snap):
    h = _host_for(snap)
    h.cpuid = [e for e in h.cpuid if e[0] != 0x80000001]
    msgs = [p.message for p in C.blockers(C.check(snap, h))]
    assert any("SYSCALL" in m and "NX" in m and "LM" in m for m in msgs)


def test_msrs(snap):
    h = _host_for(snap)
    h.msrs = [m for m in h.msrs if m not in (0xC0000103, 0x1B)]
    probs = C.check(snap, h)
    assert _codes(probs) == ["msr-unsupported"]
    assert "TSC_AUX" in C.blockers(probs)[0].where
    assert "msr-architectural" in _codes(probs, C.INFO)     # APIC_BASE


def test_xsave_and_xcr0(snap):
    h = _host_for(snap, xsave_size=4096)
    big = synth.x86_snapshot(1, 1 << 16)
    big.replace("x86.xsave", 0, data=synth.xsave(0, 8192))
    assert _codes(C.check(big, h)) == ["xsave-size"]
    h2 = _host_for(snap)
    leaf = next(e for e in h2.cpuid if e[0] == 0xD and e[1] == 0)
    leaf[2] = 0x3              # host: x87 | SSE, guest XCR0 has AVX
    probs = C.blockers(C.check(snap, h2))
    assert [p.code for p in probs] == ["xcr0-unsupported"] and "AVX" in probs[0].message


@pytest.mark.parametrize("host_khz, scaling, expect", [
    (2_000_000, False, []),
    (2_000_400, False, []),                     # 200 ppm: within tolerance
    (2_002_000, False, ["tsc-frequency"]),      # 1000 ppm, cannot scale
    (2_002_000, True, []),                      # scaled: a warning only
])
def test_tsc(snap, host_khz, scaling, expect):
    probs = C.check(snap, _host_for(snap, tsc_khz=host_khz, tsc_scaling=scaling))
    assert _codes(probs) == expect
    if scaling:
        assert _codes(probs, C.WARNING) == ["tsc-scaled"]


def test_arch_and_kernel(snap):
    assert _codes(C.check(snap, _host_for(snap, arch="aarch64"))) == ["arch"]
    probs = C.check(snap, _host_for(snap, kernel_release="7.3.0"))
    assert _codes(probs, C.WARNING) == ["kernel-differs"]
    probs = C.check(snap, _host_for(snap, kernel_release="6.1.99"))
    assert "kernel-differs" in _codes(probs, C.INFO)


def test_cli_with_host_file(snap, tmp_path):
    snap.save(tmp_path / "s.snap")
    h = _host_for(snap)
    (tmp_path / "ok.json").write_text(json.dumps(h.as_dict()))
    p = run_cli("compat", tmp_path / "s.snap", "--host", tmp_path / "ok.json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "restorable on" in p.stdout
    h.tsc_khz = 3_000_000
    (tmp_path / "bad.json").write_text(json.dumps(h.as_dict()))
    p = run_cli("compat", "--json", tmp_path / "s.snap", "--host", tmp_path / "bad.json")
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["restorable"] is False
    assert [x["code"] for x in doc["problems"] if x["severity"] == "blocker"] == \
        ["tsc-frequency"]
    (tmp_path / "junk.json").write_text('{"arch": 5}')
    p = run_cli("compat", tmp_path / "s.snap", "--host", tmp_path / "junk.json")
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_retarget_makes_it_restorable(snap, tmp_path):
    snap.save(tmp_path / "s.snap")
    h = _host_for(snap, tsc_khz=2_100_000)
    h.msrs = [m for m in h.msrs if m != 0xC0000103]
    (tmp_path / "h.json").write_text(json.dumps(h.as_dict()))
    p = run_cli("compat", tmp_path / "s.snap", "--host", tmp_path / "h.json")
    assert p.returncode == 1
    p = run_cli("retarget", tmp_path / "s.snap", "--host", tmp_path / "h.json",
                "--drop-unsupported-msrs", "--tsc-khz", "host", "--clear",
                "x86.debugregs.dr7", "-o", tmp_path / "t.snap")
    assert p.returncode == 0, p.stderr
    warnings = [l for l in p.stderr.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 3
    assert any("TSC_AUX" in w for w in warnings) and any("2100000 kHz" in w for w in warnings)
    t = snapfmt.load(tmp_path / "t.snap")
    assert all(0xC0000103 not in [e["index"] for e in s.fields["entries"]]
               for s in t.all("x86.msrs"))
    assert {s.fields["tsc_khz"] for s in t.all("x86.tsc_khz")} == {2_100_000}
    assert {s.fields["dr7"] for s in t.all("x86.debugregs")} == {0}
    assert not snapfmt.has_errors(snapfmt.validate(t))
    p = run_cli("compat", tmp_path / "t.snap", "--host", tmp_path / "h.json")
    assert p.returncode == 0, p.stdout


def test_retarget_errors_and_dry_run(snap, tmp_path):
    snap.save(tmp_path / "s.snap")
    p = run_cli("retarget", tmp_path / "s.snap", "--drop-msr", "LSTAR", "--dry-run")
    assert p.returncode == 0 and "LSTAR" in p.stderr and "nothing written" in p.stdout
    p = run_cli("retarget", tmp_path / "s.snap", "--clear", "x86.regs.nope", "-o",
                tmp_path / "x.snap")
    assert p.returncode == 2 and "x86.regs.nope" in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "x.snap").exists()
    p = run_cli("retarget", tmp_path / "s.snap", "--drop-msr", "NOT_AN_MSR", "-o",
                tmp_path / "x.snap")
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_arm64_drop_reg(tmp_path):
    s = snapfmt.load(GOLDEN / "arm64-2vcpu.snap")
    edits = C.drop_arm64_regs(s, {"KVM_REG_ARM_TIMER_CNT"})
    assert len(edits) == 1
    from snapfmt.arm64 import reg_name
    for sec in s.all("arm64.regs"):
        assert "KVM_REG_ARM_TIMER_CNT" not in [reg_name(r["id"]) for r in sec.fields["regs"]]


# --------------------------------------------------------------- real KVM

def test_probe_real_kvm():
    require_kvm()
    h = kvmhost.probe()
    assert h.api_version == 12 and h.arch == "x86_64"
    assert h.cpuid_entry(0) is not None and h.cpuid_entry(1) is not None
    assert 0x10 in h.msrs                  # IA32_TSC is always saved
    assert h.xsave_size is None or h.xsave_size >= 4096
    assert h.tsc_khz is None or 100_000 < h.tsc_khz < 10_000_000
    assert h.supported_xcr0 & 0x3 == 0x3   # x87 and SSE
    again = kvmhost.HostInfo.from_dict(json.loads(json.dumps(h.as_dict())))
    assert again.cpuid == h.cpuid and again.msrs == h.msrs


def test_compat_against_this_host():
    require_kvm()
    h = kvmhost.probe()
    # a snapshot made to match this host restores; the synthetic one may not
    s = synth.x86_snapshot(1, 1 << 16)
    matched = copy.deepcopy(s.find("x86.cpuid2", 0).fields)
    matched["entries"] = [dict(function=e[0], index=e[1], flags=0, eax=e[2], ebx=e[3],
                               ecx=e[4], edx=e[5], padding=[0, 0, 0]) for e in h.cpuid]
    matched["nent"] = len(matched["entries"])
    s.replace("x86.cpuid2", 0, fields=matched)
    if h.tsc_khz:
        s.replace("x86.tsc_khz", 0, fields={"tsc_khz": h.tsc_khz, "reserved": 0})
    C.drop_msrs(s, {m for m in [e["index"] for e in s.find("x86.msrs", 0).fields["entries"]]
                    if m not in h.msrs and m not in C.KVM_ARCH_MSRS})
    assert C.blockers(C.check(s, h)) == []
    p = run_cli("host-info")
    assert p.returncode == 0 and json.loads(p.stdout)["api_version"] == 12
    p = run_cli("compat", GOLDEN / "x86-kvm-real.snap")
    assert p.returncode in (0, 1) and ("restorable on this host" in p.stdout)
