#!/usr/bin/env bash
# make demo: the end-to-end story.
set -euo pipefail
cd "$(dirname "$0")/.."
SNAPFMT=.venv/bin/snapfmt
PY=.venv/bin/python
OUT=${DEMO_OUT:-build/demo}
mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1. build a sample 4-vCPU x86_64 template snapshot (synthetic state, 16 MiB RAM)"
$PY - "$OUT/sample.snap" <<'PYEOF'
import sys
from snapfmt import synth
synth.x86_snapshot(4, 16 << 20).save(sys.argv[1])
print("wrote", sys.argv[1])
PYEOF

say "2. snapfmt info"
$SNAPFMT info "$OUT/sample.snap" > "$OUT/sample.info"; head -20 "$OUT/sample.info"

say "3. snapfmt validate"
$SNAPFMT validate "$OUT/sample.snap"

say "4. snapfmt dump (first lines) and build back: byte-identical?"
$SNAPFMT dump "$OUT/sample.snap" -o "$OUT/sample.json"
head -c 600 "$OUT/sample.json" || true; echo " ..."
$SNAPFMT build "$OUT/sample.json" -o "$OUT/rebuilt.snap"
cmp "$OUT/sample.snap" "$OUT/rebuilt.snap" && echo "dump -> build: byte-identical"

if [ -x shim/snapdump ]; then
  say "5. the C reader's view (shim/snapdump)"
  shim/snapdump "$OUT/sample.snap" > "$OUT/sample.c-view.json"
  head -c 400 "$OUT/sample.c-view.json"; echo " ..."
fi

if [ -x tools/demo_kvm.sh ] && [ -e /dev/kvm ]; then
  bash tools/demo_kvm.sh "$OUT"
fi
