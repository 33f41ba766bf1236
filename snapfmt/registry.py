"""Section kinds: the one registry every other module consults.

A :class:`SectionKind` ties a section type id to its construct declaration
(the single source of truth for its layout), its scope, criticality and the
functions that turn its bytes into JSON-ready named fields and back.

Rules every kind follows:

* ``decode(buf)`` returns plain JSON values (dict/list/int/str/bool/None);
  byte blobs are lowercase hex strings (see :data:`snapfmt.decl.HexBytes`).
* ``encode(decode(buf)) == bytes(buf)`` for every valid ``buf`` -- the
  dump/build round trip is byte-identical, so no byte may be dropped
  (padding and reserved fields are declared, not skipped).
* ``annotate(fields)`` returns derived, human-oriented information
  (flag names, decoded bit fields).  It is shown by ``dump`` under
  ``"decoded"`` and ignored by ``build``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import construct

from .errors import EncodeError, FormatError

# Scopes: what the section's ``instance`` number means.
SCOPE_GLOBAL = "global"   # instance is 0
SCOPE_VM = "vm"           # instance is 0 (or the chip id for PIC)
SCOPE_VCPU = "vcpu"       # instance is the vCPU index
SCOPE_DEVICE = "device"   # instance is the device index
SCOPE_RAM = "ram"         # instance is the RAM blob id referenced by MEMORY_LAYOUT

ARCH_ANY = None


def _clean(obj: Any) -> Any:
    """construct Containers/ListContainers -> plain dicts/lists, no private keys."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    return obj


@dataclass(frozen=True, eq=False)
class SectionKind:
    type_id: int
    name: str
    scope: str
    decl: construct.Construct | None
    doc: str
    critical: bool = True
    bulk: bool = False
    arch: str | None = ARCH_ANY
    version: int = 1                      # current section layout version
    kernel_struct: str | None = None      # e.g. "struct kvm_regs" (C checks)
    ioctl: str | None = None              # e.g. "KVM_GET_REGS"
    decode_fn: Callable[[memoryview], dict] | None = None
    encode_fn: Callable[[dict], bytes] | None = None
    annotate_fn: Callable[[dict], dict] | None = None
    check_fn: Callable[[bytes], None] | None = None   # extra structural checks
    extra: dict = field(default_factory=dict)

    @cached_property
    def fixed_size(self) -> int | None:
        if self.decl is None:
            return None
        try:
            return self.decl.sizeof()
        except construct.SizeofError:
            return None

    @cached_property
    def dtype(self):
        """numpy dtype of a fixed-size declaration (None for unions/variable layouts)."""
        if self.fixed_size is None:
            return None
        from .decl import dtype_of
        try:
            return dtype_of(self.decl)
        except TypeError:
            return None

    @cached_property
    def needs_decode_check(self) -> bool:
        """True when only a full decode can tell whether the bytes are valid.

        Fixed layouts of plain integers/bytes are valid at the right length
        (checked at load); variable ones with a check_fn are checked at load.
        """
        if self.bulk:
            return False
        if self.check_fn is not None:
            return False
        return self.decode_fn is not None or self.fixed_size is None

    @cached_property
    def fast_decode(self):
        """numpy decoder equivalent to the construct parse (fixed layouts), or None."""
        if self.decode_fn is not None or self.fixed_size is None:
            return None
        from .decl import fast_decoder
        return fast_decoder(self.decl)

    def decode(self, buf: memoryview | bytes) -> Any:
        buf = bytes(buf)
        if self.decode_fn is not None:
            return self.decode_fn(buf)
        if self.decl is None:
            return {"raw": buf.hex()}
        fixed = self.fixed_size
        if fixed is not None and len(buf) != fixed:
            raise FormatError(f"length {len(buf)} != declared size {fixed}",
                              section=self.name, code="bad-length")
        if self.fast_decode is not None:
            return self.fast_decode(buf)
        try:
            stream_len = len(buf)
            obj = self.decl.parse(buf)
            if fixed is None:
                used = len(self.decl.build(obj))
                if used != stream_len:
                    raise FormatError(f"{stream_len - used} trailing bytes after the "
                                      f"declared content ({used} bytes)", section=self.name,
                                      field="length")
        except construct.ConstructError as e:
            raise FormatError(f"cannot decode: {_one_line(e)}", section=self.name) from None
        return _clean(obj)

    def encode(self, fields: Any) -> bytes:
        if self.encode_fn is not None:
            return self.encode_fn(fields)
        if self.decl is None:
            try:
                return bytes.fromhex(fields["raw"])
            except (KeyError, TypeError, ValueError) as e:
                raise EncodeError(f"expected {{'raw': hex}}: {e}", section=self.name) from None
        try:
            return self.decl.build(fields)
        except (construct.ConstructError, KeyError, TypeError, ValueError) as e:
            raise EncodeError(f"cannot encode: {_one_line(e)}", section=self.name) from None

    def annotate(self, fields: Any) -> dict | None:
        if self.annotate_fn is None:
            return None
        return self.annotate_fn(fields)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


_BY_ID: dict[int, SectionKind] = {}
_BY_NAME: dict[str, SectionKind] = {}


def register(kind: SectionKind) -> SectionKind:
    if kind.type_id in _BY_ID:
        raise RuntimeError(f"section type 0x{kind.type_id:04x} registered twice "
                           f"({_BY_ID[kind.type_id].name}, {kind.name})")
    if kind.name in _BY_NAME:
        raise RuntimeError(f"section name {kind.name} registered twice")
    _BY_ID[kind.type_id] = kind
    _BY_NAME[kind.name] = kind
    return kind


def by_id(type_id: int) -> SectionKind | None:
    _ensure_loaded()
    return _BY_ID.get(type_id)


def by_name(name: str) -> SectionKind | None:
    _ensure_loaded()
    return _BY_NAME.get(name)


def all_kinds() -> list[SectionKind]:
    _ensure_loaded()
    return sorted(_BY_ID.values(), key=lambda k: k.type_id)


_loaded = False


def _ensure_loaded() -> None:
    """Import the declaration modules (each registers its kinds)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import sections_core  # noqa: F401  (registration side effects)
    for mod in ("kvm_x86", "devices", "inode_map", "arm64", "uart", "layers"):
        try:
            __import__(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise
