"""snapfmt.codegen: committed outputs are current, deterministic, and follow the declarations."""

import re
import subprocess
import sys

from snapfmt import codegen, layout as L, registry


def test_committed_files_are_current():
    p = subprocess.run([sys.executable, "-m", "snapfmt.codegen", "--check"],
                       cwd=codegen.REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_deterministic(tmp_path):
    a = codegen.render_all()
    b = codegen.render_all()
    assert a == b
    assert codegen.main(["--out-dir", str(tmp_path)]) == 0
    assert codegen.main(["--out-dir", str(tmp_path), "--check"]) == 0
    (tmp_path / "spec/tables.md").write_text("stale\n")
    assert codegen.main(["--out-dir", str(tmp_path), "--check"]) == 1


def test_header_follows_layout():
    h = codegen.render_header()
    assert "do not edit" in h.splitlines()[1]
    for sc in L.Header.subcons:
        off = L.HEADER_FIELD_OFFSETS[sc.name]
        assert f"offsetof(struct snapfmt_header, {sc.name}) == {off}" in h
    for sc in L.TableEntry.subcons:
        assert f"#define SNAPFMT_ENT_OFF_{sc.name.upper()} {L.TABLE_FIELD_OFFSETS[sc.name]}" in h
    for name, val, msg in L.ERROR_CODES:
        assert f"SNAPFMT_ERR_{name} = -{val}, /* {msg} */" in h
    # every field has a comment taken from layout.py
    body = h[h.index("struct snapfmt_header {"):h.index("#define SNAPFMT_HDR_OFF_MAGIC")]
    for line in body.splitlines():
        if line.startswith("\tsnapfmt_le") or line.startswith("\tuint8_t"):
            assert re.search(r"/\* @\d+ +\S", line), line


def test_every_registered_kind_is_emitted():
    h = codegen.render_header()
    md = codegen.render_tables()
    for k in registry.all_kinds():
        assert f'0x{k.type_id:04x}u, "{k.name}"' in h
        assert f"`{k.name}`" in md
        if k.fixed_size is not None and k.decl is not None:
            assert f"### `{k.name}` (0x{k.type_id:04x})" in md
        if k.kernel_struct and k.fixed_size is not None and k.arch in (None, "x86_64"):
            assert f"sizeof({k.kernel_struct}) == {k.fixed_size}" in h


def test_new_kind_is_picked_up(monkeypatch):
    import construct as c
    from snapfmt.registry import SectionKind
    kinds = registry.all_kinds() + [SectionKind(0xF00000EE, "test.codegen", "vm",
                                                c.Struct("a" / c.Int32ul, "b" / c.Int32ul),
                                                "a test kind")]
    monkeypatch.setattr(codegen, "kinds", lambda: kinds)
    h = codegen.render_header()
    assert 'X(TEST_CODEGEN, 0xf00000eeu, "test.codegen", SNAPFMT_SEC_F_CRITICAL, 1, ' \
           'SNAPFMT_SHAPE_FIXED, 8u' in h
    assert "| 4 | 4 | u32le | `b` |" in codegen.render_tables()
