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


def _module_map() -> set[str]:
    """The modules the map in docs/design.md names: first column `x.py` or `room/`, whose modules the second column names."""
    named = set()
    design = (DOCS / "design.md").read_text()
    table = design[design.index("| module | job |"):].split("\n\n", 1)[0]
    for row in table.splitlines()[2:]:
        first, second = row.split(" | ", 2)[:2]
        for path in re.findall(r"`([\w/]+(?:\.py|/))`", first):
            if path.endswith("/"):
                named |= {path + name for name in re.findall(r"`(\w+\.py)`", second)}
            else:
                named.add(path)
    return named


def test_the_module_map_names_every_module_of_the_tree_and_nothing_else():
    tree = {p.relative_to(ROOT / "fastafd").as_posix() for p in (ROOT / "fastafd").rglob("*.py") if p.name != "__init__.py"}
    named = {m for m in _module_map() if not m.endswith("__init__.py")}
    assert not named - tree, f"docs/design.md names modules that do not exist: {sorted(named - tree)}"
    assert not tree - named, f"modules missing from the map in docs/design.md: {sorted(tree - named)}"
    design = (ROOT / "README.md").read_text().split("\n## Design", 1)[1].split("\n## ", 1)[0]
    rooms = set(re.findall(r"`fastafd/(\w+)/`", design))
    packages = {p.parent.name for p in (ROOT / "fastafd").glob("*/__init__.py")}
    assert rooms == packages, f"the README's Design section names the rooms {sorted(rooms)}, the tree has {sorted(packages)}"
