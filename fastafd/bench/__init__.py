"""Benchmarks shipped with the package (``fastafd bench ...``); scripts in ``benchmarks/`` call these."""

from __future__ import annotations

from collections.abc import Sequence

from fastafd.errors import UserError

BENCHMARKS = {"step": "training-step img/s of fastafd vs a plain PyTorch reference"}


def cmd_bench(argv: Sequence[str]) -> int:
    """``fastafd bench NAME [options]``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastafd bench NAME [options]\n\nbenchmarks:\n" + "\n".join(f"  {k:<6} {v}" for k, v in BENCHMARKS.items()))
        return 0
    name, rest = argv[0], list(argv[1:])
    if name == "step":
        from fastafd.bench.step import cmd

        return cmd(rest)
    raise UserError(f"unknown benchmark '{name}': choose from {', '.join(BENCHMARKS)}")
