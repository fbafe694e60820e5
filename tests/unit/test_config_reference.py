"""docs/config.md is generated from the config docstrings and kept in sync; every field must be documented."""

from dataclasses import dataclass, field

import pytest

from fastafd import docs
from fastafd.config import LogConfig, TrainConfig


def test_committed_reference_is_up_to_date():
    assert docs.REFERENCE.is_file(), "docs/config.md is missing: run `python -m fastafd.docs`"
    assert docs.REFERENCE.read_text() == docs.config_reference(), "docs/config.md is out of date: run `python -m fastafd.docs`"


def test_every_config_field_has_a_docstring():
    assert docs.missing_docs(TrainConfig) == []


def test_reference_lists_every_option_with_its_doc_and_default():
    text = docs.config_reference()
    assert "| `--log.profile` | `tuple[int, int] \\| None` | `None` | Profile training steps" in text
    assert "| `--adv_optim.lr` | `float` | `2e-05` |" in text  # the parent's default factory, not OptimConfig's default
    assert "| `--optim.lr` | `float` | `0.1` |" in text
    assert "| `--log.tensorboard` | `auto \\| on \\| off` | `auto` |" in text


@dataclass
class Inner:
    """A section documented by its class docstring."""

    a: int = 1
    """Documented."""

    b: int = 2


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    log: LogConfig = field(default_factory=LogConfig)
    c: str = "x"


def test_a_field_without_docstring_fails_the_reference():
    assert docs.missing_docs(Outer) == ["c", "inner.b"]
    with pytest.raises(docs.MissingDocs, match="c, inner.b"):
        docs.config_reference(Outer)


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(docs, "REFERENCE", tmp_path / "config.md")
    assert docs.main(["--check"]) == 1
    assert docs.main([]) == 0
    assert docs.main(["--check"]) == 0
