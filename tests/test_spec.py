"""spec/FORMAT.md's byte tables agree with the declarations in snapfmt/layout.py."""

import re

from snapfmt import layout as L

from conftest import ROOT


def _table_after(heading: str) -> list[tuple[int, int, str]]:
    text = (ROOT / "spec" / "FORMAT.md").read_text()
    part = text[text.index(heading):]
    rows = []
    for line in part.splitlines()[1:]:
        m = re.match(r"\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|", line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), m.group(3)))
        elif rows and not line.startswith("|"):
            break
    return rows


def _declared(struct) -> list[tuple[int, int, str]]:
    out, off = [], 0
    for sc in struct.subcons:
        out.append((off, sc.sizeof(), sc.name))
        off += sc.sizeof()
    return out


def test_header_table_matches_declaration():
    assert _table_after("## 2. Header") == _declared(L.Header)


def test_section_table_matches_declaration():
    assert _table_after("## 3. Section table") == _declared(L.TableEntry)


def test_spec_names_every_error_code():
    text = (ROOT / "spec" / "FORMAT.md").read_text()
    for name, _, _ in L.ERROR_CODES[:14]:
        assert name in text, name
