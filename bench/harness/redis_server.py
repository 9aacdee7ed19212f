"""The aioproxy-redis and aioproxy-cache targets' Redis: one redis-server for the bench run."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RedisProcess"]


class RedisProcess:
    """redis-server on a free port, without persistence, stopped with the run; run under
    ``wrapper`` if given (e.g. valgrind: ``bench/redis_cost.py``)."""

    def __init__(self, workdir: Path, wrapper: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench: redis-server is missing (Debian's redis-server package)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.proc = subprocess.Popen(
            [*wrapper, binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(3000 if wrapper else 500):  # under valgrind it takes seconds
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.1).close()
                return
            except OSError:
                time.sleep(0.01)
        raise SystemExit("bench: redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
