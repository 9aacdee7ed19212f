"""The test kit's helpers for a plugin's own tests: ``import_path`` (a helper module imported
by its file, once) and ``PNG_PIXEL``."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import pytest

from aioproxy.testing import PNG_PIXEL, import_path


def test_imports_the_file_once_and_shares_the_module(tmp_path: Path) -> None:
    fake = tmp_path / "fake_upstream.py"
    runs = tmp_path / "runs.log"
    fake.write_text(
        f"with open({str(runs)!r}, 'a') as log:\n    log.write('ran ')\nclass Fake: ...\n"
    )
    first = import_path(fake)
    again = import_path(str(tmp_path / "." / "fake_upstream.py"))
    assert again is first and runs.read_text() == "ran "
    assert isinstance(again.Fake(), first.Fake)  # one class for every test file that imports it


def test_a_module_that_fails_is_not_kept(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('not yet')\n")
    with pytest.raises(RuntimeError, match="not yet"):
        import_path(broken)
    broken.write_text("READY = True\n")
    assert import_path(broken).READY is True


def test_a_file_that_is_not_python_is_an_import_error(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="not a Python file"):
        import_path(tmp_path / "data.json")


def test_png_pixel_is_a_one_by_one_png() -> None:
    data = base64.b64decode(PNG_PIXEL, validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1, 1)  # width and height
