"""Page-level comparison of guest RAM (the engine behind `snapfmt diff`).

Guest RAM is compared in place: every RAM section is a zero-copy numpy view of
the snapshot's ``mmap`` (or of its in-memory bytes), walked in chunks of
``chunk_pages`` pages reshaped to ``(pages, page_size / 8)`` uint64 words, so
memory use is bounded by one chunk's temporaries whatever the image size.
Per page the result says: identical, changed, zero in A / zero in B, or
present in one image only.  Changed pages are coalesced into guest-physical
ranges.

A RAM blob of a diff layer (``snapfmt.layers``) is a :class:`LayerSource`: its
chunks are the parent's chunk with the dirty pages laid over it; when the
other side of the comparison *is* that parent, only the dirty pages are read
(the bitmap says every other page is shared).
"""

from __future__ import annotations

import struct
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from .atomic import write_atomic
from .errors import FormatError

DEFAULT_CHUNK_BYTES = 4 << 20        # small enough that a chunk stays in L2/L3 for the zero pass

# page categories (also the palette indices of the PNG map)
CAT_ZERO = 0          # identical and zero in both
CAT_SAME = 1          # identical, non-zero
CAT_CHANGED = 2       # differs, both non-zero
CAT_ZEROED = 3        # differs: zero in B (non-zero in A)
CAT_FILLED = 4        # differs: zero in A (non-zero in B)
CAT_ONLY_A = 5        # page exists in A only
CAT_ONLY_B = 6        # page exists in B only
CAT_UNKNOWN = 7       # identical by the layer bitmap; zero-ness not computed
CAT_NONE = 8          # padding of the map grid
CATEGORY_NAMES = ("zero", "identical", "changed", "zeroed", "filled", "only-in-a", "only-in-b",
                  "identical (bitmap)", "")
PALETTE = (
    (0, 0, 0),          # zero: black
    (70, 70, 70),       # identical: dark grey
    (230, 40, 40),      # changed: red
    (255, 170, 0),      # zeroed: orange
    (240, 240, 60),     # filled: yellow
    (40, 110, 240),     # only in A: blue
    (40, 200, 80),      # only in B: green
    (100, 100, 130),    # identical by bitmap: grey-blue
    (255, 255, 255),    # padding: white
)


# ----------------------------------------------------------------- page sources

def section_bytes(sec) -> np.ndarray:
    """Zero-copy uint8 view of a section's bytes (mmap'ed file or in-memory data)."""
    if sec._data is not None:
        d = sec._data
        return d.reshape(-1).view(np.uint8) if isinstance(d, np.ndarray) else \
            np.frombuffer(d, dtype=np.uint8)
    buf = sec.snapshot._buf
    if buf is None:
        raise FormatError("section has no bytes (snapshot closed?)", section=sec.label)
    if sec.length == 0:
        return np.zeros(0, np.uint8)
    return np.frombuffer(buf, dtype=np.uint8, count=sec.length, offset=sec.offset)


class PageSource:
    """Pages of one RAM blob: ``npages`` pages of ``page_size`` bytes."""

    npages: int
    page_size: int

    def chunk(self, p0: int, p1: int) -> np.ndarray:
        """Pages [p0, p1) as a (p1-p0, page_size/8) uint64 array (view when possible)."""
        raise NotImplementedError

    def pages(self, idx: np.ndarray) -> np.ndarray:
        """Pages at the sorted indices ``idx`` as a (len, page_size/8) uint64 array (copy)."""
        raise NotImplementedError


class ArraySource(PageSource):
    def __init__(self, arr: np.ndarray, page_size: int):
        if arr.size % page_size:
            raise FormatError(f"RAM blob of {arr.size} bytes is not a multiple of the page size "
                              f"{page_size}")
        self.page_size = page_size
        self.npages = arr.size // page_size
        self.words = arr.view(np.uint64).reshape(self.npages, page_size // 8) if arr.size else \
            np.zeros((0, page_size // 8), np.uint64)

    def chunk(self, p0, p1):
        return self.words[p0:p1]

    def pages(self, idx):
        return self.words[idx]


class LayerSource(PageSource):
    """A diff layer's RAM blob over its parent's blob: dirty pages packed in bitmap order."""

    def __init__(self, base: PageSource | None, dirty: np.ndarray, packed: np.ndarray,
                 page_size: int, parent_digest: str = ""):
        self.page_size = page_size
        self.npages = int(dirty.size)
        self.base = base
        self.dirty = dirty                              # bool[npages]
        self.dirty_idx = np.flatnonzero(dirty)
        self.packed = ArraySource(packed, page_size)    # ndirty pages
        self.parent_digest = parent_digest
        if self.packed.npages != self.dirty_idx.size:
            raise FormatError(f"layer RAM blob holds {self.packed.npages} pages, its bitmap has "
                              f"{self.dirty_idx.size} dirty pages")
        clean_max = int(np.flatnonzero(~dirty)[-1]) + 1 if (~dirty).any() else 0
        have = base.npages if base is not None else 0
        if clean_max > have:
            raise FormatError(f"clean page {clean_max - 1} of the layer is beyond the parent's "
                              f"{have}-page RAM blob")

    def chunk(self, p0, p1):
        out = np.empty((p1 - p0, self.page_size // 8), np.uint64)
        bend = min(p1, self.base.npages if self.base is not None else 0)
        if bend > p0:
            out[:bend - p0] = self.base.chunk(p0, bend)
        lo, hi = np.searchsorted(self.dirty_idx, [p0, p1])
        if hi > lo:
            out[self.dirty_idx[lo:hi] - p0] = self.packed.words[lo:hi]
        return out

    def pages(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return np.zeros((0, self.page_size // 8), np.uint64)
        return self._pages_bulk(idx)

    def _pages_bulk(self, idx):
        out = np.empty((len(idx), self.page_size // 8), np.uint64)
        pos = np.searchsorted(self.dirty_idx, idx)
        pos_c = np.minimum(pos, max(self.dirty_idx.size - 1, 0))
        if self.dirty_idx.size:
            is_dirty = self.dirty_idx[pos_c] == idx
        else:
            is_dirty = np.zeros(len(idx), bool)
        if is_dirty.any():
            out[is_dirty] = self.packed.words[pos_c[is_dirty]]
        if (~is_dirty).any():
            out[~is_dirty] = self.base.pages(idx[~is_dirty])
        return out


# --------------------------------------------------------------------- results

@dataclass
class RegionDiff:
    """Comparison of the guest RAM at one guest-physical range."""
    gpa: int
    size: int                    # bytes covered (union of A's and B's regions here)
    pages: int
    in_a: bool
    in_b: bool
    identical: int = 0           # identical pages (zero or not)
    zero: int | None = 0         # identical and zero in both (None: not computed, bitmap diff)
    changed: int = 0             # differing pages (includes zeroed and filled)
    zeroed: int = 0              # differing: zero in B
    filled: int = 0              # differing: zero in A
    only_a: int = 0
    only_b: int = 0
    method: str = "compare"      # "compare" | "bitmap" (layer against its parent)
    changed_ranges: list = field(default_factory=list)   # [(gpa_start, gpa_end)]
    categories: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self, max_ranges: int | None = None) -> dict:
        rng = self.changed_ranges if max_ranges is None else self.changed_ranges[:max_ranges]
        return {"gpa": self.gpa, "size": self.size, "pages": self.pages, "in_a": self.in_a,
                "in_b": self.in_b, "identical": self.identical, "zero": self.zero,
                "changed": self.changed, "zeroed": self.zeroed, "filled": self.filled,
                "only_in_a": self.only_a, "only_in_b": self.only_b, "method": self.method,
                "changed_ranges": [[a, b] for a, b in rng],
                "changed_ranges_total": len(self.changed_ranges)}


@dataclass
class RamDiff:
    page_size: int
    regions: list[RegionDiff]
    bytes_compared: int = 0
    seconds: float = 0.0

    def total(self, attr: str) -> int:
        return sum(getattr(r, attr) or 0 for r in self.regions)

    @property
    def pages(self) -> int:
        return self.total("pages")

    @property
    def same(self) -> bool:
        return all(r.changed == 0 and r.only_a == 0 and r.only_b == 0 for r in self.regions)

    @property
    def shared_fraction(self) -> float:
        """Share of B's pages identical to A's: what a CoW child of template A still shares."""
        b_pages = sum(r.pages - r.only_a for r in self.regions)
        return (self.total("identical") / b_pages) if b_pages else 1.0

    def as_dict(self, max_ranges: int | None = None) -> dict:
        return {"page_size": self.page_size, "pages": self.pages,
                "identical": self.total("identical"),
                "zero": None if any(r.zero is None for r in self.regions) else self.total("zero"),
                "changed": self.total("changed"), "zeroed": self.total("zeroed"),
                "filled": self.total("filled"), "only_in_a": self.total("only_a"),
                "only_in_b": self.total("only_b"), "shared_fraction": self.shared_fraction,
                "bytes_compared": self.bytes_compared,
                "regions": [r.as_dict(max_ranges) for r in self.regions]}


# ------------------------------------------------------------------ comparison

class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, total_bytes: int, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = self.stream.isatty() and total_bytes >= (256 << 20)
        self.enabled = enabled
        self.total = max(total_bytes, 1)
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = min(self.done / self.total, 1.0)
        rate = self.done / max(now - self.t0, 1e-9) / (1 << 30)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\rcomparing RAM [{bar:<30}] {frac * 100:5.1f}% {rate:6.2f} GiB/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 70 + "\r")
            self.stream.flush()


def _ranges(mask: np.ndarray, base_gpa: int, page_size: int, offset_pages: int = 0) -> list:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([idx[0]], idx[breaks + 1])) + offset_pages
    ends = np.concatenate((idx[breaks], [idx[-1]])) + 1 + offset_pages
    return [(base_gpa + int(s) * page_size, base_gpa + int(e) * page_size)
            for s, e in zip(starts.tolist(), ends.tolist())]


def compare_sources(a: PageSource | None, b: PageSource | None, gpa: int, page_size: int, *,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: Progress | None = None,
                    keep_categories: bool = False) -> RegionDiff:
    """Compare two blobs mapped at the same guest-physical address ``gpa``."""
    na = a.npages if a is not None else 0
    nb = b.npages if b is not None else 0
    n = max(na, nb)
    common = min(na, nb)
    rd = RegionDiff(gpa=gpa, size=n * page_size, pages=n, in_a=a is not None, in_b=b is not None)
    cats = np.full(n, CAT_NONE, np.uint8) if keep_categories else None
    rd.only_a = na - common
    rd.only_b = nb - common
    if cats is not None:
        cats[common:na] = CAT_ONLY_A
        cats[common:nb] = CAT_ONLY_B
    if common:
        if isinstance(b, LayerSource) and b.base is a:
            _compare_bitmap(a, b, common, rd, cats)
        elif isinstance(a, LayerSource) and a.base is b:
            _compare_bitmap(b, a, common, rd, cats, swapped=True)
        else:
            _compare_full(a, b, common, page_size, rd, cats, chunk_bytes, progress)
    rd.categories = cats
    return rd


def _compare_full(a, b, n, page_size, rd, cats, chunk_bytes, progress):
    cp = max(1, chunk_bytes // page_size)
    changed = np.zeros(n, bool)
    za_all = np.zeros(n, bool)
    zb_changed_cnt = 0
    za_changed_cnt = 0
    zero_both = 0
    for p0 in range(0, n, cp):
        p1 = min(p0 + cp, n)
        A = a.chunk(p0, p1)
        B = b.chunk(p0, p1)
        ne = (A != B).any(axis=1)
        za = ~A.any(axis=1)
        changed[p0:p1] = ne
        za_all[p0:p1] = za
        if ne.any():
            idx = np.flatnonzero(ne)
            zb = ~B[idx].any(axis=1)
            zb_changed_cnt += int(zb.sum())
            za_changed_cnt += int(za[idx].sum())
            if cats is not None:
                cc = np.full(idx.size, CAT_CHANGED, np.uint8)
                cc[zb] = CAT_ZEROED
                cc[za[idx]] = CAT_FILLED
                cats[p0 + idx] = cc
        same = ~ne
        zero_both += int((za & same).sum())
        if cats is not None:
            seg = cats[p0:p1]
            seg[same & za] = CAT_ZERO
            seg[same & ~za] = CAT_SAME
        if progress is not None:
            progress.advance(2 * (p1 - p0) * page_size)
    nchanged = int(changed.sum())
    rd.changed = nchanged
    rd.identical = n - nchanged
    rd.zero = zero_both
    rd.zeroed = zb_changed_cnt
    rd.filled = za_changed_cnt
    rd.changed_ranges = _ranges(changed, rd.gpa, page_size)


def _compare_bitmap(parent: PageSource, layer: LayerSource, n, rd, cats, swapped=False):
    """Layer against its own parent: only the dirty pages can differ."""
    rd.method = "bitmap"
    idx = layer.dirty_idx[layer.dirty_idx < n]
    changed = np.zeros(n, bool)
    nz_parent = nz_layer = None
    if idx.size:
        P = parent.pages(idx)
        D = layer.packed.words[:idx.size]
        ne = (P != D).any(axis=1)
        changed[idx[ne]] = True
        nz_parent = P[ne].any(axis=1)
        nz_layer = D[ne].any(axis=1)
    nchanged = int(changed.sum())
    rd.changed = nchanged
    rd.identical = n - nchanged
    rd.zero = None
    if nz_parent is not None:
        # A is the parent unless swapped
        za, zb = (~nz_parent, ~nz_layer) if not swapped else (~nz_layer, ~nz_parent)
        rd.zeroed = int((zb & ~za).sum())
        rd.filled = int((za & ~zb).sum())
        if cats is not None:
            cats[:n] = CAT_UNKNOWN
            cc = np.full(int(za.size), CAT_CHANGED, np.uint8)
            cc[zb] = CAT_ZEROED
            cc[za] = CAT_FILLED
            cats[np.flatnonzero(changed)] = cc
    elif cats is not None:
        cats[:n] = CAT_UNKNOWN
    rd.changed_ranges = _ranges(changed, rd.gpa, layer.page_size)


# --------------------------------------------------------------------- PNG map

def png_bytes(categories: np.ndarray, width: int = 512) -> bytes:
    """A palette PNG with one pixel per page, row-major, ``width`` pages per row."""
    if width <= 0:
        raise ValueError("width must be positive")
    n = int(categories.size)
    h = max(1, -(-n // width))
    grid = np.full(h * width, CAT_NONE, np.uint8)
    grid[:n] = categories
    rows = grid.reshape(h, width)
    raw = np.zeros((h, width + 1), np.uint8)      # filter byte 0 (None) per row
    raw[:, 1:] = rows
    idat = zlib.compress(raw.tobytes(), 6)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + \
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, h, 8, 3, 0, 0, 0)   # 8-bit palette
    plte = b"".join(bytes(c) for c in PALETTE)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"PLTE", plte)
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def write_png(path: str, categories: np.ndarray, width: int = 512) -> None:
    """Write the RAM map atomically (temp file + rename)."""
    write_atomic(path, png_bytes(categories, width))
