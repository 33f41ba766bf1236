#!/usr/bin/env python3
"""Throughput of `snapfmt diff` on guest RAM against cmp, cmp -l and plain reading.

Builds two snapshots with SIZE MiB of guest RAM each (default 1024): A has a
share of non-zero pages (the rest are holes: the files are sparse), B is A
with a share of its pages changed.  Both files are read once so they sit in
the page cache, then each contender is timed (best of --repeat runs):

  read both      numpy readinto of both files (the floor any comparison pays)
  cat            `cat A B > /dev/null`
  cmp            `cmp A B` (stops at the first differing byte: shown for reference)
  cmp -l         `cmp -l A B | wc -c` (lists every differing byte; GNU cmp skips the
                 work when its output is /dev/null, so the output is piped)
  library        snapfmt.diff.diff_ram (mmap + numpy, no copy)
  cli            `snapfmt diff --ram-only A B` (process start-up included)

Usage: .venv/bin/python bench/bench_diff.py [--size-mib 1024] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import snapfmt  # noqa: E402
from snapfmt import diff as sdiff  # noqa: E402
from snapfmt import synth  # noqa: E402

PAGE = 4096


def build(dirname: str, size_mib: int, touched: float, changed: float, seed: int = 1,
          change_words: int = PAGE // 8):
    rng = np.random.default_rng(seed)
    npages = size_mib * 256
    ram = np.zeros((npages, PAGE // 8), np.uint64)
    nz = rng.random(npages) < touched
    ram[nz] = rng.integers(1, 2**63, size=(int(nz.sum()), PAGE // 8), dtype=np.uint64)
    a = synth.x86_snapshot(2, 1 << 20, template=True)
    a.remove(a.find("ram"))
    a.remove(a.find("memory_layout"))
    a.add_ram(0, ram.reshape(-1).view(np.uint8))
    pa = os.path.join(dirname, "a.snap")
    a.save(pa)
    del a
    ch = rng.random(npages) < changed
    nch = int(ch.sum())
    words = max(1, min(PAGE // 8, change_words))
    ram[ch, :words] = rng.integers(1, 2**63, size=(nch, words), dtype=np.uint64)
    b = synth.x86_snapshot(2, 1 << 20, template=True)
    b.remove(b.find("ram"))
    b.remove(b.find("memory_layout"))
    b.add_ram(0, ram.reshape(-1).view(np.uint8))
    pb = os.path.join(dirname, "b.snap")
    b.save(pb)
    return pa, pb, int(ch.sum()), npages


def read_both(pa: str, pb: str) -> None:
    buf = np.empty(64 << 20, np.uint8)
    for p in (pa, pb):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(cmd) -> None:
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--touched", type=float, default=0.6, help="share of non-zero pages in A")
    ap.add_argument("--changed", type=float, default=0.02, help="share of pages changed in B")
    ap.add_argument("--change-words", type=int, default=PAGE // 8,
                    help="8-byte words rewritten in each changed page (default: the whole page)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="where to build the images (default: a temp dir, removed)")
    ap.add_argument("--skip-cmp-l", action="store_true", help="cmp -l is slow; skip it")
    args = ap.parse_args()

    d = args.dir or tempfile.mkdtemp(prefix="bench-diff-")
    try:
        t = time.perf_counter()
        pa, pb, nchanged, npages = build(d, args.size_mib, args.touched, args.changed,
                                         change_words=args.change_words)
        size = os.path.getsize(pa) + os.path.getsize(pb)
        print(f"built 2 x {args.size_mib} MiB of guest RAM ({npages} pages, {nchanged} changed) "
              f"in {time.perf_counter() - t:.1f} s; files {size / 2**30:.2f} GiB total, "
              f"{(os.stat(pa).st_blocks + os.stat(pb).st_blocks) * 512 / 2**30:.2f} GiB on disk")
        read_both(pa, pb)                     # into the page cache

        a, b = snapfmt.load(pa), snapfmt.load(pb)
        rd, _ = sdiff.diff_ram(a, b)
        if rd.total("changed") != nchanged:
            print(f"MISMATCH: diff found {rd.total('changed')} changed pages, built {nchanged}",
                  file=sys.stderr)
            return 1
        ram_bytes = 2 * npages * PAGE

        res = {}
        res["read both (numpy readinto)"] = timed(lambda: read_both(pa, pb), args.repeat)
        if shutil.which("cat"):
            res["cat A B > /dev/null"] = timed(lambda: run(["cat", pa, pb]), args.repeat)
        res["snapfmt library diff_ram"] = timed(
            lambda: sdiff.diff_ram(snapfmt.load(pa), snapfmt.load(pb)), args.repeat)
        cli = [sys.executable, "-m", "snapfmt", "diff", "--ram-only", "-q", pa, pb]
        res["snapfmt diff --ram-only (CLI)"] = timed(lambda: run(cli), args.repeat)
        if shutil.which("cmp"):
            # GNU cmp behaves like -s when stdout is /dev/null: pipe its output instead
            res["cmp A B (stops at 1st diff)"] = timed(lambda: run(["cmp", pa, pb]), args.repeat)
            if not args.skip_cmp_l:
                res["cmp -l A B | wc -c"] = timed(
                    lambda: subprocess.run(f"cmp -l '{pa}' '{pb}' | wc -c", shell=True,
                                           stdout=subprocess.DEVNULL, check=False), 1)

        read = res["read both (numpy readinto)"]
        lib = res["snapfmt library diff_ram"]
        print(f"\n{'contender':<34} {'seconds':>8} {'GiB/s':>8} {'vs read':>8}")
        for k, v in res.items():
            print(f"{k:<34} {v:8.3f} {size / v / 2**30:8.2f} {read / v:8.2f}x")
        print(f"\nlibrary diff throughput: {ram_bytes / lib / 2**30:.2f} GiB/s of RAM compared; "
              f"{read / lib:.2f} x the speed of reading both files "
              f"(target >= 0.5)")
        if "cmp -l A B | wc -c" in res:
            print(f"library diff is {res['cmp -l A B | wc -c'] / lib:.1f} x faster than cmp -l")
        return 0
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
