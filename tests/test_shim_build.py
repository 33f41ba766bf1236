"""The C shim builds warning-free with gcc and clang and its ASan+UBSan unit tests pass."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIM = ROOT / "shim"


def _make(*args, **kw):
    return subprocess.run(["make", "-C", str(SHIM), *args], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_builds_with_werror(cc, tmp_path):
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed")
    # build into a private copy so the session's build is untouched
    dst = tmp_path / "shim"
    shutil.copytree(SHIM, dst, ignore=shutil.ignore_patterns("build", "*.o", "*.a", "*.so",
                                                             "snapdump"))
    p = subprocess.run(["make", "-C", str(dst), f"CC={cc}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "warning" not in p.stderr
    for out in ("libsnapfmt.a", "libsnapfmt.so", "snapdump", "build/rewrite"):
        assert (dst / out).exists()


def test_unit_tests_under_sanitizers():
    p = _make("check")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test_crc32c:" in p.stdout and "test_rw:" in p.stdout
    assert " 0 failed" in p.stdout and "runtime error" not in p.stderr


def test_fuzz_smoke():
    if shutil.which("clang") is None:
        pytest.skip("clang not installed")
    p = _make("fuzz", "FUZZ_SECONDS=5")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
