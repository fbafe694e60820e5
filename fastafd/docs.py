"""The config reference (``docs/config.md``), generated from the config dataclasses' field docstrings.

``python -m fastafd.docs`` rewrites the file; ``python -m fastafd.docs --check`` exits 1 when it is
out of date. ``tests/unit/test_config_reference.py`` runs the same comparison, so adding a config
field without a docstring, or without regenerating the file, fails the tests.

A field's documentation is the string literal right after it in the class body (the convention
tyro also reads for ``--help``). A field whose type is itself a config dataclass may instead be
documented by that class's docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from pathlib import Path

from fastafd import config

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "config.md"
"""Where the generated reference lives in a source checkout."""


class MissingDocs(Exception):
    """Config fields without a docstring."""


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` for the fields of dataclass ``cls`` that have one (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _defaults(cls: type) -> object | None:
    """A default instance of ``cls`` (its nested sections keep their parent's factories), or None."""
    try:
        return cls()
    except Exception:  # a dataclass with required fields: fall back to per-field defaults
        return None


def _show(value: object) -> str:
    """A default as it would be typed on the command line."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "None"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple | list):
        return " ".join(_show(v) for v in value) if value else "(empty)"
    return str(value)


def _type(hint: object) -> str:
    if hint is config.MethodName:
        from fastafd.methods import registry

        return " | ".join(registry.names())
    if hint is config.DataFormatName:
        from fastafd.data import registry as formats

        return " | ".join(("auto", *formats.names()))
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(hint))
    text = str(hint) if not isinstance(hint, type) else hint.__name__
    for prefix in ("typing.", "pathlib.", "fastafd.config."):
        text = text.replace(prefix, "")
    return text.replace("NoneType", "None")


def _sections(cls: type, prefix: str = "", instance: object | None = None) -> list[tuple[str, type, str, object | None]]:
    """``(option prefix, dataclass, section doc, default instance)`` for ``cls`` and every nested config dataclass."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = [(prefix, cls, inspect.cleandoc(cls.__doc__ or ""), instance)]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sub = getattr(instance, f.name) if instance is not None else _defaults(hints[f.name])
            nested = _sections(hints[f.name], prefix + f.name + ".", sub)
            nested[0] = (*nested[0][:2], docs.get(f.name) or nested[0][2], sub)  # the field's own doc wins
            out += nested
    return out


def missing_docs(cls: type = config.TrainConfig, prefix: str = "") -> list[str]:
    """Options (``section.field``) without a docstring; nested sections may use their class docstring."""
    missing = []
    for pre, sec, _, _ in _sections(cls, prefix):
        hints, docs = typing.get_type_hints(sec), field_docs(sec)
        for f in dataclasses.fields(sec):
            if dataclasses.is_dataclass(hints[f.name]):
                if not (docs.get(f.name) or (hints[f.name].__doc__ or "").strip()):
                    missing.append(pre + f.name)
            elif not docs.get(f.name):
                missing.append(pre + f.name)
    return missing


def config_reference(cls: type = config.TrainConfig) -> str:
    """The Markdown config reference; :class:`MissingDocs` if any field lacks a docstring."""
    missing = missing_docs(cls)
    if missing:
        raise MissingDocs("config fields without a docstring (add a string literal under each): " + ", ".join(missing))
    lines = [
        "# Config reference",
        "",
        "<!-- generated by `python -m fastafd.docs` from the docstrings in fastafd/config.py; do not edit -->",
        "",
        "Every field is an option of `fastafd train` (`--section.field VALUE`; booleans also as",
        "`--section.field` / `--section.no_field`; tuples as space-separated values). Defaults shown are the",
        "dataclass defaults; a recipe (`--recipe NAME`, default `demo`) replaces some of them: `fastafd recipes`",
        "lists the recipes and `fastafd/recipes.py` shows what each sets. Shorthands: `--data DIR` is",
        "`--data.root DIR`, `--profile START END` is `--log.profile START END`.",
        "",
        "A run saves its fully resolved config as `config.json` in the run directory.",
        "",
        "**Config files.** `fastafd train --config FILE` reads the same fields from a YAML or JSON file, nested",
        "by section (`optim: {lr: 0.2}`); a run's `config.json` works as is. The recipe's defaults come first",
        "(`--recipe`, else the file's `recipe`, else `demo`), then the file, then the command-line options.",
        "`fastafd train --recipe cifar100_resnet32_afd --print-config > my.yaml` writes the resolved config as YAML to start one;",
        "`fastafd sweep --config FILE` gives every cell the file. An unknown key or a value of the wrong type",
        "is one line naming the key and its line (exit 2, nothing written).",
        "",
    ]
    for pre, sec, doc, instance in _sections(cls, "", _defaults(cls)):
        hints, docs = typing.get_type_hints(sec), field_docs(sec)
        rows = [f for f in dataclasses.fields(sec) if not dataclasses.is_dataclass(hints[f.name])]
        if not rows:
            continue
        lines += [f"## `{pre.rstrip('.') or 'top level'}`", "", doc, ""] if doc else [f"## `{pre.rstrip('.') or 'top level'}`", ""]
        lines += ["| option | type | default | description |", "| --- | --- | --- | --- |"]
        for f in rows:
            desc = docs[f.name].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            typ = _type(hints[f.name]).replace("|", "\\|")
            value = getattr(instance, f.name) if instance is not None else _default(f)
            lines.append(f"| `--{pre}{f.name}` | `{typ}` | `{_show(value)}` | {desc} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = config_reference()
    if "--check" in argv:
        current = REFERENCE.read_text() if REFERENCE.is_file() else ""
        if current != text:
            print(f"{REFERENCE} is out of date: run `python -m fastafd.docs`", file=sys.stderr)
            return 1
        return 0
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(text)
    print(REFERENCE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
