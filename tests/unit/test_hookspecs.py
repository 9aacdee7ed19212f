"""aioproxy.hookspecs meta-tests: every hook documents its arguments and whether it may be async."""

from __future__ import annotations

import inspect
import re

import pluggy
import pytest

from aioproxy import hookspecs
from aioproxy.plugins import Hooks

SPECS = {name: getattr(hookspecs, name) for name in hookspecs.HOOK_NAMES}


def arguments(name: str) -> list[str]:
    return list(inspect.signature(SPECS[name]).parameters)


def test_hook_names() -> None:
    # Every hook but the start-up ones runs per request, in the order it is declared.
    start_up = ("register_providers", "register_routes", "register_contexts")
    assert hookspecs.HOOK_NAMES == (*start_up, *hookspecs.PER_REQUEST_HOOKS)
    assert len(set(hookspecs.PER_REQUEST_HOOKS)) == len(hookspecs.PER_REQUEST_HOOKS)
    assert {"before_attempt", "after_attempt"} <= set(hookspecs.PER_REQUEST_HOOKS)


def test_hooks_class_resolves_every_per_request_hook() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    hooks = Hooks(pm)
    assert {name for name in vars(hooks)} == set(hookspecs.PER_REQUEST_HOOKS)


def test_markers_belong_to_the_project() -> None:
    assert hookspecs.PROJECT == "aioproxy"
    assert hookspecs.hookspec.project_name == hookspecs.hookimpl.project_name == "aioproxy"


# Known gaps, each a docstring that does not name one of its arguments.
UNDOCUMENTED: set[tuple[str, str]] = set()  # (hook, argument) pairs a docstring may skip


def _cases() -> list[object]:
    cases: list[object] = []
    for name in hookspecs.HOOK_NAMES:
        for arg in arguments(name):
            marks = []
            if (name, arg) in UNDOCUMENTED:
                marks.append(
                    pytest.mark.xfail(
                        strict=True, reason=f"doc bug: the {name} docstring never names `{arg}`"
                    )
                )
            cases.append(pytest.param(name, arg, id=f"{name}-{arg}", marks=marks))
    return cases


@pytest.mark.parametrize(("name", "arg"), _cases())
def test_docstring_names_every_argument(name: str, arg: str) -> None:
    doc = inspect.getdoc(SPECS[name]) or ""
    assert re.search(rf"(?<![\w.]){re.escape(arg)}\b", doc), f"{name} does not document {arg!r}"


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_docstring_says_sync_or_async(name: str) -> None:
    doc = inspect.getdoc(SPECS[name]) or ""
    says_async = "async def" in doc
    says_sync = "Synchronous" in doc
    assert says_async != says_sync, f"{name}: say exactly one of 'Synchronous' / 'async def'"


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_async_claim_matches_how_it_is_called(name: str) -> None:
    doc = inspect.getdoc(SPECS[name]) or ""
    # start-up hooks and list_models (each_sync) are called synchronously; the rest are awaited
    synchronous = name.startswith("register_") or name == "list_models"
    assert ("Synchronous" in doc) is synchronous


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_spec_is_documented_and_plain(name: str) -> None:
    spec = SPECS[name]
    assert inspect.getdoc(spec), name
    assert not inspect.iscoroutinefunction(spec)
    marker = spec.aioproxy_spec
    assert not marker["firstresult"]  # "first non-None" is the Hook's job, for async impls
    assert not marker["historic"]
