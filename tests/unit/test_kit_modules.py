"""``aioproxy.testing.import_path``: a test's helper module imported by its file, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from aioproxy.testing import import_path


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
