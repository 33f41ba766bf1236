#!/usr/bin/env python3
"""virtio-fs inode map and virtio quiesce check at scale.

  1. 1,000,000-entry inode map in a snapshot file:
       snapfmt   -- snapfmt.load (mmap) + numpy views + validate_map (every rule)
       naive     -- construct InodeEntry.parse per record + the tree rules in plain
                    Python (dict of nodeids, parent walk, (parent, name) set);
                    timed on the first 50,000 records and scaled x20 (said so below)
  2. C: snapfmt_fs_map_parse + snapfmt_fs_foreach over the same map (gcc -O2)
  3. virtio quiesce check of a template with 1 GiB of guest RAM (rings near the
     top of RAM, read through numpy views of the mmap: no copy)

    .venv/bin/python bench/bench_inode_map.py [--entries N] [--ram-mib M] [--keep]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import snapfmt  # noqa: E402
from snapfmt import devices as D, inode_map as im  # noqa: E402

NAIVE_SAMPLE = 50_000


def synthetic_map(n: int, fan: int = 20) -> bytes:
    k = np.arange(n, dtype=np.uint64)
    e = np.zeros(n, im.ENTRY_DTYPE)
    e["nodeid"] = k + 1
    e["parent"] = np.where(k == 0, 0, 1 + (k - 1) // fan)
    e["ino"] = k + 1000
    e["dev"] = 2049
    e["refcount"] = 1
    e["refcount"][0] = 2
    e["file_type"] = np.where(k < n // fan + 1, 0o040000, 0o100000)
    names = [b""] + [b"file-%07d" % i for i in range(2, n + 1)]
    return im.build_map(dict(next_inode=n + 1, root_ino=1000, root_dev=2049,
                             flags=im.INOMAP_F_HARDLINK_DEDUP), e, names)


class zero_copy_sections:
    """Temporarily make Section.data a zero-copy memoryview slice of the mmap.

    The current container.py slices the mmap itself, which COPIES the section
    bytes; this shows what the checks cost once that is fixed (reported separately).
    """

    def __enter__(self):
        from snapfmt import container as C
        self.C, self.orig = C, C.Section.data

        def data(sec):
            if sec._data is None:
                sec._data = memoryview(sec.snapshot._buf)[sec.offset:sec.offset + sec.length]
            return memoryview(sec._data)
        C.Section.data = property(data)

    def __exit__(self, *exc):
        self.C.Section.data = self.orig


def container_copies(path) -> bool:
    s = snapfmt.load(path)
    try:
        return isinstance(s.sections[0].data.obj, (bytes, bytearray))
    finally:
        s.close()


def best(fn, reps=3):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times), out


def naive(data: bytes, count: int) -> int:
    """Per-record construct parse + plain-Python tree rules on the first `count` entries."""
    hdr = im.InodeMapHeader.parse(data[:64])
    ne = hdr.entry_count
    soff = 64 + ne * 72 + hdr.handle_count * 24 + hdr.mount_count * 16
    strtab = data[soff:soff + hdr.strtab_len]
    recs = []
    for i in range(count):
        r = im.InodeEntry.parse(data[64 + 72 * i:64 + 72 * (i + 1)])
        recs.append(r)
    by_id = {r.nodeid: r for r in recs}
    names = set()
    problems = 0
    for r in recs:
        name = strtab[r.name_off:r.name_off + r.name_len]
        if r.nodeid != 1:
            if r.parent not in by_id and r.parent <= count:
                problems += 1
            if b"/" in name or b"\0" in name or name in (b".", b"..", b""):
                problems += 1
            key = (r.parent, name)
            if key in names:
                problems += 1
            names.add(key)
        depth, cur = 0, r
        while cur.nodeid != 1 and cur.parent in by_id and depth < 4096:
            cur = by_id[cur.parent]
            depth += 1
    return problems


def build_c(out: pathlib.Path) -> pathlib.Path | None:
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return None
    exe = out / "fs_verify"
    shim = ROOT / "shim"
    subprocess.run([cc, "-std=c11", "-O2", "-I", str(shim), "-o", str(exe),
                    str(shim / "tests" / "fs_verify.c"), str(shim / "snapfmt_fs.c"),
                    str(shim / "snapfmt.c"), str(shim / "crc32c.c")], check=True)
    return exe


def virtio_image(path: pathlib.Path, ram_mib: int) -> None:
    ram_bytes = ram_mib << 20
    ram = np.zeros(ram_bytes, np.uint8)           # untouched pages stay unallocated
    top = ram_bytes - (1 << 20)
    queues = []
    for d in range(4):
        for qi in range(2):
            base = top + (d * 2 + qi) * 0x4000
            desc, avail, used = base, base + 0x1000, base + 0x2000
            struct.pack_into("<HH", ram, avail, 0, 1000 + qi)
            struct.pack_into("<HH", ram, used, 0, 1000 + qi)
            queues.append((d, dict(max_size=256, size=256, ready=1, event_idx=0,
                                   desc_addr=desc, avail_addr=avail, used_addr=used,
                                   next_avail=1000 + qi, next_used=1000 + qi, num_added=0)))
    snap = snapfmt.new("x86_64", flags=snapfmt.layout.HDR_F_TEMPLATE)
    snap.add_ram(0, memoryview(ram))
    for d in range(4):
        feat = 1 << D.F_VERSION_1
        snap.add("virtio.mmio", d, fields=dict(
            device_type=2 if d < 3 else 26, irq=5 + d, mmio_base=0xD000_0000 + 0x1000 * d,
            mmio_len=0x1000, device_features=feat, driver_features=feat, status=0xF,
            config_generation=0, interrupt_status=0, queue_sel=0, device_features_sel=0,
            driver_features_sel=0, activated=1, config="", shm_regions=[],
            queues=[q for dd, q in queues if dd == d]))
    snap.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the files in bench/out")
    args = ap.parse_args(argv)
    out = ROOT / "bench" / "out" if args.keep else pathlib.Path(tempfile.mkdtemp(
        prefix="bench-inode-map-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        n = args.entries
        t = time.perf_counter()
        data = synthetic_map(n)
        snap = snapfmt.new("x86_64")
        snap.add("virtiofs.inode_map", 0, data=data)
        path = out / "inode_map.snap"
        snap.save(path)
        (out / "inode_map.bin").write_bytes(data)
        print(f"inode map: {n:,} entries, {len(data) / 2**20:.1f} MiB section "
              f"(built in {time.perf_counter() - t:.2f}s)")

        def fast():
            s = snapfmt.load(path)
            a = im.parse_arrays(s.find("virtiofs.inode_map").data)
            f = im.validate_map(a)
            del a
            s.close()
            return f
        fb, fm, found = best(fast)
        if found:
            raise SystemExit(f"unexpected findings: {found[:3]}")
        sample = min(NAIVE_SAMPLE, n)
        nb, nm, _ = best(lambda: naive(data, sample), reps=2)
        scale = n / sample
        naive_full = nb * scale
        print(f"  snapfmt load + validate (numpy, all rules): best {fb * 1e3:8.1f} ms, "
              f"median {fm * 1e3:8.1f} ms")
        print(f"  naive construct per record + Python rules:  {nb * 1e3:8.1f} ms for "
              f"{sample:,} entries, scaled x{scale:g} -> {naive_full:8.2f} s (estimated)")
        print(f"  ratio naive / snapfmt: {naive_full / fb:,.0f}x  (target >= 50x)")
        if container_copies(path):
            with zero_copy_sections():
                zb, zm, _ = best(fast)
            print(f"  with zero-copy Section.data (container fix pending): best "
                  f"{zb * 1e3:.1f} ms, median {zm * 1e3:.1f} ms -> ratio "
                  f"{naive_full / zb:,.0f}x")

        exe = build_c(out)
        if exe is None:
            print("  C: no compiler, skipped")
        else:
            p = subprocess.run([str(exe), "iterate", str(out / "inode_map.bin"), "5"],
                               capture_output=True, text=True, check=True)
            fields = p.stdout.split()
            print(f"  C snapfmt_fs_map_parse: {float(fields[3]):.1f} ms, "
                  f"snapfmt_fs_foreach: {float(fields[5]):.1f} ms per pass ({n:,} entries)")

        vpath = out / "virtio.snap"
        t = time.perf_counter()
        virtio_image(vpath, args.ram_mib)
        print(f"virtio quiesce: template with {args.ram_mib} MiB guest RAM, 4 devices x 2 "
              f"queues (written in {time.perf_counter() - t:.1f}s, "
              f"{os.path.getsize(vpath) / 2**30:.2f} GiB file, sparse)")

        def quiesce():
            s = snapfmt.load(vpath)
            f = list(D.check_virtio_devices(s))
            s.close()
            return f
        qb, qm, qf = best(quiesce, reps=5)
        if qf:
            raise SystemExit(f"unexpected findings: {qf[:3]}")
        print(f"  load + virtio device/quiesce check: best {qb * 1e3:.1f} ms, "
              f"median {qm * 1e3:.1f} ms (as the container is today)")

        if container_copies(vpath):
            with zero_copy_sections():
                zb, zm, _ = best(quiesce, reps=5)
            print(f"  NOTE: container Section.data copies the {args.ram_mib} MiB RAM section "
                  f"out of the mmap; with a zero-copy slice (memoryview(mmap)[a:b]) the same "
                  f"check takes best {zb * 1e3:.2f} ms, median {zm * 1e3:.2f} ms")

        def full():
            s = snapfmt.load(vpath)
            f = snapfmt.validate(s, deep=False)
            s.close()
            return f
        vb, vm, _ = best(full, reps=3)
        print(f"  load + snapfmt.validate(deep=False):  best {vb * 1e3:.1f} ms, "
              f"median {vm * 1e3:.1f} ms")
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
