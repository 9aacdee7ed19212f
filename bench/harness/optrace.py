"""Run a server script with a bytecode counter in it: SIGUSR1 starts counting (from zero),
SIGUSR2 stops and writes what was counted to $OPTRACE_OUT (JSON: per function, the Python
bytecodes it executed; per C function, its calls). Used by ``bench/opcount.py``.

    python bench/harness/optrace.py run.py --config ...
"""

from __future__ import annotations

import collections
import json
import os
import re
import runpy
import signal
import sys
from types import CodeType, FrameType
from typing import Any

_OPS: collections.Counter[CodeType] = collections.Counter()
_C_CALLS: collections.Counter[str] = collections.Counter()
_CHECKOUT = re.compile(r"^.*?/(aioproxy|bench|tests|plugins)/|^.*?site-packages/")


def _count(frame: FrameType, event: str, _arg: Any) -> Any:
    if event == "opcode":
        _OPS[frame.f_code] += 1
    return _count


def _enter(frame: FrameType, _event: str, _arg: Any) -> Any:
    frame.f_trace_opcodes = True
    return _count


def _c_calls(_frame: FrameType, event: str, arg: Any) -> None:
    if event == "c_call":
        _C_CALLS[getattr(arg, "__qualname__", str(arg))] += 1


def _start(*_: object) -> None:
    _OPS.clear()
    _C_CALLS.clear()
    frame: FrameType | None = sys._getframe()
    while frame is not None:  # the frames running now count too, from here on
        frame.f_trace = _count
        frame.f_trace_opcodes = True
        frame = frame.f_back
    sys.settrace(_enter)
    sys.setprofile(_c_calls)


def _name(code: CodeType) -> str:
    """A function's name across checkouts: its path from the package (no worktree, no venv)."""
    path = _CHECKOUT.sub(lambda m: f"{m.group(1)}/" if m.group(1) else "", code.co_filename)
    return f"{path}:{code.co_qualname}"


def _stop(*_: object) -> None:
    sys.settrace(None)
    sys.setprofile(None)
    ops: collections.Counter[str] = collections.Counter()
    for code, count in _OPS.items():
        ops[_name(code)] += count
    with open(os.environ["OPTRACE_OUT"], "w") as out:
        json.dump({"ops": ops, "c": _C_CALLS}, out)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
