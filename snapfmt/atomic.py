"""Atomic small-file writes (JSON dumps, PNG maps, frozen schemas).

Snapshots themselves are written by :meth:`snapfmt.container.Snapshot.save`
(sparse, section by section); this is for everything else a command writes:
temp file beside the target, fsync, rename, fsync the directory.
"""

from __future__ import annotations

import os
import tempfile

from .errors import SnapfmtOSError


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    except OSError as e:
        raise SnapfmtOSError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            um = os.umask(0)
            os.umask(um)
            os.fchmod(f.fileno(), 0o666 & ~um)
            os.fsync(f.fileno())
        os.rename(tmp, path)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise SnapfmtOSError(f"cannot write {path}: {e.strerror or e}") from None
