"""Declaration helpers shared by all layout modules.

``HexBytes(n)`` is a fixed-size byte blob whose parsed value is a lowercase
hex string, so parse results are JSON-ready and build(parse(x)) == x.

``dtype_of(decl)`` derives a numpy structured dtype from a construct Struct
of fixed-size fields, so bulk arrays (MSRs, CPUID entries, inode records) are
read with ``np.frombuffer`` using exactly the declared layout.
"""

from __future__ import annotations

import construct
import numpy as np


class _HexAdapter(construct.Adapter):
    def _decode(self, obj, context, path):
        return bytes(obj).hex()

    def _encode(self, obj, context, path):
        if isinstance(obj, (bytes, bytearray)):
            return bytes(obj)
        try:
            return bytes.fromhex(obj)
        except (TypeError, ValueError) as e:
            raise construct.AdaptationError(f"expected a hex string: {e}", path=path)


def HexBytes(n: int) -> construct.Construct:
    """n raw bytes, shown as hex. Used for padding/reserved so they round-trip."""
    return _HexAdapter(construct.Bytes(n))


def field_layout(decl: construct.Construct, base: int = 0, prefix: str = ""):
    """Yield (path, offset, size, type_name) for every leaf field of a fixed Struct."""
    decl = _unwrap(decl)
    if isinstance(decl, construct.Struct):
        off = base
        for sc in decl.subcons:
            name = sc.name
            size = sc.sizeof()
            path = f"{prefix}.{name}" if prefix else name
            inner = _unwrap(sc)
            if isinstance(inner, construct.Struct):
                yield (path, off, size, "struct")
                yield from field_layout(inner, off, path)
            else:
                yield (path, off, size, type_name(sc))
            off += size
    else:
        raise TypeError(f"not a Struct: {decl!r}")


def _unwrap(sc):
    while isinstance(sc, (construct.Renamed, construct.Transformed)) or (
            isinstance(sc, construct.Adapter) and not isinstance(sc, _HexAdapter)
            and hasattr(sc, "subcon")):
        sc = sc.subcon
    return sc


def type_name(sc) -> str:
    """A short, stable type name for schemas: u8/u16/u32/u64/i32/bytes[n]/array..."""
    inner = sc
    while isinstance(inner, construct.Renamed):
        inner = inner.subcon
    if isinstance(inner, _HexAdapter):
        try:
            return f"bytes[{inner.sizeof()}]"
        except construct.SizeofError:
            ln = getattr(inner.subcon, "length", None)
            return f"bytes[{_expr(ln)}]" if ln is not None else "bytes[*]"
    while isinstance(inner, (construct.Adapter, construct.Transformed)) and hasattr(inner, "subcon") \
            and not isinstance(inner, construct.FormatField):
        inner = inner.subcon
    if isinstance(inner, construct.FormatField):
        fmt = inner.fmtstr
        endian = {"<": "le", ">": "be", "=": "ne"}.get(fmt[0], "")
        code = fmt[-1]
        names = {"B": "u8", "b": "i8", "H": "u16", "h": "i16", "I": "u32", "i": "i32",
                 "L": "u32", "l": "i32", "Q": "u64", "q": "i64"}
        base = names.get(code, code)
        return base if base in ("u8", "i8") else f"{base}{endian}"
    if isinstance(inner, construct.BytesInteger):
        return f"u{inner.length * 8}le"
    if isinstance(inner, construct.Array):
        cnt = inner.count if isinstance(inner.count, int) else _expr(inner.count)
        return f"{type_name(inner.subcon)}[{cnt}]"
    if isinstance(inner, construct.Bytes):
        return f"bytes[{inner.length}]"
    if isinstance(inner, construct.Struct):
        return "struct"
    return type(inner).__name__


def _expr(e) -> str:
    """Stable text for a computed count/length (never a function's address)."""
    if callable(e) and not hasattr(e, "__getfield__") and type(e).__name__ in (
            "function", "builtin_function_or_method", "partial"):
        return "<computed>"
    return repr(e).replace("this.", "").replace("this['", "").replace("']", "")


def dtype_of(decl: construct.Construct) -> np.dtype:
    """numpy dtype with the same field names, offsets and sizes as ``decl``."""
    decl = _unwrap(decl)
    if not isinstance(decl, construct.Struct):
        raise TypeError("dtype_of needs a Struct")
    names, formats, offsets = [], [], []
    off = 0
    for sc in decl.subcons:
        size = sc.sizeof()
        names.append(sc.name)
        formats.append(_leaf_dtype(sc))
        offsets.append(off)
        off += size
    dt = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": off})
    if dt.itemsize != decl.sizeof():
        raise AssertionError("dtype size mismatch")
    return dt


def _leaf_dtype(sc):
    inner = sc
    while isinstance(inner, construct.Renamed):
        inner = inner.subcon
    if isinstance(inner, _HexAdapter):
        return np.dtype((np.uint8, inner.sizeof()))
    inner = _unwrap(inner)
    if isinstance(inner, construct.FormatField):
        fmt = inner.fmtstr
        return np.dtype(("<" if fmt[0] == "<" else ">" if fmt[0] == ">" else "=") + fmt[-1]
                        .replace("L", "I").replace("l", "i"))
    if isinstance(inner, construct.Array):
        return np.dtype((_leaf_dtype(inner.subcon), (inner.count,)))
    if isinstance(inner, construct.Bytes):
        return np.dtype((np.uint8, inner.length))
    if isinstance(inner, construct.Struct):
        return dtype_of(inner)
    raise TypeError(f"no numpy dtype for {inner!r}")


def fast_decoder(decl: construct.Construct):
    """A numpy-based decoder equivalent to ``decl.parse`` + JSON cleaning.

    For fixed-size Structs of integers, HexBytes, arrays and nested Structs:
    returns ``fn(buf) -> dict`` giving exactly what the construct parse gives
    (checked by tests/test_declarations.py), about 10-50x faster.  Returns
    None when the declaration has members numpy cannot express (unions).
    """
    try:
        dt = dtype_of(decl)
    except TypeError:
        return None
    conv = _struct_conv(_unwrap(decl))
    if conv is None:
        return None

    def decode(buf):
        return conv(np.frombuffer(buf, dtype=dt, count=1)[0].item())
    return decode


def _leaf_conv(sc):
    inner = sc
    while isinstance(inner, construct.Renamed):
        inner = inner.subcon
    if isinstance(inner, _HexAdapter):
        return lambda v: v.tobytes().hex()
    inner = _unwrap(inner)
    if isinstance(inner, construct.FormatField):
        return int
    if isinstance(inner, construct.Struct):
        return _struct_conv(inner)
    if isinstance(inner, construct.Array) and isinstance(inner.count, int):
        sub = inner.subcon
        while isinstance(sub, construct.Renamed):
            sub = sub.subcon
        if isinstance(_unwrap(sub), construct.FormatField):
            return lambda v: v.tolist()
        elem = _leaf_conv(sub)
        if elem is None:
            return None
        if isinstance(_unwrap(sub), construct.Struct):
            return lambda v: [elem(x.item() if isinstance(x, np.void) else x) for x in v]
        return lambda v: [elem(x) for x in v]
    return None


def _struct_conv(st):
    names, convs = [], []
    for sc in st.subcons:
        c = _leaf_conv(sc)
        if c is None:
            return None
        names.append(sc.name)
        convs.append(c)
    pairs = list(zip(names, convs))

    def conv(t):
        if isinstance(t, np.void):
            t = t.item()
        return {n: c(v) for (n, c), v in zip(pairs, t)}
    return conv
