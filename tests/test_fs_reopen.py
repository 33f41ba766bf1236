"""Re-opening a captured virtio-fs inode map: C shim (snapfmt_fs.c) and
`snapfmt fs-check` agree, entry by entry, on a real tree that is then changed
(rename, delete, replace, directory swapped for a symlink) and on a crafted
map with hostile names."""

import errno
import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

import snapfmt
from snapfmt import fscheck, inode_map as im

from conftest import ROOT, run_cli

SHIM = ROOT / "shim"
CC = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wstrict-prototypes", "-Wvla",
          "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
          "-fno-omit-frame-pointer", f"-I{SHIM}"]
ASAN_ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
            "UBSAN_OPTIONS": "print_stacktrace=1"}

STATUS_TO_CODE = {"missing": "fs-missing", "type-changed": "fs-type-changed",
                  "replaced": "fs-replaced", "mount-changed": "fs-mount-changed",
                  "not-reached": "fs-not-reached", "bad-name": "fs-bad-name",
                  "unreachable": "fs-unreachable", "io-error": "fs-io-error"}


@pytest.fixture(scope="module")
def cbin(tmp_path_factory):
    if CC is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("fsbin")
    bins = {}
    for name, srcs in (("fs_verify", ["tests/fs_verify.c", "snapfmt_fs.c", "snapfmt.c",
                                      "crc32c.c"]),
                       ("test_fs", ["tests/test_fs.c", "snapfmt_fs.c"])):
        exe = out / name
        p = subprocess.run([CC, *CFLAGS, "-o", str(exe), *srcs], cwd=SHIM, capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr
        bins[name] = exe
    return bins


def c_run(cbin, *args):
    return subprocess.run([str(cbin["fs_verify"]), *map(str, args)], capture_output=True,
                          text=True, env=ASAN_ENV)


def c_verify(cbin, section: pathlib.Path, root: pathlib.Path):
    p = c_run(cbin, "verify", section, root)
    assert p.returncode in (0, 1), p.stderr
    rows = []
    for line in p.stdout.splitlines():
        idx, nodeid, status, err, path = line.split(" ", 4)
        rows.append((int(idx), int(nodeid), status, int(err), path))
    return p.returncode, rows


def c_reopen(cbin, section, root):
    p = c_run(cbin, "reopen", section, root)
    assert p.returncode in (0, 1), p.stderr
    return {int(i): int(rc) for i, _n, rc in (ln.split() for ln in p.stdout.splitlines())}


def make_tree(root: pathlib.Path) -> None:
    (root / "a" / "sub").mkdir(parents=True)
    (root / "a" / "f1").write_text("one")
    (root / "a" / "f2").write_text("two")
    (root / "a" / "sub" / "deep").write_text("deep")
    (root / "b").mkdir()
    os.link(root / "a" / "f1", root / "b" / "hard")
    os.symlink("../a", root / "b" / "link")
    (root / "c").mkdir()
    (root / "c" / "x").write_text("x")
    (root / "d").write_text("d")
    (root / "e").write_text("e")
    os.symlink("d", root / "s")


# walk order: nodeid = index + 1
EXPECTED_PATHS = ["/", "/a", "/a/f1", "/a/f2", "/a/sub", "/a/sub/deep", "/b", "/b/link", "/c",
                  "/c/x", "/d", "/e", "/s"]


def mutate(root: pathlib.Path) -> None:
    os.rename(root / "a" / "f2", root / "a" / "f2.renamed")          # f2 missing
    os.unlink(root / "d")                                             # d missing (s dangles)
    (root / "e.new").write_text("new e")
    os.rename(root / "e.new", root / "e")                             # e replaced
    os.rename(root / "c", root / "c.old")
    os.symlink("c.old", root / "c")                                   # dir -> symlink
    (root / "a" / "sub.new").mkdir()                                  # built while the old
    (root / "a" / "sub.new" / "deep").write_text("again")            # one still exists, so
    os.rename(root / "a" / "sub", root / "sub.old")                   # it is surely another
    os.rename(root / "a" / "sub.new", root / "a" / "sub")             # inode: sub replaced


EXPECTED_AFTER = {"/": "ok", "/a": "ok", "/a/f1": "ok", "/a/f2": "missing",
                  "/a/sub": "replaced", "/a/sub/deep": "not-reached", "/b": "ok",
                  "/b/link": "ok", "/c": "type-changed", "/c/x": "not-reached",
                  "/d": "missing", "/e": "replaced", "/s": "ok"}


def py_codes(findings):
    out = {}
    for f in findings:
        m = re.search(r"\.entries\[(\d+)\]", f.location)
        if m:
            out[int(m.group(1))] = f.code
    return out


@pytest.fixture
def captured(tmp_path, cbin):
    root = tmp_path / "shared"
    root.mkdir()
    make_tree(root)
    raw = tmp_path / "map.bin"
    snap_path = tmp_path / "map.snap"
    for extra in (["--raw", "-o", raw], ["--template", "-o", snap_path]):
        p = subprocess.run([sys.executable, "tools/capture_inode_map.py", root, *map(str, extra)],
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    assert raw.read_bytes() == snapfmt.load(snap_path).find("virtiofs.inode_map").data.tobytes()
    return root, raw, snap_path


def test_capture_shape(captured):
    root, raw, _ = captured
    a = im.parse_arrays(raw.read_bytes())
    assert im.validate_map(a) == []
    paths = ["/" + p.decode() for p in im.entry_paths(a)]
    assert paths == EXPECTED_PATHS
    e = a.entries
    assert e["nodeid"].tolist() == list(range(1, 14))
    f1 = EXPECTED_PATHS.index("/a/f1")
    assert int(e[f1]["refcount"]) == 2          # b/hard is the same inode: one nodeid
    assert int(e[0]["refcount"]) == 2           # root starts at 2, like virtiofsd
    st = os.lstat(root / "b" / "link")
    i = EXPECTED_PATHS.index("/b/link")
    assert int(e[i]["file_type"]) == stat.S_IFLNK and int(e[i]["ino"]) == st.st_ino
    assert (a.header["root_ino"], a.header["root_dev"]) == (os.stat(root).st_ino,
                                                            os.stat(root).st_dev)
    assert a.header["flags"] & im.INOMAP_F_HARDLINK_DEDUP
    assert a.header["next_inode"] == 14


def test_clean_tree_c_and_python(captured, cbin):
    root, raw, snap_path = captured
    rc, rows = c_verify(cbin, raw, root)
    assert rc == 0
    assert [(r[0], r[4], r[2], r[3]) for r in rows] == \
        [(i, p, "ok", 0) for i, p in enumerate(EXPECTED_PATHS)]
    assert fscheck.fs_check(snapfmt.load(snap_path), root) == []
    p = run_cli("fs-check", snap_path, "--root", root)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "clean" in p.stdout


def test_changed_tree_exact_results(captured, cbin):
    root, raw, snap_path = captured
    mutate(root)
    rc, rows = c_verify(cbin, raw, root)
    assert rc == 1
    got = {r[4]: r[2] for r in rows}
    assert got == EXPECTED_AFTER
    assert [r[4] for r in rows] == EXPECTED_PATHS          # callback order = walk order
    errs = {r[4]: r[3] for r in rows}
    assert errs["/a/f2"] == -errno.ENOENT and errs["/d"] == -errno.ENOENT
    assert errs["/c"] == 0 and errs["/e"] == 0

    findings = fscheck.fs_check(snapfmt.load(snap_path), root)
    c_bad = {r[0]: STATUS_TO_CODE[r[2]] for r in rows if r[2] != "ok"}
    assert py_codes(findings) == c_bad
    by_code = {f.code: f for f in findings}
    assert "/c" in by_code["fs-type-changed"].location
    assert "symlink" in by_code["fs-type-changed"].message
    assert fscheck.status_of(findings) == fscheck.EXIT_STALE

    p = run_cli("fs-check", snap_path, "--root", root, "--json")
    assert p.returncode == 1
    doc = json.loads(p.stdout)
    assert doc["status"] == "stale" and doc["entries"] == 13
    assert sorted(f["code"] for f in doc["findings"]) == sorted(c_bad.values())

    # re-open from the root, path by path: the symlink swapped in for c stops c/x
    rcs = c_reopen(cbin, raw, root)
    idx = EXPECTED_PATHS.index
    assert rcs[idx("/c/x")] == -errno.ENOTDIR
    assert rcs[idx("/a/f2")] == -errno.ENOENT and rcs[idx("/d")] == -errno.ENOENT
    assert rcs[idx("/c")] == 0                     # the link itself (O_PATH|O_NOFOLLOW)
    assert rcs[idx("/a/sub/deep")] == 0            # path exists; identity is verify's job
    assert {i: rc for i, rc in rcs.items() if rc} == {idx("/a/f2"): -errno.ENOENT,
                                                     idx("/c/x"): -errno.ENOTDIR,
                                                     idx("/d"): -errno.ENOENT}


def test_root_replaced(captured, cbin, tmp_path):
    root, raw, snap_path = captured
    other = tmp_path / "other"
    shutil.copytree(root, other, symlinks=True)
    rc, rows = c_verify(cbin, raw, other)
    assert rows[0][2] == "replaced" and rc == 1
    codes = {f.code for f in fscheck.fs_check(snapfmt.load(snap_path), other)}
    assert "fs-root-replaced" in codes and "fs-replaced" in codes


def hostile_map(root: pathlib.Path) -> bytes:
    """root, a (real), a/.. -> would be root, a/../x, and a name with '/'."""
    st_root, st_a = os.stat(root), os.stat(root / "a")
    ent = lambda nodeid, parent, name, st, t: dict(  # noqa: E731
        nodeid=nodeid, parent=parent, name=name, ino=st.st_ino, dev=st.st_dev, mnt_id=0,
        generation=0, refcount=1, file_type=t, reserved=0)
    fields = dict(flags=0, reserved0=0, next_inode=6, next_handle=0, root_dev=st_root.st_dev,
                  root_ino=st_root.st_ino, root_mnt_id=0,
                  entries=[ent(1, 0, "", st_root, stat.S_IFDIR),
                           ent(2, 1, "a", st_a, stat.S_IFDIR),
                           ent(3, 2, "..", st_root, stat.S_IFDIR),
                           ent(4, 3, "e", os.stat(root / "e"), stat.S_IFREG),
                           ent(5, 1, "a/f1", os.stat(root / "a" / "f1"), stat.S_IFREG)],
                  handles=[], mounts=[])
    return im.encode_inode_map(fields)


def test_crafted_dotdot_map(captured, cbin, tmp_path):
    root, _, _ = captured
    data = hostile_map(root)
    raw = tmp_path / "hostile.bin"
    raw.write_bytes(data)
    rc, rows = c_verify(cbin, raw, root)
    assert rc == 1
    assert [(r[0], r[2], r[3]) for r in rows] == [
        (0, "ok", 0), (1, "ok", 0), (2, "bad-name", -errno.EINVAL), (3, "not-reached", 0),
        (4, "bad-name", -errno.EINVAL)]
    rcs = c_reopen(cbin, raw, root)
    assert rcs == {0: 0, 1: 0, 2: -errno.EINVAL, 3: -errno.EINVAL, 4: -errno.EINVAL}

    snap = snapfmt.new("x86_64")
    snap.add("virtiofs.inode_map", 0, data=data)
    path = tmp_path / "hostile.snap"
    snap.save(path)
    findings = fscheck.fs_check(snapfmt.load(path), root)
    assert py_codes(findings) == {2: "fs-bad-name", 3: "fs-not-reached", 4: "fs-bad-name"}
    assert fscheck.status_of(findings) == fscheck.EXIT_TROUBLE
    assert run_cli("fs-check", path, "--root", root).returncode == 2
    # and validation names the bad entries
    v = {(f.code, re.search(r"entries\[(\d+)\]", f.location).group(1))
         for f in snapfmt.validate(snapfmt.load(path)) if f.code.startswith("inode-name")}
    assert v == {("inode-name-dot", "2"), ("inode-name-invalid", "4")}


def test_fs_check_without_map(tmp_path):
    snap = snapfmt.new("x86_64")
    path = tmp_path / "empty.snap"
    snap.save(path)
    assert run_cli("fs-check", path, "--root", tmp_path).returncode == 2


def test_fs_check_missing_root(captured, tmp_path):
    _, _, snap_path = captured
    p = run_cli("fs-check", snap_path, "--root", tmp_path / "nope", "--json")
    assert p.returncode == 2
    assert json.loads(p.stdout)["findings"][0]["code"] == "fs-root-unavailable"


def test_c_unit_tests(cbin):
    p = subprocess.run([str(cbin["test_fs"])], capture_output=True, text=True, env=ASAN_ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"test_fs: \d+ passed, 0 failed", p.stdout)


def test_c_snapshot_input(captured, cbin):
    """fs_verify reads the section straight from a snapshot through libsnapfmt."""
    if "SNAPFMT_SEC_VIRTIOFS_INODE_MAP" not in (SHIM / "snapfmt_layout.h").read_text():
        pytest.skip("shim/snapfmt_layout.h predates virtiofs.inode_map (run make generate)")
    root, _, snap_path = captured
    p = c_run(cbin, "verify", f"--snap={snap_path}:0", root)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == len(EXPECTED_PATHS)


def test_c_parse_matches_python_on_mangled_maps(captured, cbin, tmp_path):
    """Same structural verdict (ok / which error) from C and Python for mangled bytes."""
    _, raw, _ = captured
    good = raw.read_bytes()
    py_code = {"bad-length": -14, "limit": -7, "bad-offset": -8, "bad-value": -21}
    cases = []
    rng = np.random.default_rng(7)
    for k in range(60):
        b = bytearray(good)
        pos = int(rng.integers(0, 64 + 13 * 72 + 32))
        b[pos] ^= 1 << int(rng.integers(0, 8))
        cases.append(bytes(b))
    cases += [good[:-8], good + bytes(8), good[:63]]
    for i, b in enumerate(cases):
        f = tmp_path / f"m{i}.bin"
        f.write_bytes(b)
        p = c_run(cbin, "parse", f)
        c_rc = int(p.stdout.split()[0])
        try:
            im.parse_arrays(b)
            want = 0
        except snapfmt.FormatError as e:
            want = py_code[e.code]
        assert c_rc == want, (i, p.stdout, want)
