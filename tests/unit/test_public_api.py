"""The declared plugin API: plugins import only ``from aioproxy import ...``, and every public
name is importable and documented."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import aioproxy

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SOURCES = sorted(ROOT.glob("plugins/*/aioproxy_*/**/*.py"))


def _aioproxy_imports(path: Path) -> list[str]:
    """Every module of the aioproxy package ``path`` imports, as written."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        found += [m for m in modules if m == "aioproxy" or m.startswith("aioproxy.")]
    return found


def test_the_scan_sees_the_bundled_plugins() -> None:
    packages = {path.relative_to(ROOT).parts[1] for path in PLUGIN_SOURCES}
    assert {
        "aioproxy-anthropic",
        "aioproxy-azure",
        "aioproxy-bedrock",
        "aioproxy-echo",
        "aioproxy-example",
        "aioproxy-gemini",
        "aioproxy-openai",
    } <= packages


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_public_api(path: Path) -> None:
    internal = [m for m in _aioproxy_imports(path) if m != "aioproxy"]
    assert not internal, (
        f"{path.name} imports internal modules {internal}: use `from aioproxy import`"
    )


def test_every_public_name_is_documented() -> None:
    docs = (ROOT / "plugins" / "README.md").read_text(encoding="utf-8") + (
        ROOT / "README.md"
    ).read_text(encoding="utf-8")
    missing = [name for name in aioproxy.__all__ if f"`{name}" not in docs]
    assert not missing, f"not documented in plugins/README.md or README.md: {missing}"


def _isort_style(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted_importable_and_unique() -> None:
    # The names of fields and translating come from their own (sorted) __all__.
    kits = [*aioproxy.fields.__all__, *aioproxy.translating.__all__]
    own = [name for name in aioproxy.__all__ if name not in kits]
    assert own == sorted(set(own), key=_isort_style)
    for kit in (aioproxy.fields, aioproxy.translating):
        assert kit.__all__ == sorted(kit.__all__, key=_isort_style), kit.__name__
    assert len(set(aioproxy.__all__)) == len(aioproxy.__all__)
    for name in aioproxy.__all__:
        assert getattr(aioproxy, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from aioproxy import *", namespace)  # noqa: S102 - what a plugin's star import sees
    assert set(aioproxy.__all__) <= namespace.keys()
