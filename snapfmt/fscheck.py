"""``snapfmt fs-check SNAP --root DIR``: is a template's virtio-fs inode map still
true of the host directory it was taken from?

Every entry of each ``virtiofs.inode_map`` section is re-opened the way a
restoring passthrough server would (and the C shim ``snapfmt_fs_verify``
does): component by component relative to the shared directory, never
following a symlink, never accepting a name that could leave the directory
(``..``, ``.``, ``/``, NUL, empty).  The found identity (type, ino, dev, and
mount id when recorded) is compared with the recorded one.

Finding codes (location names the entry: index, nodeid, path):

stale (exit 1)
  ``fs-missing``        the path no longer exists
  ``fs-type-changed``   it exists with another file type (e.g. a directory
                        swapped for a symlink)
  ``fs-replaced``       same type, different inode (deleted + recreated, or
                        renamed over)
  ``fs-mount-changed``  same inode, different mount id
  ``fs-not-reached``    an ancestor directory is missing / changed, so the
                        entry cannot be re-opened
  ``fs-root-replaced``  the shared directory itself is another inode
trouble (exit 2)
  ``fs-bad-name``       hostile or malformed name in the map (refused)
  ``fs-unreachable``    entry not connected to the root (orphan or cycle)
  ``fs-io-error``       any other error re-opening the entry
  ``fs-root-unavailable`` the shared directory cannot be opened
  ``fs-map-invalid``    the section fails its structural checks
  ``fs-no-inode-map``   the snapshot has no inode map to check
"""

from __future__ import annotations

import errno
import json
import os
import stat as _stat
import sys

import numpy as np

from . import typeids
from .errors import FormatError
from .findings import ERROR, WARNING, Finding
from .inode_map import (FILE_TYPES, FUSE_ROOT_ID, INOMAP_F_MNT_ID, NAME_MAX, MapArrays, MapIndex,
                        fd_identity, parse_arrays, show_name)

STALE_CODES = frozenset({"fs-missing", "fs-type-changed", "fs-replaced", "fs-mount-changed",
                         "fs-not-reached", "fs-root-replaced"})
TROUBLE_CODES = frozenset({"fs-bad-name", "fs-unreachable", "fs-io-error",
                           "fs-root-unavailable", "fs-map-invalid", "fs-no-inode-map"})

EXIT_CLEAN, EXIT_STALE, EXIT_TROUBLE = 0, 1, 2

_O_PATH = getattr(os, "O_PATH", 0o10000000)


def name_problem(name: bytes) -> str | None:
    """Why ``name`` cannot be a single directory entry name (None when it can)."""
    if not name:
        return "empty name"
    if name in (b".", b".."):
        return f"name {name.decode()!r} would leave or alias the directory"
    if b"/" in name:
        return "name contains '/'"
    if b"\0" in name:
        return "name contains NUL"
    if len(name) > NAME_MAX:
        return f"name longer than NAME_MAX {NAME_MAX}"
    return None


def _type_name(ft: int) -> str:
    return FILE_TYPES.get(ft, f"type 0o{ft:o}")


def _children(a: MapArrays):
    """(root index or None, CSR child lists, linked mask) from parent links."""
    e = a.entries
    n = len(e)
    index = MapIndex(e["nodeid"])
    pidx, pfound = index.lookup(e["parent"])
    nonroot = e["nodeid"] != FUSE_ROOT_ID
    linked = nonroot & pfound
    ridx, rfound = index.lookup(np.array([FUSE_ROOT_ID], np.uint64))
    root = int(ridx[0]) if rfound[0] else None
    kids = np.flatnonzero(linked)
    par_of = pidx[kids]
    order = np.argsort(par_of, kind="stable")
    kids, par_of = kids[order], par_of[order]
    starts = np.searchsorted(par_of, np.arange(n + 1))
    return root, kids, starts


def _entry_loc(label: str, a: MapArrays, i: int, path: str) -> str:
    return f"{label}.entries[{i}] (nodeid {int(a.entries[i]['nodeid'])}, path {path})"


def check_map(a: MapArrays, root: str | os.PathLike, label: str) -> list[Finding]:
    """Re-open every entry of one map under ``root`` and compare identities."""
    out: list[Finding] = []
    e = a.entries
    hdr = a.header
    check_mnt = bool(hdr["flags"] & INOMAP_F_MNT_ID)
    try:
        rootfd = os.open(root, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as ex:
        return [Finding("fs-root-unavailable", ERROR, label,
                        f"cannot open the shared directory {os.fsdecode(root)}: {ex.strerror}")]
    try:
        st = os.fstat(rootfd)
        if (st.st_ino, st.st_dev) != (hdr["root_ino"], hdr["root_dev"]):
            out.append(Finding("fs-root-replaced", ERROR, f"{label}.root_ino",
                               f"shared directory is ino {st.st_ino} dev {st.st_dev}, the map "
                               f"was taken from ino {hdr['root_ino']} dev {hdr['root_dev']}"))
        root_i, kids, starts = _children(a)
        visited = np.zeros(len(e), bool)
        if root_i is not None:
            visited[root_i] = True
            _walk(a, label, rootfd, root_i, kids, starts, visited, check_mnt, out)
        for i in np.flatnonzero(~visited).tolist():
            out.append(Finding("fs-unreachable", ERROR,
                               _entry_loc(label, a, i, "<unreachable>"),
                               "entry is not connected to the root (missing parent or cycle): "
                               "it cannot be re-opened"))
    finally:
        os.close(rootfd)
    return out


def _walk(a, label, rootfd, root_i, kids, starts, visited, check_mnt, out) -> None:
    """Depth-first: at most one open fd per directory level (fds <= depth)."""
    e = a.entries
    # frames: [entry index, dir fd (-1: could not be opened), path, reason, child iterator]
    stack = [(root_i, rootfd, "", None, iter(kids[starts[root_i]:starts[root_i + 1]].tolist()))]
    try:
        while stack:
            di, dfd, dpath, reason, it = stack[-1]
            ci = next(it, None)
            if ci is None:
                stack.pop()
                if dfd >= 0 and dfd != rootfd:
                    os.close(dfd)
                continue
            visited[ci] = True
            name = a.name(ci)
            cpath = f"{dpath}/{show_name(name)}"
            loc = _entry_loc(label, a, ci, cpath)
            want_t = int(e[ci]["file_type"])
            sub = kids[starts[ci]:starts[ci + 1]].tolist()
            if dfd < 0:
                out.append(Finding("fs-not-reached", ERROR, loc, f"not re-opened: {reason}"))
                if sub:
                    stack.append((ci, -1, cpath, reason, iter(sub)))
                continue
            prob = name_problem(name)
            if prob is not None:
                out.append(Finding("fs-bad-name", ERROR, loc, f"refused: {prob}"))
                if sub:
                    stack.append((ci, -1, cpath, f"ancestor {cpath} has a bad name", iter(sub)))
                continue
            fail = None
            cfd = -1
            try:
                # open first, then fstat the fd: what is verified is what a child
                # would be opened from (no stat/open race); O_PATH|O_NOFOLLOW opens a
                # symlink as itself
                cfd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                ino, dev, ft, mnt = fd_identity(cfd)
            except OSError as ex:
                if cfd >= 0:
                    os.close(cfd)
                    cfd = -1
                if ex.errno == errno.ENOENT:
                    out.append(Finding("fs-missing", ERROR, loc,
                                       f"{_type_name(want_t)} no longer exists"))
                    fail = f"ancestor {cpath} is missing"
                else:
                    out.append(Finding("fs-io-error", ERROR, loc, f"cannot open: {ex.strerror}"))
                    fail = f"ancestor {cpath} cannot be opened"
            else:
                if ft != want_t:
                    what = "a symlink swapped in" if ft == _stat.S_IFLNK else _type_name(ft)
                    out.append(Finding("fs-type-changed", ERROR, loc,
                                       f"was a {_type_name(want_t)}, now {what}"))
                    fail = f"ancestor {cpath} changed type"
                elif (ino, dev) != (int(e[ci]["ino"]), int(e[ci]["dev"])):
                    out.append(Finding("fs-replaced", ERROR, loc,
                                       f"{_type_name(want_t)} replaced: now ino {ino} dev {dev}, "
                                       f"recorded ino {int(e[ci]['ino'])} dev "
                                       f"{int(e[ci]['dev'])}"))
                    fail = f"ancestor {cpath} was replaced"
                elif check_mnt and int(e[ci]["mnt_id"]) and mnt is not None \
                        and mnt != int(e[ci]["mnt_id"]):
                    out.append(Finding("fs-mount-changed", WARNING, loc,
                                       f"mount id {mnt}, recorded {int(e[ci]['mnt_id'])}"))
                elif ft != _stat.S_IFDIR:
                    fail = f"parent {cpath} is not a directory"
            if not sub or fail is not None:
                if cfd >= 0:
                    os.close(cfd)
                if sub:
                    stack.append((ci, -1, cpath, fail, iter(sub)))
                continue
            stack.append((ci, cfd, cpath, None, iter(sub)))
    finally:
        for frame in stack:
            if frame[1] >= 0 and frame[1] != rootfd:
                os.close(frame[1])


def fs_check(snap, root, device: int | None = None) -> list[Finding]:
    """Findings for every inode map of ``snap`` (or only ``device``) against ``root``."""
    secs = [s for s in snap.all(typeids.VIRTIOFS_INODE_MAP)
            if device is None or s.instance == device]
    if not secs:
        return [Finding("fs-no-inode-map", ERROR, "virtiofs.inode_map",
                        "the snapshot has no virtiofs.inode_map section"
                        + (f" for device {device}" if device is not None else ""))]
    out: list[Finding] = []
    for sec in secs:
        try:
            a = parse_arrays(sec.data, sec.label)
        except FormatError as ex:
            out.append(Finding("fs-map-invalid", ERROR, ex.location or sec.label, ex.message))
            continue
        out.extend(check_map(a, root, sec.label))
    return out


def status_of(findings) -> int:
    codes = {f.code for f in findings}
    if codes & TROUBLE_CODES:
        return EXIT_TROUBLE
    if codes & STALE_CODES:
        return EXIT_STALE
    return EXIT_CLEAN


def cmd_fs_check(args) -> int:
    import snapfmt
    snap = snapfmt.load(args.snapshot)
    try:
        findings = fs_check(snap, args.root, args.device)
        rc = status_of(findings)
        entries = sum(int.from_bytes(bytes(s.data[0:4]), "little")
                      for s in snap.all(typeids.VIRTIOFS_INODE_MAP)
                      if s.length >= 4 and (args.device is None or s.instance == args.device))
    finally:
        snap.close()
    status = {EXIT_CLEAN: "clean", EXIT_STALE: "stale", EXIT_TROUBLE: "trouble"}[rc]
    if args.json:
        sys.stdout.write(json.dumps({"file": args.snapshot, "root": args.root,
                                     "status": status, "entries": entries,
                                     "findings": [f.as_dict() for f in findings]},
                                    indent=1) + "\n")
    else:
        for f in findings:
            sys.stdout.write(f"{f}\n")
        sys.stdout.write(f"{args.snapshot}: {status} ({entries} entries checked against "
                         f"{args.root}, {len(findings)} finding(s))\n")
    return rc


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "fs-check", help="compare a template's virtio-fs inode map with the host directory",
        description="Re-open every entry of the virtiofs.inode_map section(s) under --root "
                    "(no symlink following, no escaping the root) and compare identities. "
                    "Exit 0 clean, 1 stale, 2 trouble.")
    p.add_argument("snapshot", help="snapshot file")
    p.add_argument("--root", required=True, help="the shared directory on this host")
    p.add_argument("--device", type=int, default=None,
                   help="only the inode map of this device index")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_fs_check)
