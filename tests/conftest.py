"""What many test files share: the ``fastafd`` command as a child process and its environment (``fastafd_cli``), a free
TCP port (``free_port``), and the deterministic float64 set-up of the reference tests (``float64``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Cli:
    """``fastafd`` as a child process: the installed script when there is one, else ``python -m fastafd.cli``
    from this checkout."""

    def __init__(self) -> None:
        script = shutil.which("fastafd")
        self.cmd: list[str] = [script] if script else [sys.executable, "-m", "fastafd.cli"]

    @staticmethod
    def env(cache: Path | None = None, **extra: object) -> dict[str, str]:
        """The child's environment: this one, with this checkout first on the module path and the venv's ``bin``
        first on ``PATH`` (launch/run.sh calls python3), its own cache folder when given (``FASTAFD_CACHE``),
        and ``extra`` (values as strings; None removes a variable)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env["PYTHON"] = sys.executable
        if cache is not None:
            env["FASTAFD_CACHE"] = str(cache)
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    def run(self, args: Sequence[str], env: dict[str, str] | None = None, *, check: bool = True, timeout: float = 600,
            **kw) -> subprocess.CompletedProcess:
        """Run ``fastafd ARGS`` to its end; ``check``: a non-zero exit fails the test with the child's output."""
        proc = subprocess.run([*self.cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env=self.env() if env is None else env, **kw)
        if check and proc.returncode != 0:
            pytest.fail(f"fastafd {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, args: Sequence[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        """Start ``fastafd ARGS`` (text pipes for stdout and stderr unless given)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen([*self.cmd, *map(str, args)], text=True, env=self.env() if env is None else env, **kw)


@pytest.fixture(scope="session")
def fastafd_cli() -> Cli:
    """The ``fastafd`` command as a child process (:class:`Cli`: ``run``, ``popen``, ``env``)."""
    return Cli()


def _free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: a TCP port nothing listens on now."""
    return _free_port


@contextlib.contextmanager
def _float64() -> Iterator[None]:
    import torch

    torch.use_deterministic_algorithms(True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_default_dtype(previous)


@pytest.fixture
def float64() -> Iterator[None]:
    """The reference tests' set-up: deterministic algorithms and float64 by default, for the test's duration."""
    with _float64():
        yield
