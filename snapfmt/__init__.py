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

__version__ = "0.1.0"


_LAZY = {"diff": "diff", "layers": "layers", "migrate": "migrate", "compat": "compat"}


def __getattr__(name):
    """Heavier tool modules load on first use (keeps `import snapfmt` and the CLI fast)."""
    import importlib
    if name in _LAZY:
        return importlib.import_module(f".{_LAZY[name]}", __name__)
    if name == "diff_snapshots":
        return importlib.import_module(".diff", __name__).diff_snapshots
    raise AttributeError(f"module 'snapfmt' has no attribute {name!r}")


def new(arch: str = "x86_64", page_size: int = 4096, flags: int = 0) -> Snapshot:
    """An empty snapshot to fill with :meth:`Snapshot.add` and :meth:`Snapshot.save`."""
    return Snapshot(arch, page_size, flags)


__all__ = ["new", "load", "loads", "validate", "has_errors", "Snapshot", "Section", "Finding",
           "SnapfmtError", "FormatError", "TruncatedError", "ChecksumError", "VersionError",
           "LimitError", "UnknownSectionError", "EncodeError", "SnapfmtOSError", "layout",
           "diff", "diff_snapshots", "layers", "migrate", "__version__"]
