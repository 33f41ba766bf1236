"""The one small exception hierarchy of snapfmt.

Every error raised for bad input is a :class:`SnapfmtError`.  Each subclass
also inherits the matching built-in error so callers that already catch
``ValueError`` / ``EOFError`` / ``OSError`` keep working.  Errors carry a
location (section, field, byte offset) and render as one line.
"""

from __future__ import annotations


class SnapfmtError(Exception):
    """Base class: bad input, one clear line.

    ``section``: e.g. ``"x86.regs[vcpu 3]"`` or ``"header"``;
    ``field``: dotted field path within it; ``offset``: absolute byte offset
    in the file (or buffer) where the problem is; ``hint``: what to try.
    """

    code = "error"

    def __init__(self, message: str, *, section: str | None = None,
                 field: str | None = None, offset: int | None = None,
                 hint: str | None = None, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code          # one of layout.ERROR_CODES, as 'bad-crc' etc.
        self.message = message
        self.section = section
        self.field = field
        self.offset = offset
        self.hint = hint

    @property
    def location(self) -> str:
        parts = []
        if self.section:
            parts.append(self.section)
        if self.field:
            parts.append(self.field)
        loc = ".".join(parts)
        if self.offset is not None:
            loc = f"{loc} at byte {self.offset}" if loc else f"byte {self.offset}"
        return loc

    def __str__(self) -> str:
        loc = self.location
        s = f"{loc}: {self.message}" if loc else self.message
        if self.hint:
            s += f" (hint: {self.hint})"
        return s


class FormatError(SnapfmtError, ValueError):
    """The bytes do not follow the format (bad magic, bounds, overlap...)."""
    code = "bad-header"


class TruncatedError(FormatError, EOFError):
    """The input ends before a structure it declares."""
    code = "truncated"


class ChecksumError(FormatError):
    """A CRC32C does not match."""
    code = "bad-crc"


class VersionError(FormatError):
    """The file's version range does not include what this reader supports."""
    code = "bad-version"


class LimitError(FormatError):
    """A count or length exceeds a hard limit of the format."""
    code = "limit"


class UnknownSectionError(FormatError):
    """A CRITICAL section of a type (or version) this reader does not know."""
    code = "unknown-critical"


class EncodeError(SnapfmtError, ValueError):
    """A value cannot be encoded (JSON to image, section build)."""
    code = "inval"


class SnapfmtOSError(SnapfmtError, OSError):
    """The file cannot be opened / read / written."""
    code = "io"
