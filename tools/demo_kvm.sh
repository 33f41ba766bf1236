#!/usr/bin/env bash
# KVM part of `make demo` (called by tools/demo.sh when /dev/kvm exists):
# build, boot the test guest, snapshot it through the shim, validate, fork 10
# children from the file, show each answering, print restore latency vs QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/demo}
mkdir -p "$OUT"
SNAPFMT=.venv/bin/snapfmt
PY=.venv/bin/python
SNAPVM=tools/build/harness/snapvm
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "K1. build shim (libsnapfmt + snapfmt_kvm.c), test guest, snapvm"
make -s -C shim >/dev/null && make -s -C tools/guest >/dev/null && make -s -C tools/harness >/dev/null
echo "built $SNAPVM"

say "K2. boot the guest on KVM, pause at READY, snapshot through the shim (256 MiB RAM)"
SNAP="$OUT/guest.snap"
[ -e "$SNAP" ] && chmod u+w "$SNAP" && rm -f "$SNAP"
timeout 60 "$SNAPVM" snapshot --timeout 50 tools/build/guest/guest.bin "$SNAP"
ls -ls "$SNAP"

say "K3. snapfmt validate + info"
$SNAPFMT validate "$SNAP"
$SNAPFMT info "$SNAP" | head -26

say "K4. fork 10 children from the snapshot file, each answering on its serial line"
timeout 120 "$SNAPVM" fork 10 --timeout 100 "$SNAP" | grep -E "^child|^witness|^children|median|^fork"

say "K5. restore latency: snapvm (20 restores) vs QEMU -incoming (same guest, same RAM, this run)"
LAT=$(timeout 120 "$SNAPVM" fork 1 --iters 20 --comp 1 --timeout 100 "$SNAP" | grep -E "open\(snapshot\) -> PONG|restore total")
echo "$LAT"
OURS=$(echo "$LAT" | sed -n 's/.*open(snapshot) -> PONG *median *\([0-9.]*\) ms.*/\1/p')
if command -v qemu-system-x86_64 >/dev/null; then
  Q=$(timeout 300 $PY tools/qemu_peer.py --runs 5 --json 2>/dev/null | grep '^{' | tail -1 || true)
  if [ -n "$Q" ]; then
    QMS=$(echo "$Q" | $PY -c 'import json,sys; print(json.load(sys.stdin)["median_spawn_to_pong_ms"])')
    $PY -c "print(f'restore open->PONG: snapvm {float(\"$OURS\"):.2f} ms, QEMU -incoming {float(\"$QMS\"):.1f} ms => {float(\"$QMS\")/float(\"$OURS\"):.1f}x faster')"
  else
    echo "QEMU peer failed; snapvm restore open->PONG median $OURS ms"
  fi
else
  echo "qemu-system-x86_64 not installed; snapvm restore open->PONG median $OURS ms"
fi
