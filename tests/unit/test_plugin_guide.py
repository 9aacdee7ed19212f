"""Every code block of plugins/README.md that names a file is copied from it word for word."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import aioproxy_example
import pytest

import aioproxy
from aioproxy import ConfigError, create_app
from aioproxy.h1client import H1Response

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
PLUGIN = PLUGINS / "aioproxy-example"
README = PLUGINS / "README.md"
# A fenced block whose first line is a comment naming a file of the example plugin.
EXCERPT = re.compile(
    r"^```(?:python|toml)\n# (?P<path>\S+)\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL
)


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


def section(title: str) -> str:
    """The text of the guide's section whose heading ends with ``title``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f" {title}\n")
    end = text.find("\n## ", start)
    return text[start : end if end >= 0 else len(text)]


def test_the_error_table_is_what_the_classes_do() -> None:
    rows = re.findall(
        r"^\| (`\w+`(?: / `\w+`)?) \| (\d+) \| `(\w+)` \|(.*?)\|$", section("Errors"), re.MULTILINE
    )
    assert len(rows) == 9
    for names, status, type_, codes in rows:
        classes = [getattr(aioproxy, name.strip("`")) for name in names.split(" / ")]
        defaults = [code.strip("` ") or None for code in codes.split(" / ")]
        for cls, code in zip(classes, defaults * len(classes) if len(defaults) == 1 else defaults):
            error = cls("x")
            assert (error.status, error.type, error.code) == (int(status), type_, code), names


def test_the_settings_error_shown_is_the_one_start_up_gives() -> None:
    shown = re.search(
        r"```\n(model 'toy': invalid example settings: .*?)\n```",
        section("The Provider subclass"),
        re.DOTALL,
    )
    assert shown is not None
    model = {
        "name": "toy",
        "provider": "example",
        "api_base": "http://127.0.0.1:9",
        "settings": {"max_word": 64},
    }
    with pytest.raises(ConfigError) as caught:
        create_app({"models": [model]}, plugins=[aioproxy_example], load_entrypoints=False)
    assert str(caught.value) == shown[1].replace("\n", " ")


def test_the_lean_clients_answer_is_not_an_async_context_manager_as_the_guide_says() -> None:
    assert "**It is not an async context manager**" in section("Calling the upstream")
    assert not hasattr(H1Response, "__aenter__")


def test_the_config_shown_starts_the_example_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = re.findall(r"```toml\n(\[\[models\]\]\n.*?)```", section("The package"), re.DOTALL)
    monkeypatch.setenv("TOY_KEY", "toy-secret")
    create_app(tomllib.loads(block), plugins=[aioproxy_example], load_entrypoints=False)
