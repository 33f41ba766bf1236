"""One helper for every declared struct and vector: parse == obj, build == data, sizeof."""

import pytest

import snapfmt
from snapfmt import registry
from snapfmt.decl import dtype_of

from conftest import GOLDEN


def roundtrip(kind, data: bytes):
    obj = kind.decode(data)
    assert kind.encode(obj) == data
    if kind.fixed_size is not None:
        assert kind.fixed_size == len(data)
        assert kind.decl.build(kind.decl.parse(data)) == data
    return obj


def _vectors():
    out = []
    for p in sorted(GOLDEN.glob("*.snap")):
        snap = snapfmt.load(p)
        for s in snap.sections:
            if s.kind is not None and not s.bulk:
                out.append(pytest.param(s.kind.name, bytes(s.data),
                                        id=f"{p.stem}:{s.label}"))
    return out


@pytest.mark.parametrize("name,data", _vectors())
def test_every_golden_section_roundtrips(name, data):
    roundtrip(registry.by_name(name), data)


@pytest.mark.parametrize("kind", [k for k in registry.all_kinds() if k.fixed_size],
                         ids=lambda k: k.name)
def test_fixed_kinds_roundtrip_zero_and_pattern(kind):
    roundtrip(kind, bytes(kind.fixed_size))


def _flat(k):
    try:
        dtype_of(k.decl)
        return True
    except TypeError:        # unions (kvm_irqchip) have no flat numpy dtype
        return False


@pytest.mark.parametrize("kind", [k for k in registry.all_kinds() if k.fixed_size and _flat(k)],
                         ids=lambda k: k.name)
def test_numpy_dtype_matches_declaration(kind):
    import numpy as np
    dt = dtype_of(kind.decl)
    assert dt.itemsize == kind.fixed_size
    data = bytes(range(256)) * (kind.fixed_size // 256 + 1)
    data = data[:kind.fixed_size]
    arr = np.frombuffer(data, dtype=dt)
    obj = kind.decl.parse(data)
    first = dt.names[0]
    if dt[first].shape == () and dt[first].kind in "ui":
        assert int(arr[first][0]) == obj[first]


from hypothesis import given, settings, strategies as st  # noqa: E402

FAST = [k for k in registry.all_kinds() if k.fast_decode is not None]


@pytest.mark.parametrize("kind", FAST, ids=lambda k: k.name)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_numpy_fast_decode_equals_construct_parse(kind, data):
    from snapfmt.registry import _clean
    b = data.draw(st.binary(min_size=kind.fixed_size, max_size=kind.fixed_size))
    assert kind.fast_decode(b) == _clean(kind.decl.parse(b))
