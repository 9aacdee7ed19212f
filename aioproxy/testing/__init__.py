"""Test kit for provider plugins: aioproxy before your fake upstream, checked as clients see it.

Each ``check_*`` sends real HTTP through the proxy, over the raw wire and with the ``openai`` SDK
(a test-time dependency), and asserts the OpenAI shapes; each ``assert_*`` checks one answer::

    from aioproxy.testing import (
        check_cancellation, check_chat, check_chat_stream, check_error_mapping, start_proxy,
    )

    async def test_my_provider(aiohttp_server, fake):  # fake: your fake upstream
        upstream = await aiohttp_server(fake.app())
        model = {"name": "m", "provider": "mine", "api_base": str(upstream.make_url("/"))}
        proxy = await start_proxy(aiohttp_server, {"models": [model]}, [aioproxy_mine])
        assert await check_chat(proxy, "m") == "the fake's answer"
        await check_chat_stream(proxy, "m")
        await check_error_mapping(proxy, "m", lambda: fake.fail_next(429), 429)
        await check_cancellation(proxy, "m", lambda: fake.in_flight)

Registered as a pytest plugin (entry point ``pytest11``), it also gives the ``aioproxy_server``
fixture: ``proxy = await aioproxy_server(config, [plugin])``, and runs ``async def`` tests and
fixtures with pytest-asyncio in auto mode unless the project chose a mode. ``pip install
'aioproxy[testing]'`` brings what it needs (pytest, pytest-aiohttp, pytest-asyncio, openai).

The kit's parts, each in its own module: ``proxy`` (the proxy under test), ``sse`` (reading
streams), ``assertions`` (one answer's shape), ``checks`` (scenarios through the proxy, the
``HELLO`` messages they send, and ``PNG_PIXEL``, a 1x1 PNG in base64 for tests of image parts),
``waiting`` (``eventually``), ``clock`` (``FakeClock``), ``fakes`` (the ``FakeUpstream`` base of
fake upstream APIs), ``openai_upstream`` (``FakeOpenAI``) and ``modules`` (``import_path``, for a
fake upstream in a file next to your tests). Import them from here.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from ..config import Config
from ..translating import completion_usage
from .assertions import (
    assert_chat_chunk,
    assert_chat_chunks,
    assert_chat_completion,
    assert_completion,
    assert_completion_chunks,
    assert_embeddings,
    assert_error_object,
    assert_openai_error,
    assert_response,
    assert_response_events,
    text_response_event_types,
)
from .checks import (
    HELLO,
    PNG_PIXEL,
    Trigger,
    check_cancellation,
    check_chat,
    check_chat_stream,
    check_completion,
    check_embeddings,
    check_error_mapping,
    check_responses,
    weather_tool,
)
from .clock import FakeClock
from .fakes import FakeUpstream, Recorded
from .modules import import_path
from .openai_upstream import TRANSPORT_FAULTS, FakeOpenAI
from .proxy import INSTALL, KIT_KEY, ProxyUnderTest, StartProxy, start_proxy
from .sse import DONE_DATA, first_event, parse_sse, read_sse
from .waiting import eventually

__all__ = [
    "DONE_DATA",
    "HELLO",
    "KIT_KEY",
    "PNG_PIXEL",
    "TRANSPORT_FAULTS",
    "FakeClock",
    "FakeOpenAI",
    "FakeUpstream",
    "ProxyUnderTest",
    "Recorded",
    "StartProxy",
    "Trigger",
    "aioproxy_server",
    "assert_chat_chunk",
    "assert_chat_chunks",
    "assert_chat_completion",
    "assert_completion",
    "assert_completion_chunks",
    "assert_embeddings",
    "assert_error_object",
    "assert_openai_error",
    "assert_response",
    "assert_response_events",
    "check_cancellation",
    "check_chat",
    "check_chat_stream",
    "check_completion",
    "check_embeddings",
    "check_error_mapping",
    "check_responses",
    "completion_usage",
    "eventually",
    "first_event",
    "import_path",
    "parse_sse",
    "read_sse",
    "start_proxy",
    "text_response_event_types",
    "weather_tool",
]


@pytest.fixture
def aioproxy_server(aiohttp_server: Any) -> StartProxy:
    """``await aioproxy_server(config, plugins)``: :func:`start_proxy` on pytest-aiohttp."""

    async def start(
        config: Mapping[str, Any] | Config, plugins: Iterable[object] = ()
    ) -> ProxyUnderTest:
        return await start_proxy(aiohttp_server, config, plugins)

    return start


# -- pytest set-up -------------------------------------------------------------------------------


def _configured(config: pytest.Config, name: str) -> bool:
    """Whether a configuration file or ``-o`` sets the ini value ``name``."""
    # pytest has no public way to ask: 9.x keeps file values and -o overrides in _inicfg (its
    # inicfg is deprecated), 8.x in inicfg and _override_ini.
    values = getattr(config, "_inicfg", None)
    if values is not None:
        return name in values
    overrides = getattr(config, "_override_ini", ())
    return name in config.inicfg or any(o.partition("=")[0] == name for o in overrides)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Load the price table in the test process once: the proxies that tests start then look
    prices up here, not in a child process each (what a serving process does at start-up)."""
    from ..control.pricing import Pricing

    Pricing.warm()


def pytest_configure(config: pytest.Config) -> None:
    """Run ``async def`` tests and fixtures with pytest-asyncio, on a loop per test.

    A project that set ``asyncio_mode`` (``--asyncio-mode``, ``-o`` or its configuration file)
    or ``asyncio_default_fixture_loop_scope`` keeps its choice; otherwise the kit picks ``auto``
    and ``function``, so that a plugin needs no pytest set-up of its own.
    """
    if not config.pluginmanager.hasplugin("asyncio"):
        return  # pytest-asyncio is not installed: pytest_runtest_setup says what to do
    if config.getoption("asyncio_mode", None) is None and not _configured(config, "asyncio_mode"):
        config.option.asyncio_mode = "auto"
    if not _configured(config, "asyncio_default_fixture_loop_scope"):
        # No public setter for an ini value: getini answers from this cache first.
        config._inicache["asyncio_default_fixture_loop_scope"] = "function"


# The fixtures that mark a test as one of the kit's (aiohttp_server under every kit proxy).
_KIT_FIXTURES = frozenset({"aioproxy_server", "aiohttp_server", "aiohttp_client"})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a kit test that nothing will run as a coroutine with the fix, not pytest's riddle."""
    function = getattr(item, "obj", None)
    if not inspect.iscoroutinefunction(function):
        return
    fixtures = set(getattr(item, "fixturenames", ()))
    if not fixtures & _KIT_FIXTURES:
        return  # another project's async test, perhaps run by anyio or trio: not the kit's
    try:
        from pytest_asyncio import is_async_test
    except ImportError:
        pytest.fail(f"{item.nodeid}: pytest-asyncio is not installed: {INSTALL}", pytrace=False)
    if not is_async_test(item):
        pytest.fail(
            f"{item.nodeid} is async but pytest-asyncio does not run it: asyncio_mode is "
            "'strict' here. aioproxy.testing picks 'auto' unless a project sets it; remove "
            'asyncio_mode from your pytest configuration (or set it to "auto"), or mark the '
            "test @pytest.mark.asyncio and its async fixtures @pytest_asyncio.fixture.",
            pytrace=False,
        )
