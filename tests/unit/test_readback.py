"""The one reader (fastafd.run.readback) and every command that reads back a run or sweep folder, fuzzed: random bytes,
truncations, wrong JSON types, NaN/Infinity and huge numbers end in one line (or a named, skipped line), never in a
traceback, and never write anything."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastafd import cli
from fastafd.checkpoint import paths, retain, store
from fastafd.errors import UserError
from fastafd.experiments import plan
from fastafd.run import readback, rundir
from tests.battery.harness import tree_digest
from tests.unit.test_report import AFD, IND, make_sweep

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=12)
SPECIAL = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 5000, b"[" * 3000, b"\xff\xfe", b'"\xc3"', b"{", b"", b"null", b"[]", b"\"x\""]


def _mutations():
    """Bytes that a disk, a killed writer or a person could leave in a file fastafd wrote."""
    return st.one_of(st.binary(max_size=200), st.sampled_from(SPECIAL),
                     json_values.map(lambda v: json.dumps(v).encode()))


def _damage(original: bytes):
    return st.one_of(
        _mutations(),
        st.integers(min_value=0, max_value=max(0, len(original) - 1)).map(lambda n: original[:n]),  # a truncation
        st.tuples(st.integers(min_value=0, max_value=max(0, len(original) - 1)), st.binary(min_size=1, max_size=8)).map(
            lambda t: original[: t[0]] + t[1] + original[t[0] + len(t[1]):]),  # bytes overwritten
        st.sampled_from(SPECIAL).map(lambda s: original.replace(b"50", s, 1).replace(b"1,", s + b",", 1)),
    )


# -- the reader itself ----------------------------------------------------------------------------------------------


@FUZZ
@given(data=_mutations())
def test_read_json_is_an_object_or_one_damaged_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("j") / "x.json"
    path.write_bytes(data)
    try:
        value = readback.read_json(path)
    except readback.Damaged as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert isinstance(value, dict)


@FUZZ
@given(lines=st.lists(_mutations(), max_size=6))
def test_metrics_rows_are_checked_and_damaged_lines_named(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("m") / rundir.METRICS_FILE
    path.write_bytes(b"\n".join(lines))
    got = readback.metrics(path)
    for row in got.rows:
        assert isinstance(row["epoch"], int) and 1 <= row["epoch"] <= readback.MAX_EPOCH
        if "ensemble_top1" in row:
            assert math.isfinite(row["ensemble_top1"]) and 0 <= row["ensemble_top1"] <= 100
    for line in got.damaged:
        assert line.startswith(f"{path}:") and "\n" not in line


def test_strict_json_refuses_what_python_accepts():
    for text in ("NaN", "[Infinity]", '{"a": -Infinity}', "1e999", "9" * 5000, "[" * 3000):
        with pytest.raises(ValueError):
            readback.loads(text)


def test_a_non_utf8_byte_is_named_by_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'{\n"a":\n"\xff"}')
    with pytest.raises(readback.Damaged, match=rf"{path}:3: byte 0xff is not UTF-8"):
        readback.read_json(path)


# -- the commands that read back (report, sweep status, eval's best.json, a checkpoint's manifest) ---------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "sweep"
    make_sweep(root, {(IND, 0): [(40, 45, 46), (50, 55, 56)], (AFD, 0): [(48, 50, 52), (55, 58, 60)]}, [IND, AFD], (0,))
    return root


FILES = {
    "sweep.json": lambda s: s / plan.MANIFEST,
    "metrics.jsonl": lambda s: s / "runs" / f"{AFD}-seed0" / rundir.METRICS_FILE,
    "status": lambda s: s / plan.STATUS / f"{AFD}-seed0.json",
}


def _no_traceback(code, err, exc):
    assert exc is None, f"{type(exc).__name__}: {exc}"
    assert "Traceback" not in err
    if code != 0:
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err


@FUZZ
@pytest.mark.parametrize("which", list(FILES))
@given(data=st.data())
def test_report_and_status_on_a_damaged_file_never_trace_back_nor_write(which, world, tmp_path_factory, capsys, data):
    sweep = tmp_path_factory.mktemp("s") / "sweep"
    shutil.copytree(world, sweep)
    path = FILES[which](sweep)
    original = path.read_bytes() if path.exists() else b'{"exit": 1}'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.draw(_damage(original)))
    before = tree_digest([sweep])
    for args in (["sweep", "status", str(sweep)], ["report", str(sweep), "--out", str(sweep.parent / "r.md"), "--png", "off"]):
        capsys.readouterr()
        exc = None
        try:
            code = cli.main(args)
        except BaseException as e:  # noqa: BLE001 - the assertion names it
            exc, code = e, None
        _, err = capsys.readouterr()
        _no_traceback(code, err, exc)
    assert tree_digest([sweep]) == before  # nothing written into the folder read


@FUZZ
@pytest.mark.parametrize("which", ["best.json", "manifest.json"])
@given(data=_mutations())
def test_best_json_and_a_checkpoint_manifest_are_one_line_or_valid(which, tmp_path_factory, data):
    run = tmp_path_factory.mktemp("r")
    (run / paths.CKPT_DIR / "step-1").mkdir(parents=True)
    if which == "best.json":
        (run / paths.CKPT_DIR / paths.BEST).write_bytes(data)
        try:
            best = retain.read_best(run)
        except UserError as e:
            assert "\n" not in str(e)
        else:
            assert best is None or (isinstance(best["name"], str) and math.isfinite(best["metric"]))
    else:
        (run / paths.CKPT_DIR / "step-1" / paths.MANIFEST).write_bytes(data)
        with pytest.raises(store.CorruptCheckpoint) as e:
            store.verify(run / paths.CKPT_DIR / "step-1")
        assert "\n" not in str(e.value)


def test_config_json_of_a_run_folder_damaged_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for data in (b"\xff", b"[]", b'{"model": 3}', b"NaN", b'{"loop": {"epochs": 1e999}}'):
        (run / rundir.CONFIG_FILE).write_bytes(data)
        for args in (["report", str(run), "--out", str(tmp_path / "r")], ["export", str(run), "--out", str(tmp_path / "p.safetensors")],
                     ["plot", str(run), "--out", str(tmp_path / "p")]):
            code = cli.main(args)
            err = capsys.readouterr().err
            assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (data, args, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "p.safetensors").exists()


def test_fuzz_is_bounded():
    assert FUZZ.max_examples <= 100 and FUZZ.deadline is None
