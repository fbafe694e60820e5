"""Every command line shown in the README and docs/ parses (issue 26, case 7: the README documented
`--system.overlap_comm off`, which the CLI rejects). Lines are taken from code blocks (``fastafd ...``, with
``\\`` continuations) and from inline code spans (`` `fastafd ...` ``, `` `--section.option value` ``); each is run
through the command's own parser (nothing is trained, read or written)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fastafd.args import parse_train_args, tyro_parse
from fastafd.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"\.\.\.|…|\[|<|\||\$\(|\*\*|--section\.|\bVALUE\b|\bFILE\b")


def _parsers():
    from fastafd.bench.step import StepBenchArgs
    from fastafd.cli import EvalArgs, ExportArgs, PlotArgs
    from fastafd.data_commands import PackArgs, VerifyArgs
    from fastafd.experiments.report import ReportArgs
    from fastafd.experiments.sweep import StatusArgs, SweepArgs, _split

    def tyro(cls):
        return lambda argv: tyro_parse(cls, argv, prog="fastafd", description="")

    def sweep(argv):
        own, shared = _split(argv)
        tyro(SweepArgs)(own)
        parse_train_args(shared)

    def none(argv):
        if argv:
            raise UserError(f"takes no arguments: {argv}")

    return {("train",): parse_train_args, ("eval",): tyro(EvalArgs), ("plot",): tyro(PlotArgs), ("export",): tyro(ExportArgs),
            ("report",): tyro(ReportArgs), ("sweep", "status"): tyro(StatusArgs), ("sweep",): sweep, ("data", "pack"): tyro(PackArgs),
            ("data", "verify"): tyro(VerifyArgs), ("bench", "step"): tyro(StepBenchArgs), ("recipes",): none, ("methods",): none}


OPTION_SPANS: list[tuple[str, str]] = []


def documented() -> list[tuple[str, str]]:
    """(where, command line) for every complete ``fastafd`` command and every ``--section.option value`` span."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        in_code = False
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.lstrip().startswith("```"):
                in_code = not in_code
            elif in_code:
                cmd = line.strip().removeprefix("$ ")
                if cmd.startswith("fastafd "):
                    while cmd.endswith("\\") and i + 1 < len(lines):
                        i += 1
                        cmd = cmd[:-1] + " " + lines[i].strip()
                    cmd = cmd.split("  #")[0].split(" # ")[0].strip()
                    for part in cmd.split(" && "):  # `fastafd sweep ... && fastafd report ...`: each command
                        out.append((f"{doc.name}:{i + 1}", part.split(" > ")[0].strip()))  # `... --print-config > my.yaml`
            else:
                for span in re.findall(r"`([^`\n]+)`", line):
                    if span.startswith("fastafd ") and len(span.split()) > 2 and not span.split()[-1].startswith("--"):
                        out.append((f"{doc.name}:{i + 1}", span.split(" > ")[0]))  # (`fastafd train --out` names an option: not a command)
                    elif re.fullmatch(r"--[a-z_]+\.[a-z_.]+ [^\s-][^\s]*", span):  # an option with its value
                        out.append((f"{doc.name}:{i + 1}", f"fastafd train {span}"))
                    elif re.fullmatch(r"--[a-z_]+\.[a-z_.]+", span):  # an option's name: it must exist
                        OPTION_SPANS.append((f"{doc.name}:{i + 1}", span))
            i += 1
    seen: set[str] = set()
    return [(w, c) for w, c in out if not PLACEHOLDER.search(c) and not (c in seen or seen.add(c))]


COMMANDS = documented()


def test_the_documents_show_commands():
    assert len(COMMANDS) > 30 and len(OPTION_SPANS) > 30


def test_every_documented_train_option_exists():
    from fastafd.args import option_names
    from fastafd.config import TrainConfig

    known = {f"--{n}" for n in option_names(TrainConfig)} | {f"--{n.rsplit('.', 1)[0]}.no_{n.rsplit('.', 1)[1]}" for n in option_names(TrainConfig) if "." in n}
    wrong = [f"{w}: {span}" for w, span in OPTION_SPANS if span not in known and not PLACEHOLDER.search(span)]
    assert not wrong, wrong


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(where, command):
    argv = shlex.split(command)[1:]
    parsers = _parsers()
    key = next((k for k in sorted(parsers, key=len, reverse=True) if tuple(argv[: len(k)]) == k), None)
    assert key is not None, f"{where}: `{command}` names no command"
    args = argv[len(key):]
    if "--help" in args or "-h" in args or (not args and key in (("data", "pack"), ("data", "verify"))):
        return
    if key == ("train",) and "--config" in args:  # the documented file is an example: an empty config file stands in for it
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write("{}\n")
        args = [f.name if a == args[args.index("--config") + 1] else a for a in args]
    try:
        parsers[key](args)
    except UserError as e:
        pytest.fail(f"{where}: `{command}` does not parse: {e}")
