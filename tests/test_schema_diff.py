"""`snapfmt schema-diff`: the frozen v1 schema against the live declarations, and
mangled schemas that must (or must not) be flagged."""

import copy
import json

import pytest

from snapfmt import migrate as M

from conftest import ROOT, run_cli

FROZEN = ROOT / "spec" / "schema" / "v1.0.json"


@pytest.fixture
def frozen():
    return json.loads(FROZEN.read_text())


def _sec(doc, name):
    return next(k for k in doc["sections"] if k["name"] == name)


def _field(sec, name):
    return next(f for f in sec["fields"] if f["name"] == name)


def _incompatible(old, new):
    return [i for i in M.schema_diff(old, new) if i.severity == M.INCOMPATIBLE]


def test_frozen_v1_matches_live_declarations(frozen):
    assert frozen["format_version"] == "1.0"
    assert _incompatible(frozen, M.live_schema()) == []


def test_cli_frozen_passes():
    p = run_cli("schema-diff", "--frozen")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "compatible" in p.stdout and "INCOMPATIBLE" not in p.stdout


def test_changed_offset_without_bump_is_flagged(frozen, tmp_path):
    new = copy.deepcopy(frozen)
    _field(_sec(new, "x86.regs"), "rip")["offset"] += 8
    issues = _incompatible(frozen, new)
    assert len(issues) == 1
    assert issues[0].where == "0x0102 x86.regs"
    assert "rip offset 128 -> 136" in issues[0].message and "without a section version" in \
        issues[0].message
    (tmp_path / "old.json").write_text(json.dumps(frozen))
    (tmp_path / "new.json").write_text(json.dumps(new))
    p = run_cli("schema-diff", tmp_path / "old.json", tmp_path / "new.json")
    assert p.returncode == 1 and "INCOMPATIBLE" in p.stdout
    p = run_cli("schema-diff", "--json", tmp_path / "old.json", tmp_path / "new.json")
    assert p.returncode == 1 and json.loads(p.stdout)["compatible"] is False


def test_same_change_with_section_version_bump_is_not_flagged(frozen):
    new = copy.deepcopy(frozen)
    s = _sec(new, "x86.regs")
    _field(s, "rip")["offset"] += 8
    s["version"] = 2
    issues = M.schema_diff(frozen, new)
    assert _incompatible(frozen, new) == []
    assert any("needs a migration step" in i.message for i in issues)


@pytest.mark.parametrize("mangle, expect", [
    (lambda d: _sec(d, "x86.sregs")["fields"].pop(), "removed"),
    (lambda d: _field(_sec(d, "x86.lapic"), "regs").update(size=2048), "size 1024 -> 2048"),
    (lambda d: _field(_sec(d, "x86.regs"), "rax").update(type="u32le"), "type u64le -> u32le"),
    (lambda d: _sec(d, "metadata").update(critical=True), "critical False -> True"),
    (lambda d: d["sections"].remove(_sec(d, "x86.pit2")), "section type removed"),
    (lambda d: _sec(d, "x86.clock").update(type_id=0x01F0), "renumbered to 0x01f0"),
    (lambda d: _sec(d, "x86.msrs").update(version=0), "went backwards"),
    (lambda d: d["container"]["header"][3].update(offset=99), "container"),
    (lambda d: _field(_sec(d, "x86.msrs"), "entries")["element"][2].update(offset=16),
     "field data offset 8 -> 16"),
])
def test_incompatible_changes(frozen, mangle, expect):
    new = copy.deepcopy(frozen)
    mangle(new)
    issues = _incompatible(frozen, new)
    assert issues, "not flagged"
    assert any(expect in i.message or expect in i.where for i in issues), \
        [str(i) for i in issues]


def test_additions_are_compatible(frozen):
    new = copy.deepcopy(frozen)
    free = max(k["type_id"] for k in new["sections"] if k["type_id"] < 0x0400) + 1
    new["sections"].append({"name": "test.new_device", "type_id": free, "version": 1,
                            "scope": "device", "arch": None, "critical": True, "bulk": False,
                            "size": 16, "kernel_struct": None, "ioctl": None, "doc": "x",
                            "fields": []})
    _sec(new, "x86.regs")["doc"] = "reworded"
    issues = M.schema_diff(frozen, new)
    assert _incompatible(frozen, new) == []
    assert [i.severity for i in issues] == [M.COMPATIBLE]
    # and fewer sections in the frozen file than live (kinds added since) is fine too
    old = copy.deepcopy(frozen)
    old["sections"] = [k for k in old["sections"] if k["name"] != "parent_ref"]
    assert _incompatible(old, frozen) == []


def test_major_bump_allows_removal(frozen):
    new = copy.deepcopy(frozen)
    new["format_version"] = "2.0"
    new["sections"].remove(_sec(new, "x86.pit2"))
    assert _incompatible(frozen, new) == []


def test_function_reprs_are_not_layout(frozen):
    new = copy.deepcopy(frozen)
    f = _field(_sec(new, "virtio.mmio"), "config_pad")
    assert f["type"] == "bytes[<computed>]"
    f["type"] = "bytes[<function <lambda> at 0x7f00deadbeef>]"
    assert _incompatible(frozen, new) == []


def test_not_a_schema_is_trouble(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    p = run_cli("schema-diff", tmp_path / "x.json", tmp_path / "x.json")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    (tmp_path / "y.json").write_text("{nope")
    p = run_cli("schema-diff", tmp_path / "y.json", tmp_path / "x.json")
    assert p.returncode == 2 and "not JSON" in p.stderr
