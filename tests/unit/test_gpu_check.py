"""The GPU check's plumbing (benchmarks/gpu_check.py, GPU.md, the pytest plugin), without a GPU: the device
calls fit the device tool's limits, every result is on disk the moment it exists (a run killed at its
limit keeps what finished), and every unit of work checks the deadline before it starts."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).parents[2]
PIP_LINE = "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S .whl/*.whl && export PYTHONPATH=$S || exit;"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- the device calls of GPU.md --------------------------------------------------------------------------


def test_gpu_md_lists_the_calls_in_order_of_value_within_the_device_limits():
    gc = gpu_check()
    calls = gc.device_calls()
    assert [(c["call"], c["part"]) for c in calls] == [(1, "tests"), (2, "step"), (3, "data"), (4, "dali")]
    for i, c in enumerate(calls, 1):
        cmd = c["command"]
        assert cmd and "\n" not in cmd and len(cmd) <= gc.CALL_LIMITS["command_chars"], (c["part"], len(cmd or ""))
        assert PIP_LINE in cmd  # the wheels installed as the device README shows
        assert re.search(rf'bash benchmarks/gpu_check\.sh {c["part"]} "\$OUT"( --[\w-]+ [\d.]+)*$', cmd), cmd  # the rehearsal appends --cpu-smoke
        assert ".whl" in c["carry"] and f".dali{i}" in c["carry"] and len(c["carry"]) <= gc.CALL_LIMITS["carry_paths"]
        budget = float(re.search(r"--budget-s (\d+)", cmd).group(1))
        assert budget + 30 <= c["timeout_s"] <= gc.CALL_LIMITS["timeout_s"]  # the part ends itself before the call's limit
        if c["part"] != "dali":
            assert budget + 20 <= 8 * 60  # planned to end within 8 minutes, the wheels' install included
        for path in c["carry"]:  # carried paths must be git-ignored, else they travel anyway (and count twice)
            assert subprocess.run(["git", "check-ignore", "-q", "--no-index", f"{path}/x"], cwd=ROOT).returncode == 0, path
    for word in ("tests.jsonl", "step.md", "comm-eager-fp32.json", "report --out benchmarks/results/"):
        assert word in (ROOT / "benchmarks" / "GPU.md").read_text()


def test_gpu_check_sh_refuses_a_tyro_that_does_not_import_in_one_line(tmp_path):
    """The GPU machine's python without the wheels (here: a tyro that fails to import) and no .whl carried:
    exit 2 and the fix, before any work."""
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "tyro.py").write_text("raise ImportError('no tyro on this machine')\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu_check.sh").write_text((ROOT / "benchmarks" / "gpu_check.sh").read_text())  # a copy without .whl/
    proc = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_check.sh"), "tests", str(tmp_path / "out")], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "shadow")}, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "tyro does not import: ImportError: no tyro on this machine" in proc.stderr
    assert "gpu_bundle.sh" in proc.stderr and "GPU.md" in proc.stderr and not (tmp_path / "out").exists()


# -- what comes back from $OUT ---------------------------------------------------------------------------------


def test_check_out_names_what_would_not_come_back(tmp_path):
    gc = gpu_check()
    for i in range(8):
        (tmp_path / f"f{i}.json").write_text("{}")
    assert gc.check_out(tmp_path) == []
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.json").write_text("{}")
    (tmp_path / "step-r18+r50.json").write_text("{}")
    problems = "\n".join(gc.check_out(tmp_path))
    assert "deeper than two folders" in problems and "step-r18+r50.json: name" in problems and "10 files, over 8" in problems


# -- results on disk as they happen, deadlines before work -----------------------------------------------------


PLUGIN_TESTS = '''
import time, pytest
def test_a_pass(): pass
def test_b_fail(): assert 1 == 2, "one is not two"
@pytest.mark.skip(reason="not here")
def test_c_skip(): pass
def test_d_slow(): time.sleep(60)
def test_e_never(): pass
'''


def _pytest_with_plugin(tmp_path: Path, *args: str) -> subprocess.Popen:
    (tmp_path / "test_demo.py").write_text(PLUGIN_TESTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks" / "plugins"), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "fastafd_jsonl", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path),
                             "-c", os.devnull, str(tmp_path / "test_demo.py"), f"--jsonl={tmp_path / 'r.jsonl'}", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_plugin_writes_each_test_as_it_ends_so_a_killed_run_keeps_them(tmp_path):
    proc = _pytest_with_plugin(tmp_path)
    jsonl = tmp_path / "r.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not jsonl.is_file() or jsonl.read_text().count('"event": "test"') < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # as the device tool does at a command's limit
    proc.wait()
    gc = gpu_check()
    s = gc.summarize_tests(jsonl)
    assert [(c["test"].split("::")[1], c["outcome"]) for c in s["cases"]] == [("test_a_pass", "passed"), ("test_b_fail", "failed"),
                                                                              ("test_c_skip", "skipped")]
    assert "one is not two" in s["cases"][1]["message"] and "assert 1 == 2" in s["cases"][1]["longrepr"]
    assert s["cases"][2]["message"] == "not here"
    assert [n.split("::")[1] for n in s["not_finished"]] == ["test_d_slow", "test_e_never"] and s["counts"]["not finished"] == 2
    assert "| test_d_slow | not finished |" in gc.tests_markdown(s)


def test_plugin_cuts_a_test_to_the_deadline_and_starts_none_after_it(tmp_path):
    pytest.importorskip("pytest_timeout")
    start = time.time()
    proc = _pytest_with_plugin(tmp_path, f"--jsonl-deadline={time.time() + 20:.0f}", "--jsonl-min-start-s=8", "--timeout=600")
    out, _ = proc.communicate(timeout=120)
    assert time.time() - start < 45, out  # test_d_slow sleeps 60 s: cut to the deadline, not to --timeout
    cases = {c["test"].split("::")[1]: c for c in gpu_check().summarize_tests(tmp_path / "r.jsonl")["cases"]}
    assert cases["test_d_slow"]["outcome"] == "failed" and "Timeout" in cases["test_d_slow"]["message"]
    assert cases["test_d_slow"]["timeout_s"] < 20
    assert cases["test_e_never"]["outcome"] == "skipped" and cases["test_e_never"]["message"].startswith("deadline:")


def test_each_step_variant_checks_the_deadline_and_is_written_with_its_reason(tmp_path, monkeypatch):
    gc = gpu_check()
    monkeypatch.setattr(gc, "environment", lambda: {"torch": "x", "cuda": None, "cudnn": None, "python": "3"})
    started = []
    monkeypatch.setattr(gc, "run_child", lambda *a, **k: started.append(a) or {})
    monkeypatch.setenv("GPU_CHECK_T0", str(time.time() - 100))
    a = SimpleNamespace(out=tmp_path, cpu_smoke=True, variant_cap_s=300)
    assert gc.part_step(a, gc.Clock(budget_s=103)) == 0  # 3 s left, a smoke variant needs 5
    assert started == []
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["step-cifar_resnet8_cifar_resnet8-afd-sequential.json", "step-cifar_resnet8_cifar_resnet8-independent.json",
                     "step-cifar_resnet8_cifar_resnet8-reference.json", "step.md"]
    rec = json.loads((tmp_path / "step-cifar_resnet8_cifar_resnet8-reference.json").read_text())
    assert rec["status"] == "skipped" and rec["reason"].startswith("deadline:") and "needs at least 5 s" in rec["reason"]
    assert gc.check_out(tmp_path) == []


def test_full_step_plan_fits_the_out_limits_most_valuable_first():
    gc = gpu_check()
    plan = gc.step_plan(smoke=False)
    assert plan[0][:2] == (gc.R18, "reference") and plan[1][:2] == (gc.R18, "afd-sequential")
    assert len(plan) + 1 <= gc.OUT_LIMITS["files"]  # one file per variant + step.md
    assert all(gc.NAME_OK.match(f"step-{gc.slug(p)}-{v}.json") for p, v, _ in plan)
    for i, (peers, variant, _) in enumerate(plan):  # each pair's reference first: its ratios are taken in the same call
        assert variant == "reference" or (peers, "reference") in [(p, v) for p, v, _ in plan[:i]]


def test_a_child_past_its_limit_is_killed_with_its_group_and_its_output_kept(tmp_path):
    gc = gpu_check()
    start = time.time()
    r = gc.run_child(["bash", "-c", "echo started; sleep 30 & wait"], 1.5, log=tmp_path / "log")
    assert r["timed_out"] and time.time() - start < 10 and r["tail"] == "started"
    assert "killed after 2 s" in (tmp_path / "log").read_text()
