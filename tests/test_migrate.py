"""`snapfmt migrate`: registry, chaining, refusal of lossy downgrades, ancillary
preservation, goldens migrate to the current version.

The format is at 1.0.  Versions 1.1 and 2.0 below are TEST FIXTURES registered
inside ``migrate.isolated_registry()``; they are not part of the format:

* 1.1 adds an ancillary section (private type 0xF0000101, "host notes");
* 2.0 changes ``x86.tsc_khz`` to section version 2: ``u64 tsc_hz`` (Hz, not kHz).
  2.0 -> 1.1 is a downgrade that loses data when a frequency is not a whole kHz.
"""

import struct

import pytest

import snapfmt
from snapfmt import layout as L
from snapfmt import migrate as M
from snapfmt import synth
from snapfmt.container import Section
from snapfmt.crc import crc32c

from conftest import GOLDEN, run_cli

NOTES = 0xF0000101
TSC = 0x010A
OPAQUE = 0xF0000777       # an ancillary section nobody knows


def _notes_add(snap, log):
    out = M.clone(snap)
    out.add(NOTES, 0, data=b"host notes v1\0\0\0", flags=0)
    log.append("added host notes (ancillary)")
    return out


def _notes_keep(snap, log):
    return M.clone(snap)


def _tsc_v1_to_v2(snap, log):
    out = M.clone(snap)
    for s in list(out.all(TSC)):
        khz = struct.unpack_from("<I", s.data)[0]
        data = struct.pack("<Q", khz * 1000)
        new = Section(out, s.index, TSC, s.instance, 2, s.flags, crc32c(data), None, 8, data)
        out.sections[s.index] = new
        log.append(f"x86.tsc_khz[{s.instance}]: {khz} kHz -> {khz * 1000} Hz (v2)")
    out.__dict__.pop("_idx", None)
    return out


def _tsc_v2_to_v1(snap, log):
    out = M.clone(snap)
    for s in list(out.all(TSC)):
        hz = struct.unpack_from("<Q", s.data)[0]
        out.replace(TSC, s.instance, data=struct.pack("<II", hz // 1000, 0))
        out.sections[s.index].version = 1
        log.append(f"x86.tsc_khz[{s.instance}]: {hz} Hz -> {hz // 1000} kHz (v1)")
    return out


def _tsc_v2_loss(snap):
    return [f"x86.tsc_khz[{s.instance}] = {struct.unpack_from('<Q', s.data)[0]} Hz is not a "
            f"whole number of kHz" for s in snap.all(TSC)
            if struct.unpack_from("<Q", s.data)[0] % 1000]


@pytest.fixture
def fixture_versions():
    with M.isolated_registry():
        M.register_step("1.0", "1.1", "add host notes")(_notes_add)
        M.register_step("1.1", "1.0", "host notes are ancillary: kept")(_notes_keep)
        M.register_step("1.1", "2.0", "x86.tsc_khz v2 (Hz)", compat="2.0")(_tsc_v1_to_v2)
        M.register_step("2.0", "1.1", "x86.tsc_khz back to v1 (kHz)", loss=_tsc_v2_loss,
                        compat="1.0")(_tsc_v2_to_v1)
        yield


def _with_opaque(snap):
    snap.add(OPAQUE, 3, data=b"\x01\x02\x03\x04\x05\x06\x07\x08", flags=0, version=7)
    return snap


# --------------------------------------------------------------- steps alone

def test_step_1_0_to_1_1_alone():
    log = []
    out = _notes_add(synth.x86_snapshot(1, 4096), log)
    assert out.find(NOTES, 0) is not None and log == ["added host notes (ancillary)"]


def test_step_tsc_v1_v2_roundtrip_alone():
    s = synth.x86_snapshot(2, 4096)
    v2 = _tsc_v1_to_v2(s, [])
    assert [struct.unpack_from("<Q", x.data)[0] for x in v2.all(TSC)] == [2_000_000_000] * 2
    assert all(x.version == 2 for x in v2.all(TSC))
    back = _tsc_v2_to_v1(v2, [])
    assert [bytes(x.data) for x in back.all(TSC)] == [bytes(x.data) for x in s.all(TSC)]
    assert _tsc_v2_loss(v2) == []


# --------------------------------------------------------------- machinery

def test_plan_chains_and_refuses_unknown(fixture_versions):
    assert [(s.src, s.dst) for s in M.plan("1.0", "2.0")] == [((1, 0), (1, 1)),
                                                              ((1, 1), (2, 0))]
    assert [(s.src, s.dst) for s in M.plan("2.0", "1.0")] == [((2, 0), (1, 1)),
                                                              ((1, 1), (1, 0))]
    assert M.plan("1.0", "1.0") == []
    with pytest.raises(M.MigrationError, match="no migration path from 1.0 to 3.0"):
        M.plan("1.0", "3.0")
    with pytest.raises(ValueError, match="registered twice"):
        M.register_step("1.0", "1.1", "again")(_notes_add)


def test_registry_is_restored_after_isolation():
    with M.isolated_registry():
        M.register_step("1.0", "9.9", "temp")(_notes_keep)
        assert M.plan("1.0", "9.9")
    with pytest.raises(M.MigrationError):
        M.plan("1.0", "9.9")


def test_up_and_down_through_files(fixture_versions, tmp_path):
    src = _with_opaque(synth.x86_snapshot(2, 1 << 16))
    src.save(tmp_path / "v10.snap")
    res = M.migrate(snapfmt.load(tmp_path / "v10.snap", strict=False), "2.0")
    assert [n for n, _ in res.log] == ["1.0 -> 1.1", "1.1 -> 2.0"]
    assert res.snapshot.version == (2, 0) and res.snapshot.compat_version == (2, 0)
    res.snapshot.save(tmp_path / "v20.snap")
    # this reader refuses 2.0; load_any reads it for the steps
    with pytest.raises(snapfmt.VersionError):
        snapfmt.load(tmp_path / "v20.snap")
    v20 = M.load_any(tmp_path / "v20.snap")
    assert v20.version == (2, 0) and all(s.version == 2 for s in v20.all(TSC))
    down = M.migrate(v20, "1.0")
    down.snapshot.save(tmp_path / "back.snap")
    back = snapfmt.load(tmp_path / "back.snap")
    assert back.version == (1, 0)
    assert not snapfmt.has_errors(snapfmt.validate(back))
    # the unknown ancillary section made the whole trip byte for byte
    o = back.find(OPAQUE, 3)
    assert o is not None and bytes(o.data) == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert o.version == 7 and o.flags == 0
    # state identical to the original, plus the (ancillary) host notes of 1.1
    orig = snapfmt.load(tmp_path / "v10.snap")
    for s in orig.sections:
        t = back.find(s.type_id, s.instance)
        assert bytes(t.data) == bytes(s.data), s.label
    assert back.find(NOTES, 0) is not None


def test_lossy_downgrade_is_refused(fixture_versions, tmp_path):
    s = synth.x86_snapshot(1, 4096)
    v20 = M.migrate(s, "2.0").snapshot
    t = v20.find(TSC, 0)
    data = struct.pack("<Q", 2_000_000_500)
    v20.sections[t.index] = Section(v20, t.index, TSC, 0, 2, t.flags, crc32c(data), None, 8,
                                    data)
    with pytest.raises(M.MigrationError, match="would drop critical data.*2000000500 Hz"):
        M.migrate(v20, "1.0")
    v20.save(tmp_path / "v20.snap")
    p = run_cli("migrate", tmp_path / "v20.snap", "--to", "1.0", "-o", tmp_path / "o.snap")
    # the CLI process has no fixture steps: it cannot plan at all -> exit 2, one line
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no migration path" in p.stderr
    assert not (tmp_path / "o.snap").exists()


def test_step_that_drops_unknown_ancillary_is_caught():
    def bad(snap, log):
        out = M.clone(snap)
        out.remove(out.find(OPAQUE, 3))
        return out
    with M.isolated_registry():
        M.register_step("1.0", "1.1", "buggy")(bad)
        with pytest.raises(M.MigrationError, match="did not preserve the unknown ancillary"):
            M.migrate(_with_opaque(synth.x86_snapshot(1, 4096)), "1.1")


def test_damaged_input_is_refused(tmp_path):
    synth.x86_snapshot(1, 1 << 16).save(tmp_path / "a.snap")
    raw = bytearray((tmp_path / "a.snap").read_bytes())
    s = snapfmt.load(tmp_path / "a.snap")
    ram = s.find("ram")
    raw[ram.offset] ^= 0xFF
    (tmp_path / "b.snap").write_bytes(bytes(raw))
    with pytest.raises(M.MigrationError) as e:
        M.migrate(snapfmt.load(tmp_path / "b.snap", strict=False))
    assert e.value.code == "bad-crc"


# --------------------------------------------------------------- real path, CLI, goldens

GOLDENS = sorted(GOLDEN.glob("*.snap"))


@pytest.mark.parametrize("path", GOLDENS, ids=[p.name for p in GOLDENS])
def test_goldens_migrate_to_current_and_validate(path, tmp_path):
    src = snapfmt.load(path)
    assert src.version <= L.VERSION
    res = M.migrate(src)
    res.snapshot.save(tmp_path / "m.snap")
    out = snapfmt.load(tmp_path / "m.snap")
    assert out.version == L.VERSION
    assert not snapfmt.has_errors(snapfmt.validate(out))
    if src.version == L.VERSION:          # identity path: a canonical re-write
        assert (tmp_path / "m.snap").read_bytes() == path.read_bytes()


def test_cli_dry_run_and_identity(tmp_path):
    p = run_cli("migrate", GOLDEN / "x86-unknown-ancillary.snap", "--dry-run")
    assert p.returncode == 0 and "dry run: nothing written" in p.stdout
    assert "no steps" in p.stdout
    p = run_cli("migrate", GOLDEN / "x86-unknown-ancillary.snap", "-o", tmp_path / "o.snap")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o.snap").read_bytes() == \
        (GOLDEN / "x86-unknown-ancillary.snap").read_bytes()
    p = run_cli("migrate", GOLDEN / "x86-4vcpu.snap", "--to", "7.0", "-o", tmp_path / "x")
    assert p.returncode == 2 and "no migration path" in p.stderr
    p = run_cli("migrate", GOLDEN / "x86-4vcpu.snap", "--to", "banana", "-o", tmp_path / "x")
    assert p.returncode == 2 and "MAJOR.MINOR" in p.stderr
