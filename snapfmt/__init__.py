"""snapfmt: the snapshot format of native snapshot-fork microVMs.

>>> import snapfmt
>>> snap = snapfmt.load("template.snap")
>>> [f for f in snapfmt.validate(snap) if f.severity == "error"]
[]
"""

from __future__ import annotations

from . import layout
from .container import Section, Snapshot, load, loads
from .errors import (ChecksumError, EncodeError, FormatError, LimitError, SnapfmtError,
                     SnapfmtOSError, TruncatedError, UnknownSectionError, VersionError)
from .findings import Finding
from .validate import has_errors, validate
from . import diff, layers, migrate  # noqa: E402  (subpackages of the public API)
from .diff import diff_snapshots

__version__ = "0.1.0"


def new(arch: str = "x86_64", page_size: int = 4096, flags: int = 0) -> Snapshot:
    """An empty snapshot to fill with :meth:`Snapshot.add` and :meth:`Snapshot.save`."""
    return Snapshot(arch, page_size, flags)


__all__ = ["new", "load", "loads", "validate", "has_errors", "Snapshot", "Section", "Finding",
           "SnapfmtError", "FormatError", "TruncatedError", "ChecksumError", "VersionError",
           "LimitError", "UnknownSectionError", "EncodeError", "SnapfmtOSError", "layout",
           "diff", "diff_snapshots", "layers", "migrate", "__version__"]
