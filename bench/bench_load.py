#!/usr/bin/env python3
"""Load + validate of a 64-vCPU x86_64 image vs a naive full `construct` parse.

Both sides are measured in this run on the same file:
  naive     -- construct parses the header, every table entry and every section
               with its declaration (no numpy, no laziness), then CRCs them
  snapfmt   -- snapfmt.load (mmap, numpy table) + snapfmt.validate (all checks)
Prints in-process medians, whole-process (python -c) medians and the ratios.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import construct as c  # noqa: E402

import snapfmt  # noqa: E402
from snapfmt import layout as L, registry, synth  # noqa: E402
from snapfmt.crc import crc32c  # noqa: E402


def naive(path: str) -> int:
    data = open(path, "rb").read()
    hdr = L.Header.parse(data)
    table = c.Array(hdr.section_count, L.TableEntry).parse(data[hdr.table_offset:])
    n = 0
    for e in table:
        body = data[e.offset:e.offset + e.length]
        if crc32c(body) != e.crc32c:
            raise ValueError("crc")
        k = registry.by_id(e.type)
        if k is not None and k.decl is not None and not k.bulk:
            k.decl.parse(body)
            n += 1
    return n


def ours(path: str) -> int:
    snap = snapfmt.load(path)
    findings = snapfmt.validate(snap)
    if snapfmt.has_errors(findings):
        raise SystemExit(f"bench image invalid: {findings[0]}")
    return len(snap.sections)


def timeit(fn, *a, repeat=15):
    return pair(fn, fn, *a, repeat=repeat)[0]


def pair(fa, fb, *a, repeat=25):
    """Interleave the two sides so machine load hits both alike; (best, median) each."""
    fa(*a)
    fb(*a)
    ta, tb = [], []
    for _ in range(repeat):
        for fn, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn(*a)
            ts.append(time.perf_counter() - t)
    return (min(ta), statistics.median(ta)), (min(tb), statistics.median(tb))


def proc(code: str, repeat=7):
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "v64.snap")
        snap = synth.x86_snapshot(64, 2 << 20)
        snap.save(path)
        nsec = len(snap.sections)
        (nb, nm), (ob, om) = pair(naive, ours, path)
        print(f"64-vCPU image: {nsec} sections, {os.path.getsize(path) >> 20} MiB "
              f"(2 MiB guest RAM; both sides CRC everything); best / median of 25, interleaved")
        print(f"in-process  naive construct parse : {nb * 1e3:8.2f} / {nm * 1e3:8.2f} ms")
        print(f"in-process  snapfmt load+validate : {ob * 1e3:8.2f} / {om * 1e3:8.2f} ms")
        print(f"in-process  ratio                 : {nb / ob:8.1f}x best, {nm / om:.1f}x median")
        imp0 = proc("import sys; sys.path.insert(0, %r); import snapfmt, construct" % str(ROOT))
        print(f"whole process import baseline     : {imp0 * 1e3:8.2f} ms (python + imports)")
        imp = "import sys; sys.path.insert(0, %r); " % str(ROOT)
        p_naive = proc(imp + "import bench.bench_load as b; b.naive(%r)" % path)
        p_ours = proc(imp + "import bench.bench_load as b; b.ours(%r)" % path)
        print(f"whole process naive               : {p_naive * 1e3:8.2f} ms")
        print(f"whole process snapfmt             : {p_ours * 1e3:8.2f} ms")
        print(f"whole process ratio               : {p_naive / p_ours:8.1f}x "
              f"(beyond the import baseline: {(p_naive - imp0) / max(p_ours - imp0, 1e-6):.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
