"""Diff layers: parent_ref section, make/rebase, chains, validation, diff via bitmap."""

import copy
import json

import numpy as np
import pytest

import snapfmt
from snapfmt import diff as D
from snapfmt import jsonio
from snapfmt import layers as LY
from snapfmt import layout as L
from snapfmt import synth
from snapfmt.errors import FormatError

from conftest import run_cli

PS = 4096
NPAGES = 256


def _snap(ram: np.ndarray, rip: int = 0x100000):
    s = synth.x86_snapshot(1, PS)
    s.remove(s.find("ram"))
    s.remove(s.find("memory_layout"))
    s.add_ram(0, ram.reshape(-1).view(np.uint8).tobytes())
    f = copy.deepcopy(s.find("x86.regs", 0).fields)
    f["rip"] = rip
    s.replace("x86.regs", 0, fields=f)
    return s


def _base_ram(seed=1):
    rng = np.random.default_rng(seed)
    r = np.zeros((NPAGES, PS // 8), np.uint64)
    nz = rng.random(NPAGES) < 0.6
    r[nz] = rng.integers(1, 2**63, size=(int(nz.sum()), PS // 8), dtype=np.uint64)
    return r


def _layer_findings(snap, parents=None):
    return [f for f in LY.check_chain(snap, parents) if f.severity != "info"]


@pytest.fixture
def chain(tmp_path):
    """base -> child1 (+python) -> child2 (+numpy), as full files."""
    base = _base_ram()
    c1 = base.copy()
    c1[[3, 4, 5, 100]] ^= np.uint64(0xFF)
    c1[200] = 0
    c2 = c1.copy()
    c2[[4, 150, 151]] ^= np.uint64(0xF0F0)
    paths = {}
    for name, ram, rip in (("base", base, 0x1000), ("c1", c1, 0x2000), ("c2", c2, 0x3000)):
        p = tmp_path / f"{name}.snap"
        _snap(ram, rip).save(p)
        paths[name] = p
    return paths, {"base": base, "c1": c1, "c2": c2}


def _resolved(snap, parents=None) -> bytes:
    src = LY.ram_sources(snap, parents)[0]
    return src.chunk(0, src.npages).tobytes()


def test_make_layer_holds_only_dirty_pages(chain, tmp_path):
    paths, rams = chain
    child = snapfmt.load(paths["c1"])
    layer, st = LY.make_layer(child, paths["base"], out_dir=str(tmp_path))
    want_dirty = np.flatnonzero((rams["c1"] != rams["base"]).any(axis=1))
    assert st.dirty == want_dirty.size and st.pages == NPAGES
    layer.save(tmp_path / "l1.snap")
    l1 = snapfmt.load(tmp_path / "l1.snap")
    assert l1.flags & L.HDR_F_DIFF_LAYER and l1.flags & L.HDR_F_TEMPLATE
    assert l1.find("ram").length == want_dirty.size * PS
    info = LY.parent_info(l1)
    assert info.parent_digest == LY.content_digest(paths["base"])
    assert info.name == b"base.snap"
    assert np.flatnonzero(info.blobs[0]["dirty"]).tolist() == want_dirty.tolist()
    # packed in bitmap order
    packed = np.frombuffer(bytes(l1.find("ram").data), np.uint64).reshape(-1, PS // 8)
    assert (packed == rams["c1"][want_dirty]).all()
    assert _resolved(l1) == rams["c1"].tobytes()
    assert (tmp_path / "l1.snap").stat().st_size < paths["c1"].stat().st_size
    assert _layer_findings(l1) == []


def test_rebase_reproduces_the_full_child(chain, tmp_path):
    paths, _ = chain
    layer, _ = LY.make_layer(snapfmt.load(paths["c1"]), paths["base"], out_dir=str(tmp_path))
    layer.save(tmp_path / "l1.snap")
    full = LY.rebase(snapfmt.load(tmp_path / "l1.snap"), paths["base"])
    full.save(tmp_path / "r.snap")
    assert (tmp_path / "r.snap").read_bytes() == paths["c1"].read_bytes()


def test_chain_of_three(chain, tmp_path):
    paths, rams = chain
    l1, _ = LY.make_layer(snapfmt.load(paths["c1"]), paths["base"], out_dir=str(tmp_path))
    l1.save(tmp_path / "l1.snap")
    # the +numpy layer is made over the +python LAYER (not over the full c1)
    l2, st = LY.make_layer(snapfmt.load(paths["c2"]), tmp_path / "l1.snap",
                           out_dir=str(tmp_path))
    assert st.dirty == 3
    l2.save(tmp_path / "l2.snap")
    s2 = snapfmt.load(tmp_path / "l2.snap")
    assert _resolved(s2) == rams["c2"].tobytes()
    assert _layer_findings(s2) == []
    # squash l2 into l1: a layer over base holding the union of dirty pages
    sq = LY.rebase(s2, tmp_path / "l1.snap", out_dir=str(tmp_path))
    sq.save(tmp_path / "sq.snap")
    sqs = snapfmt.load(tmp_path / "sq.snap")
    assert LY.parent_info(sqs).parent_digest == LY.content_digest(paths["base"])
    union = (rams["c1"] != rams["base"]).any(axis=1) | (rams["c2"] != rams["c1"]).any(axis=1)
    assert LY.parent_info(sqs).blobs[0]["ndirty"] == int(union.sum())
    assert _resolved(sqs) == rams["c2"].tobytes()
    full = LY.rebase(sqs, paths["base"])
    full.save(tmp_path / "full2.snap")
    assert (tmp_path / "full2.snap").read_bytes() == paths["c2"].read_bytes()


def test_changed_base_is_refused(chain, tmp_path):
    paths, rams = chain
    l1, _ = LY.make_layer(snapfmt.load(paths["c1"]), paths["base"], out_dir=str(tmp_path))
    l1.save(tmp_path / "l1.snap")
    l2, _ = LY.make_layer(snapfmt.load(paths["c2"]), tmp_path / "l1.snap",
                          out_dir=str(tmp_path))
    l2.save(tmp_path / "l2.snap")
    # the base is rebuilt with one different page
    other = rams["base"].copy()
    other[0] ^= np.uint64(1)
    _snap(other, 0x1000).save(paths["base"])
    f = _layer_findings(snapfmt.load(tmp_path / "l2.snap"))
    assert [x.code for x in f] == ["layer-parent-changed"]
    assert f[0].location.startswith(str(tmp_path / "l1.snap"))
    with pytest.raises(LY.LayerParentChanged):
        LY.ram_sources(snapfmt.load(tmp_path / "l2.snap"))
    with pytest.raises(LY.LayerParentChanged):
        LY.rebase(snapfmt.load(tmp_path / "l1.snap"), paths["base"])
    p = run_cli("validate", tmp_path / "l1.snap")
    assert p.returncode == 1 and "layer-parent-changed" in p.stdout
    p = run_cli("rebase", tmp_path / "l1.snap", "--onto", paths["base"], "-o",
                tmp_path / "x.snap")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "base changed" in p.stderr
    assert not (tmp_path / "x.snap").exists()


def test_missing_parent_and_explicit_parent(chain, tmp_path):
    paths, _ = chain
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    l1, _ = LY.make_layer(snapfmt.load(paths["c1"]), paths["base"], name_hint="gone.snap")
    l1.save(sub / "l1.snap")
    s = snapfmt.load(sub / "l1.snap")
    assert [x.code for x in _layer_findings(s)] == ["layer-parent-missing"]
    assert [x.code for x in LY.check_chain(s, [paths["base"]])] == ["layer-parent-ok"]
    p = run_cli("validate", sub / "l1.snap", "--parent", paths["base"], "-v")
    assert "layer-parent-ok" in p.stdout
    p = run_cli("validate", sub / "l1.snap", "--parent", paths["c2"])
    assert "layer-parent-changed" in p.stdout


def test_parent_ref_structure_is_checked():
    bm = np.zeros(8, np.uint8)
    bm[0] = 0b101
    good = LY.encode_parent_ref({"page_size": PS, "parent_file_size": 123,
                                 "parent_digest": "ab" * 32, "parent_name": "p.snap",
                                 "blobs": [{"instance": 0, "npages": 10,
                                            "bitmap": bm.tobytes().hex()}]})
    d = LY.decode_parent_ref(good)
    assert d["blobs"][0]["ndirty"] == 2 and d["parent_name"] == "p.snap"
    assert LY.encode_parent_ref(d) == good
    bad = bytearray(good)
    bad[-8] |= 0x08                      # ndirty says 2, bitmap now has 3
    with pytest.raises(FormatError) as e:
        LY.parse(bytes(bad))
    assert e.value.code == "bad-value" and "ndirty" in str(e.value)
    bad = bytearray(good)
    bad[-7] = 0x80                       # bit 15 > npages 10
    with pytest.raises(FormatError, match="past npages"):
        LY.parse(bytes(bad))
    with pytest.raises(FormatError) as e:
        LY.parse(good[:-8])
    assert e.value.code == "bad-length"
    bad = bytearray(good)
    bad[0] = 9                           # digest_alg
    with pytest.raises(FormatError, match="digest_alg"):
        LY.parse(bytes(bad))


def test_layer_dump_build_roundtrip(chain, tmp_path):
    paths, _ = chain
    l1, _ = LY.make_layer(snapfmt.load(paths["c1"]), paths["base"], out_dir=str(tmp_path))
    l1.save(tmp_path / "l1.snap")
    s = snapfmt.load(tmp_path / "l1.snap")
    doc = json.loads(jsonio.dumps(s))
    assert jsonio.build(doc).to_bytes() == (tmp_path / "l1.snap").read_bytes()


def test_layer_validates_cleanly(chain, tmp_path):
    paths, _ = chain
    l1, _ = LY.make_layer(snapfmt.load(paths["c1"]), paths["base"], out_dir=str(tmp_path))
    l1.save(tmp_path / "l1.snap")
    findings = snapfmt.validate(snapfmt.load(tmp_path / "l1.snap"))
    errors = [f for f in findings if f.severity == "error"]
    assert [str(f) for f in errors] == []


def test_inconsistent_layer_findings(chain, tmp_path):
    paths, _ = chain
    l1, _ = LY.make_layer(snapfmt.load(paths["c1"]), paths["base"], out_dir=str(tmp_path))
    l1.flags &= ~L.HDR_F_DIFF_LAYER
    l1.replace("ram", 0, data=bytes(PS))
    codes = {f.code for f in LY.check_chain(l1, [paths["base"]])}
    assert {"layer-flag-missing", "layer-ram-size"} <= codes
    plain = snapfmt.load(paths["c1"])
    plain.flags |= L.HDR_F_DIFF_LAYER
    assert [f.code for f in LY.check_chain(plain)] == ["layer-missing-parent-ref"]


def test_diff_layer_against_parent_uses_bitmap(chain, tmp_path):
    paths, rams = chain
    l1, _ = LY.make_layer(snapfmt.load(paths["c1"]), paths["base"], out_dir=str(tmp_path))
    l1.save(tmp_path / "l1.snap")
    r = D.diff_files(paths["base"], tmp_path / "l1.snap", sections=False)
    full = D.diff_files(paths["base"], paths["c1"], sections=False)
    rg, fg = r.ram.regions[0], full.ram.regions[0]
    assert rg.method == "bitmap" and fg.method == "compare"
    assert rg.changed == fg.changed and rg.changed_ranges == fg.changed_ranges
    assert (rg.zeroed, rg.filled) == (fg.zeroed, fg.filled)
    # the other direction too
    r2 = D.diff_files(tmp_path / "l1.snap", paths["base"], sections=False)
    assert r2.ram.regions[0].method == "bitmap" and r2.ram.regions[0].changed == fg.changed
    assert (r2.ram.regions[0].zeroed, r2.ram.regions[0].filled) == (fg.filled, fg.zeroed)
    # a layer against an unrelated full file resolves the chain and compares pages
    r3 = D.diff_files(tmp_path / "l1.snap", paths["c2"], sections=False)
    want = int((rams["c1"] != rams["c2"]).any(axis=1).sum())
    assert r3.ram.regions[0].method == "compare" and r3.ram.total("changed") == want


def test_cli_layer_and_rebase(chain, tmp_path):
    paths, rams = chain
    p = run_cli("layer", paths["c1"], "--parent", paths["base"], "-o", tmp_path / "l1.snap")
    assert p.returncode == 0, p.stderr
    ndirty = int((rams["c1"] != rams["base"]).any(axis=1).sum())
    assert f"{ndirty} of 256 pages dirty" in p.stdout
    p = run_cli("rebase", tmp_path / "l1.snap", "--onto", paths["base"], "-o",
                tmp_path / "r.snap")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "r.snap").read_bytes() == paths["c1"].read_bytes()
    p = run_cli("rebase", paths["c1"], "--onto", paths["base"], "-o", tmp_path / "y.snap")
    assert p.returncode == 2 and "not a diff layer" in p.stderr
    p = run_cli("diff", "--ram-only", paths["base"], tmp_path / "l1.snap")
    assert p.returncode == 1 and "[bitmap]" in p.stdout
