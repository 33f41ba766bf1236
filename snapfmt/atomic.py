"""Atomic file writes: temp file beside the target, fsync, rename, fsync the directory.

A crash at any point leaves either the old file or the complete new one at the
final path.  :func:`atomic_file` is the one mechanism; snapshots
(:meth:`snapfmt.container.Snapshot.save`) and small files (JSON dumps, PNG
maps, frozen schemas, via :func:`write_atomic`) both use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from .errors import SnapfmtOSError


def default_mode() -> int:
    um = os.umask(0)
    os.umask(um)
    return 0o666 & ~um


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int | None = None):
    """Yield a binary file object; on normal exit it replaces ``path`` atomically.

    Any exception removes the temp file; OSError becomes SnapfmtOSError.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    except OSError as e:
        raise SnapfmtOSError(f"cannot create a temp file in {d}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), default_mode() if mode is None else mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise SnapfmtOSError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_file(path) as f:
        f.write(data)
