"""C shim vs Python: open + full verify of a 1-vCPU and a 64-vCPU state image.

C: snapfmt_open(SNAPFMT_OPEN_DEEP) + close (every spec check, every CRC incl.
RAM), many iterations, from a file (mmap) and from a memory buffer.
Python: snapfmt.load + deep_verify (the same container-level work) in the
same run, and load + validate (adds the semantic checks) for reference.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import snapfmt  # noqa: E402
from snapfmt import synth  # noqa: E402


def py_time(fn, min_seconds=1.0) -> float:
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds and n >= 5:
            return dt / n * 1e6


def main() -> int:
    subprocess.run(["make", "-C", str(ROOT / "shim"), "-s"], check=True)
    with tempfile.TemporaryDirectory() as d:
        exe = pathlib.Path(d) / "bench_shim"
        subprocess.run(["cc", "-O2", "-I", str(ROOT / "shim"), "-o", str(exe),
                        str(ROOT / "bench" / "bench_shim.c"), str(ROOT / "shim" / "libsnapfmt.a")],
                       check=True)
        print(f"{'image':<22}{'bytes':>10}{'C file us':>11}{'C buf us':>10}"
              f"{'Py load+verify us':>19}{'ratio':>8}{'Py +validate us':>17}")
        for nv, ram in ((1, 0), (64, 0), (1, 1 << 20), (64, 1 << 20)):
            path = pathlib.Path(d) / f"v{nv}-{ram}.snap"
            snap = synth.x86_snapshot(nvcpus=nv, ram_bytes=ram)
            snap.save(path)
            size = path.stat().st_size
            iters = 20000 if nv == 1 and not ram else 2000
            out = subprocess.run([exe, path, str(iters)], check=True, capture_output=True,
                                 text=True).stdout.split()
            c_file, c_buf = float(out[0]), float(out[1])

            def py_verify():
                s = snapfmt.load(path)
                assert not s.deep_verify()
                s.close()

            def py_validate():
                s = snapfmt.load(path)
                snapfmt.validate(s)
                s.close()

            py = py_time(py_verify)
            pv = py_time(py_validate, 0.5)
            label = f"{nv} vCPU" + (f" + {ram >> 20} MiB RAM" if ram else " state")
            print(f"{label:<22}{size:>10}{c_file:>11.1f}{c_buf:>10.1f}"
                  f"{py:>19.1f}{py / c_file:>7.1f}x{pv:>17.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
