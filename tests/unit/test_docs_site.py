"""The documentation site builds strictly (broken links and pages missing from the nav fail), the README
stays short, and every command and every config field is documented."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastafd import args, cli
from fastafd.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))


def test_mkdocs_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    mkdocs = shutil.which("mkdocs")
    cmd = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    proc = subprocess.run([*cmd, "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "config" / "index.html").is_file()


def test_every_page_is_in_the_nav():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {next(iter(item.values())) for item in nav}
    assert listed == {p.name for p in DOCS.glob("*.md")}


def test_every_command_is_documented():
    text = docs_text()
    commands = [*cli.COMMANDS, "sweep status", "data pack", "data verify", "bench step"]
    missing = [c for c in commands if f"fastafd {c}" not in text]
    assert not missing, f"commands not in docs/: {missing}"


def test_every_config_field_is_documented():
    text = docs_text()
    names = args.option_names(TrainConfig)
    missing = sorted(n for n in names if not n.split(".")[-1].startswith("no_") and f"`--{n}`" not in text)
    assert not missing, f"config fields not in docs/: {missing}"


def test_readme_is_short_and_links_to_existing_pages():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 210
    for target in re.findall(r"\]\((docs/[^)#\s]+)", readme):
        assert (ROOT / target).is_file(), target
