#!/usr/bin/env python3
"""QEMU performance peer for snapvm.

Boots the snapfmt test guest (tools/build/guest/guest.bin, multiboot entry)
under qemu-system-x86_64, waits for READY on the serial port, saves the VM
with the QMP ``migrate`` command to a file (``exec:cat > FILE``; QEMU 7.2 has
no ``file:`` URI), then starts a fresh QEMU with ``-incoming "exec:cat FILE"``
and measures the time until the restored guest answers ``PING`` with
``PONG`` (and checks the checksum equals the one from the original VM).

  tools/qemu_peer.py [--accel auto|kvm|tcg] [--mem MiB] [--runs N]
                     [--image PATH] [--json]

Exit status 0 when every restore answered with the right PONG.
Only the Python standard library is used.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IMAGE = os.path.join(ROOT, "tools", "build", "guest", "guest.bin")


class Peer:
    """One QEMU process with a QMP socket and a serial socket."""

    def __init__(self, qemu, accel, mem, image, workdir, name, incoming=None):
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.ser_path = os.path.join(workdir, f"{name}.serial")
        self.log_path = os.path.join(workdir, f"{name}.log")
        accel_args = (["-enable-kvm", "-cpu", "host"] if accel == "kvm"
                      else ["-accel", "tcg", "-cpu", "max"])
        cmd = [qemu, *accel_args, "-m", str(mem), "-nodefaults",
               "-display", "none", "-no-reboot",
               "-chardev", f"socket,id=ser0,path={self.ser_path},server=on,wait=off",
               "-serial", "chardev:ser0",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
               "-kernel", image]
        if incoming:
            cmd += ["-incoming", incoming]
        self.cmd = cmd
        self.t_spawn = time.monotonic()
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = self._connect(self.qmp_path)
        self.qmp_file = self.qmp.makefile("rwb", buffering=0)
        self._qmp_read()  # greeting
        self.command("qmp_capabilities")
        self.t_qmp = time.monotonic()
        self.ser = self._connect(self.ser_path)
        self.ser.setblocking(False)
        self.buf = b""

    def _connect(self, path, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited early: {self.tail_log()}")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot connect to {path}")
                time.sleep(0.002)

    def tail_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def _qmp_read(self, timeout=60.0):
        self.qmp.settimeout(timeout)
        line = self.qmp_file.readline()
        if not line:
            raise RuntimeError(f"QMP closed: {self.tail_log()}")
        return json.loads(line)

    def command(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.qmp_file.write(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._qmp_read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            # asynchronous events are ignored

    def wait_status(self, want, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.command("query-status")["status"]
            if st in want:
                return st
            time.sleep(0.002)
        raise RuntimeError(f"status never became {want}")

    def send(self, text):
        self.ser.sendall(text.encode())

    def read_line(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no serial line; have {self.buf!r}")
            import select
            r, _, _ = select.select([self.ser], [], [], min(left, 0.1))
            if r:
                chunk = self.ser.recv(4096)
                if not chunk:
                    raise RuntimeError("serial closed")
                self.buf += chunk
            if self.proc.poll() is not None and b"\n" not in self.buf:
                raise RuntimeError(f"qemu died: {self.tail_log()}")
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace").strip("\r")

    def expect(self, prefix, timeout=30.0):
        while True:
            line = self.read_line(timeout)
            if line.startswith(prefix):
                return line

    def close(self):
        try:
            if self.proc.poll() is None:
                try:
                    self.command("quit")
                except (OSError, ValueError, RuntimeError, TimeoutError):
                    pass      # QEMU already gone: the wait below reaps it
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for s in (getattr(self, "ser", None), getattr(self, "qmp", None)):
                if s:
                    s.close()
            self.log.close()


def kvm_works(qemu):
    """Cheap probe: can QEMU create a KVM VM here?"""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm not accessible"
    try:
        p = subprocess.run([qemu, "-enable-kvm", "-cpu", "host", "-machine", "pc",
                            "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
                           input=b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                           capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False, "probe timed out"
    if p.returncode != 0:
        return False, p.stderr.decode(errors="replace").strip()[-300:]
    return True, ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    ap.add_argument("--mem", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--runs", type=int, default=3, help="restores to time")
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    ap.add_argument("--json", action="store_true", help="print a JSON summary line")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    a = ap.parse_args(argv)

    if not os.path.exists(a.image):
        print(f"qemu_peer: no guest image {a.image} (make -C tools/guest)", file=sys.stderr)
        return 2
    accel = a.accel
    kvm_ok, why = kvm_works(a.qemu)
    if accel == "auto":
        accel = "kvm" if kvm_ok else "tcg"
    elif accel == "kvm" and not kvm_ok:
        print(f"qemu_peer: -enable-kvm does not work: {why}", file=sys.stderr)
        return 2
    print(f"qemu_peer: {a.qemu} accel={accel} (kvm usable: {kvm_ok}{'' if kvm_ok else ', ' + why}) mem={a.mem} MiB")

    work = tempfile.mkdtemp(prefix="qemu_peer.")
    snap = os.path.join(work, "vm.mig")
    res = {"accel": accel, "kvm_usable": kvm_ok, "mem_mib": a.mem, "runs": []}
    ok = True
    src = None
    try:
        # --- boot the template and save it
        src = Peer(a.qemu, accel, a.mem, a.image, work, "src")
        t0 = time.monotonic()
        src.expect("READY", timeout=120)
        res["boot_to_ready_s"] = round(time.monotonic() - src.t_spawn, 3)
        src.send("PING\n")
        want = src.expect("PONG ")
        res["pong"] = want[5:]
        print(f"source: READY after {res['boot_to_ready_s']:.2f} s, {want}")
        t0 = time.monotonic()
        src.command("stop")
        src.command("migrate", uri=f"exec:cat > {snap}")
        deadline = time.monotonic() + 120
        while True:
            st = src.command("query-migrate").get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"migration {st}")
            time.sleep(0.002)
        res["save_s"] = round(time.monotonic() - t0, 4)
        res["file_bytes"] = os.path.getsize(snap)
        print(f"saved: {res['save_s'] * 1e3:.1f} ms, {res['file_bytes']} bytes")
        src.close()
        src = None

        # --- restore N times
        for i in range(a.runs):
            dst = Peer(a.qemu, accel, a.mem, a.image, work, f"dst{i}",
                       incoming=f"exec:cat {snap}")
            try:
                t_qmp = dst.t_qmp - dst.t_spawn
                dst.wait_status(("paused", "postmigrate", "prelaunch", "running"), timeout=120)
                # wait for the incoming migration to finish
                deadline = time.monotonic() + 120
                while dst.command("query-status")["status"] == "inmigrate":
                    if time.monotonic() > deadline:
                        raise RuntimeError("incoming migration did not finish")
                    time.sleep(0.001)
                t_loaded = time.monotonic() - dst.t_spawn
                dst.command("cont")
                t_cont = time.monotonic()
                dst.send("PING\n")
                got = dst.expect("PONG ")
                t_pong = time.monotonic()
                run = {"spawn_to_qmp_ms": round(t_qmp * 1e3, 2),
                       "spawn_to_loaded_ms": round(t_loaded * 1e3, 2),
                       "cont_to_pong_ms": round((t_pong - t_cont) * 1e3, 2),
                       "spawn_to_pong_ms": round((t_pong - dst.t_spawn) * 1e3, 2),
                       "pong_ok": got[5:] == res["pong"]}
                ok &= run["pong_ok"]
                res["runs"].append(run)
                print(f"restore {i}: spawn->QMP {run['spawn_to_qmp_ms']:.1f} ms, "
                      f"->loaded {run['spawn_to_loaded_ms']:.1f} ms, "
                      f"cont->PONG {run['cont_to_pong_ms']:.1f} ms, "
                      f"total {run['spawn_to_pong_ms']:.1f} ms, {got}"
                      f"{'' if run['pong_ok'] else ' (MISMATCH)'}")
            finally:
                dst.close()
        tot = [r["spawn_to_pong_ms"] for r in res["runs"]]
        res["median_spawn_to_pong_ms"] = statistics.median(tot)
        print(f"qemu restore (spawn -> PONG): median {res['median_spawn_to_pong_ms']:.1f} ms "
              f"over {len(tot)} run(s)")
    except (OSError, ValueError, RuntimeError, TimeoutError,
            subprocess.SubprocessError) as e:  # report, never hang
        ok = False
        res["error"] = str(e)
        print(f"qemu_peer: error: {e}", file=sys.stderr)
    finally:
        if src:
            src.close()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}")
    res["ok"] = ok
    if a.json:
        print(json.dumps(res))
    print(f"qemu_peer: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
