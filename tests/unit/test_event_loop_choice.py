"""run.py's event loop: uvloop when installed (``auto``), and only then aiohttp's large answers
written as two buffers (aiohttp's process-wide setting, left alone for the standard loop)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import uvloop
from aiohttp import http_writer

from aioproxy.cli import new_event_loop


@pytest.fixture
def skip_writelines() -> Iterator[None]:
    before = http_writer.SKIP_WRITELINES
    http_writer.SKIP_WRITELINES = True  # aiohttp's own choice before Python 3.12.9
    yield
    http_writer.SKIP_WRITELINES = before


def test_the_standard_loop_keeps_aiohttps_writes(skip_writelines: None) -> None:
    loop = new_event_loop("asyncio")
    loop.close()
    assert http_writer.SKIP_WRITELINES is True


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="aiohttp's choice stands from 3.12")
def test_uvloop_takes_large_answers_as_two_buffers(skip_writelines: None) -> None:
    loop = new_event_loop("auto")
    loop.close()
    assert isinstance(loop, uvloop.Loop)
    assert http_writer.SKIP_WRITELINES is False
