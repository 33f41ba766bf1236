"""Every CLI command on hostile input: exit 0/1/2, one line on stderr, never a traceback."""

import contextlib
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from snapfmt import cli

from conftest import GOLDEN

BASE = (GOLDEN / "x86-4vcpu.snap").read_bytes()
DEV = (GOLDEN / "devices.snap").read_bytes()


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:          # argparse usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


COMMANDS = [["info"], ["info", "--json", "--deep"], ["validate"], ["validate", "--json"],
            ["dump"], ["diff", str(GOLDEN / "x86-4vcpu.snap")], ["migrate", "--to", "1.0",
                                                                  "--dry-run", "-o", "/dev/null"]]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from([BASE, DEV]),
       muts=st.lists(st.tuples(st.integers(0, 40000), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 40000)),
       cmd=st.sampled_from(COMMANDS))
def test_cli_never_tracebacks(tmp_path_factory, base, muts, cut, cmd):
    b = bytearray(base)
    for off, v in muts:
        b[off % len(b)] = v
    if cut is not None:
        b = b[:cut]
    p = tmp_path_factory.mktemp("c") / "x.snap"
    p.write_bytes(bytes(b))
    argv = [cmd[0], *cmd[1:]]
    argv.insert(1, str(p))
    rc, out, err = run(argv)
    assert rc in (0, 1, 2)
    assert "Traceback" not in err
    if rc == 2:
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("snapfmt"), err


@pytest.mark.parametrize("content", [b"\x80\x81 not utf8", b"{not json", b"[]",
                                     json.dumps({"format": "snapfmt-dump/1"}).encode(),
                                     json.dumps({"format": "snapfmt-dump/1", "header": {},
                                                 "sections": []}).encode()])
def test_build_rejects_bad_json_with_one_line(tmp_path, content):
    j = tmp_path / "in.json"
    j.write_bytes(content)
    rc, out, err = run(["build", str(j), "-o", str(tmp_path / "o.snap")])
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.snap").exists()


def _paths(o, prefix=()):
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _paths(v, prefix + (i,))
    else:
        yield prefix


DUMP = None


def _dump():
    global DUMP
    if DUMP is None:
        from snapfmt import jsonio
        import snapfmt
        DUMP = jsonio.dump(snapfmt.load(GOLDEN / "devices.snap"))
    return DUMP


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_build_of_mutated_dump_never_tracebacks(tmp_path_factory, data):
    import copy
    doc = copy.deepcopy(_dump())
    leaves = list(_paths(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(leaves))
        val = data.draw(st.one_of(st.integers(-2**70, 2**70), st.text(max_size=5),
                                  st.none(), st.booleans(), st.just([]), st.just({})))
        o = doc
        for k in path[:-1]:
            o = o[k]
        if path:
            o[path[-1]] = val
    d = tmp_path_factory.mktemp("j")
    (d / "in.json").write_text(json.dumps(doc))
    rc, out, err = run(["build", str(d / "in.json"), "-o", str(d / "o.snap")])
    assert rc in (0, 2) and "Traceback" not in err
