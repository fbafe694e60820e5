"""A pytest plugin for runs that may be killed at a time limit: one JSON line per test, written (and
fsynced) the moment the test ends, so that a run stopped by a time limit still leaves every finished
test's outcome; and a deadline, before which no test starts that cannot end in time.

    python -m pytest -p fastafd_jsonl --jsonl=tests.jsonl --jsonl-deadline=<unix time> ...

(``benchmarks/plugins`` on ``PYTHONPATH``; ``benchmarks/gpu_check.py tests`` does this.)

Lines: first ``{"event": "collected", "tests": [...]}``, then per test ``{"event": "test", "test":
nodeid, "outcome": "passed" | "failed" | "skipped" | "error", "seconds": ..., "message": ...,
"timeout_s": ...}`` (``longrepr``, the failure's text shortened, for failures and errors), and
``{"event": "finished", "exitstatus": ...}`` when pytest ends by itself. With ``--jsonl-deadline`` a
test that would start less than ``--jsonl-min-start-s`` before it is skipped with the reason
recorded, and each test's pytest-timeout bound is cut to the time left, so that the run ends by
the deadline even when the last test hangs.
"""

from __future__ import annotations

import json
import os
import time

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastafd_jsonl")
    group.addoption("--jsonl", default=None, help="write one JSON line per test to this file as each test ends")
    group.addoption("--jsonl-deadline", type=float, default=None, help="unix time by which the run must end")
    group.addoption("--jsonl-min-start-s", type=float, default=20.0, help="start no test later than this many seconds before the deadline")


class JsonlReport:
    def __init__(self, config: pytest.Config) -> None:
        self.path = config.getoption("--jsonl")
        self.deadline = config.getoption("--jsonl-deadline")
        self.min_start = config.getoption("--jsonl-min-start-s")
        self.config = config
        self.file = open(self.path, "a", buffering=1) if self.path else None  # noqa: SIM115 - open for the whole run
        self.reports: dict[str, list[pytest.TestReport]] = {}
        self.timeouts: dict[str, float] = {}

    @property
    def default_timeout(self) -> float:
        """pytest-timeout's bound for every test (its option or ini value; 0 without the plugin)."""
        return float(getattr(self.config, "_env_timeout", None) or 0)

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.write({"event": "collected", "tests": [item.nodeid for item in session.items], "time": time.time()})

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        """Before pytest-timeout reads the item's bound: skip it, or cut its bound to the time left."""
        if self.deadline is not None:
            left = self.deadline - time.time()
            if left < self.min_start:
                item.add_marker(pytest.mark.skip(reason=f"deadline: {max(left, 0):.0f} s left of the command's budget, "
                                                        f"a test needs {self.min_start:.0f} s to start"), append=False)
            else:
                bound = left - 5
                marker = item.get_closest_marker("timeout")
                own = float(marker.args[0]) if marker and marker.args else self.default_timeout
                if not own or bound < own:
                    item.add_marker(pytest.mark.timeout(bound), append=False)  # the closest marker wins
                    self.timeouts[item.nodeid] = round(bound, 1)
                else:
                    self.timeouts[item.nodeid] = own
        yield

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.setdefault(report.nodeid, []).append(report)
        if report.when != "teardown":
            return
        phases = self.reports.pop(report.nodeid)
        outcome, message, longrepr = "passed", "", ""
        for r in phases:
            if r.skipped:
                outcome = "skipped"
                message = (r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)).removeprefix("Skipped: ")
            elif r.failed:
                outcome = "failed" if r.when == "call" else "error"
                crash = getattr(r.longrepr, "reprcrash", None)
                message = crash.message if crash is not None else str(r.longrepr).strip().splitlines()[-1:][0] if r.longrepr else ""
                longrepr = str(r.longrepr)[-6000:]
                break
        record = {"event": "test", "test": report.nodeid, "outcome": outcome, "seconds": round(sum(r.duration for r in phases), 2),
                  "message": message[:1000], "timeout_s": self.timeouts.get(report.nodeid, self.default_timeout or None),
                  "time": time.time()}
        if longrepr:
            record["longrepr"] = longrepr
        self.write(record)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.write({"event": "finished", "exitstatus": int(exitstatus), "time": time.time()})
        if self.file is not None:
            self.file.close()
            self.file = None


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--jsonl") or config.getoption("--jsonl-deadline") is not None:
        config.pluginmanager.register(JsonlReport(config), "fastafd_jsonl_report")
