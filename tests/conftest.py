import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"


def kvm_available() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def require_kvm():
    """Skip with a reason when /dev/kvm is absent -- unless CI requires it."""
    if kvm_available():
        return
    if os.environ.get("SNAPFMT_REQUIRE_KVM") == "1":
        pytest.fail("SNAPFMT_REQUIRE_KVM=1 but /dev/kvm is not usable")
    pytest.skip("needs /dev/kvm (not present or not accessible on this machine)")


@pytest.fixture
def kvm():
    require_kvm()


def run_cli(*args, input=None, check=None):
    """Run `python -m snapfmt ARGS` in a subprocess; return CompletedProcess."""
    p = subprocess.run([sys.executable, "-m", "snapfmt", *map(str, args)], input=input,
                       capture_output=True, text=True, cwd=ROOT)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p
