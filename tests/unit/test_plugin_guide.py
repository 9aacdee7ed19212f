"""Every code block of plugins/README.md that names a file is copied from it word for word."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
PLUGIN = PLUGINS / "aioproxy-example"
README = PLUGINS / "README.md"
# A fenced block whose first line is a comment naming a file of the example plugin.
EXCERPT = re.compile(r"^```(?:python|toml)\n# (?P<path>\S+)\n(?P<code>.*?)^```$", re.M | re.S)


def excerpts() -> list[tuple[str, str]]:
    return [(m["path"], m["code"]) for m in EXCERPT.finditer(README.read_text(encoding="utf-8"))]


def test_the_readme_has_excerpts_of_every_file() -> None:
    paths = {path for path, _ in excerpts()}
    assert paths == {
        "pyproject.toml",
        "aioproxy_example/__init__.py",
        "tests/conftest.py",
        "tests/test_example_provider.py",
    }


@pytest.mark.parametrize(("path", "code"), excerpts(), ids=lambda v: v.split("\n")[0][:40])
def test_excerpt_is_in_its_file(path: str, code: str) -> None:
    source = (PLUGIN / path).read_text(encoding="utf-8")
    assert code in source, f"plugins/README.md has a block of {path} that is not in the file"
