#!/usr/bin/env python3
"""Capture a virtiofs.inode_map from a real directory tree.

    tools/capture_inode_map.py ROOT -o OUT.snap            snapshot holding the map
    tools/capture_inode_map.py ROOT -o OUT.bin --raw       raw section bytes only
    tools/capture_inode_map.py ROOT -o OUT --snapshot IN   add it to a copy of IN

Builds the map a passthrough virtio-fs server would hold after the guest looked
up every entry (see snapfmt.inode_map.capture for nodeid order, hard links and
mount ids), then validates it.  Prints a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import snapfmt  # noqa: E402
from snapfmt import inode_map, typeids  # noqa: E402
from snapfmt.errors import SnapfmtError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="the directory to walk (the virtio-fs shared directory)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--raw", action="store_true", help="write the raw section bytes")
    ap.add_argument("--snapshot", help="add the map to (a copy of) this snapshot")
    ap.add_argument("--device", type=int, default=0, help="device index (section instance)")
    ap.add_argument("--max-entries", type=int, default=None)
    ap.add_argument("--arch", default="x86_64", help="arch of a new snapshot")
    ap.add_argument("--template", action="store_true", help="set the TEMPLATE header flag "
                    "on a new snapshot")
    args = ap.parse_args(argv)
    try:
        data = inode_map.capture(args.root, args.max_entries)
    except OSError as e:
        print(f"capture_inode_map: {args.root}: {e.strerror or e}", file=sys.stderr)
        return 2
    a = inode_map.parse_arrays(data)
    findings = inode_map.validate_map(a)
    for f in findings:
        print(f, file=sys.stderr)
    try:
        if args.raw:
            tmp = args.output + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, args.output)
        else:
            if args.snapshot:
                snap = snapfmt.load(args.snapshot)
                out = snapfmt.loads(snap.to_bytes())
                snap.close()
                old = out.find(typeids.VIRTIOFS_INODE_MAP, args.device)
                if old is not None:
                    out.replace(typeids.VIRTIOFS_INODE_MAP, args.device, data=data)
                else:
                    out.add(typeids.VIRTIOFS_INODE_MAP, args.device, data=data)
            else:
                flags = snapfmt.layout.HDR_F_TEMPLATE if args.template else 0
                out = snapfmt.new(args.arch, flags=flags)
                out.add(typeids.VIRTIOFS_INODE_MAP, args.device, data=data)
            out.save(args.output)
    except SnapfmtError as e:
        print(f"capture_inode_map: {e}", file=sys.stderr)
        return 2
    h = a.header
    print(f"{args.output}: {h['entry_count']} entries, {h['mount_count']} mount(s), "
          f"{h['strtab_len']} bytes of names, flags 0x{h['flags']:x}, "
          f"{len(data)} bytes" + (f", {len(findings)} finding(s)" if findings else ""))
    return 1 if any(f.severity == "error" for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
