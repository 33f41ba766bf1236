"""The `snapfmt` command line (see README "CLI reference").

Exit codes: 0 success/valid/same, 1 findings of severity error / different,
2 unreadable input or usage error -- one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import jsonio
from .atomic import write_atomic
from . import layout as L
from .container import load
from .errors import EncodeError, SnapfmtError, SnapfmtOSError
from .schema import render_text, schema
from .validate import has_errors, validate

PROG = "snapfmt"
# Modules that add subcommands with register_cli(subparsers).
_PLUGINS = ("fscheck", "diff", "migrate", "compat", "layers")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _out(text: str, path: str | None = None) -> None:
    if path and path != "-":
        write_atomic(path, text)
    else:
        sys.stdout.write(text)


def cmd_info(args) -> int:
    snap = load(args.file, strict=False)
    bad = {e.section: e for e in snap.deep_verify()} if args.deep else \
        {e.section: e for e in snap._crc_failures}
    secs = []
    for s in snap.sections:
        if s.label in bad:
            status = bad[s.label].code
        elif s.bulk and not args.deep:
            status = "unchecked"
        else:
            status = "ok"
        secs.append({"index": s.index, "type": s.name, "type_id": s.type_id,
                     "instance": s.instance, "version": s.version, "flags": s.flags,
                     "flag_names": jsonio.section_flag_names(s.flags), "offset": s.offset,
                     "length": s.length, "crc32c": s.crc32c, "crc": status})
    info = {"file": args.file, "file_size": snap.file_size,
            "version": f"{snap.version[0]}.{snap.version[1]}",
            "compat_version": f"{snap.compat_version[0]}.{snap.compat_version[1]}",
            "arch": snap.arch, "page_size": snap.page_size, "flags": snap.flags,
            "flag_names": jsonio.header_flag_names(snap.flags), "header_len": snap.header_len,
            "section_count": len(snap.sections), "vcpus": len(snap.vcpu_indices),
            "sections": secs}
    if args.json:
        _out(json.dumps(info, indent=1) + "\n")
        return 0
    lines = [f"{args.file}: snapfmt {info['version']} (compat {info['compat_version']}), "
             f"{snap.arch}, page {snap.page_size}, flags 0x{snap.flags:x} "
             f"{' '.join(info['flag_names'])}".rstrip(),
             f"  {info['file_size']} bytes, {len(secs)} sections, {info['vcpus']} vCPU(s)", "",
             f"  {'#':>3}  {'type':<22} {'inst':>4} {'ver':>3}  {'flags':<13} {'offset':>10} "
             f"{'length':>10}  {'crc32c':<10} status"]
    for s in secs:
        lines.append(f"  {s['index']:>3}  {s['type']:<22} {s['instance']:>4} {s['version']:>3}  "
                     f"{'|'.join(s['flag_names']):<13} {s['offset']:>10} {s['length']:>10}  "
                     f"0x{s['crc32c']:08x} {s['crc']}")
    _out("\n".join(lines) + "\n")
    return 0


def cmd_validate(args) -> int:
    snap = load(args.file, strict=False)
    findings = validate(snap, deep=not args.fast)
    errors = has_errors(findings)
    if args.json:
        _out(json.dumps({"file": args.file, "valid": not errors,
                         "findings": [f.as_dict() for f in findings]}, indent=1) + "\n")
    else:
        for f in findings:
            if f.severity != "info" or args.verbose:
                print(f"{args.file}: {f}")
        n_err = sum(f.severity == "error" for f in findings)
        n_warn = sum(f.severity == "warning" for f in findings)
        print(f"{args.file}: {'INVALID' if errors else 'valid'} "
              f"({n_err} error(s), {n_warn} warning(s), {len(snap.sections)} sections)")
    return 1 if errors else 0


def cmd_dump(args) -> int:
    snap = load(args.file)
    _out(jsonio.dumps(snap, annotate=not args.no_decoded), args.output)
    return 0


def cmd_build(args) -> int:
    try:
        if args.json == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(args.json, "rb") as f:
                raw = f.read()
    except OSError as e:
        raise SnapfmtOSError(f"cannot read {args.json}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EncodeError(f"not UTF-8 JSON (byte 0x{raw[e.start]:02x})", section="json",
                          offset=e.start, hint="give the output of `snapfmt dump`") from None
    snap = jsonio.loads_json(text)
    snap.save(args.output)
    return 0


def cmd_schema(args) -> int:
    sch = schema()
    _out(json.dumps(sch, indent=1) + "\n" if args.json else render_text(sch) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Inspect, check and convert snapfmt VM snapshots.")
    p.add_argument("--version", action="version",
                   version=f"snapfmt {__import__('snapfmt').__version__} (format "
                           f"{L.VERSION[0]}.{L.VERSION[1]})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("info", help="header, architecture, version, section table with CRC status")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.add_argument("--deep", action="store_true", help="also check the CRC of guest RAM")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("validate", help="structural and semantic checks (exit 0/1/2)")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.add_argument("--fast", action="store_true", help="skip the CRC of guest RAM")
    s.add_argument("-v", "--verbose", action="store_true", help="also print info findings")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("dump", help="the whole image as JSON with named, decoded fields")
    s.add_argument("file")
    s.add_argument("-o", "--output", help="write to this file (atomic) instead of stdout")
    s.add_argument("--no-decoded", action="store_true",
                   help="omit the human-oriented \"decoded\" annotations")
    s.set_defaults(func=cmd_dump)

    s = sub.add_parser("build", help="JSON (from dump) back to an image")
    s.add_argument("json", help="dump JSON file, or - for stdin")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("schema", help="every section's declared layout")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_schema)

    for mod in _PLUGINS:
        try:
            m = __import__(f"{__package__}.{mod}", fromlist=["register_cli"])
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise
            continue
        if hasattr(m, "register_cli"):
            m.register_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SnapfmtError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
