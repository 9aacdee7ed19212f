"""A real redis-server for the tests: one per session on a free port, which a test may kill
and start again (Debian's package: `make test` installs it when missing)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

__all__ = ["RedisServer", "redis_server", "tls_redis_server"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, binary: str, folder: Path, tls: bool = False) -> None:
        self.binary = binary
        self.folder = folder
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        # TLS only (rediss://): a self-signed certificate for 127.0.0.1, its own CA.
        self.cert = folder / "cert.pem" if tls else None

    @property
    def url(self) -> str:
        if self.cert is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _listen(self) -> list[str]:
        if self.cert is None:
            return ["--port", str(self.port)]
        key = self.folder / "key.pem"
        if not self.cert.exists():
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", str(key), "-out", str(self.cert), "-subj", "/CN=127.0.0.1",
                 "-addext", "subjectAltName=IP:127.0.0.1"],
                check=True, capture_output=True,
            )  # fmt: skip
        return [
            "--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no",
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(self.cert),
        ]  # fmt: skip

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                *self._listen(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            for _ in range(500):  # safety net only: it answers within milliseconds
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.01)
            raise RuntimeError("redis-server did not start")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the data goes with it, as when a Redis without persistence dies."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def flush(self) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            client.flushall()
        finally:
            client.close()


def _serve(tls: bool) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: `make test` installs it (Debian's redis-server)"
        )
    folder = Path(tempfile.mkdtemp(prefix="aioproxy-redis-"))
    server = RedisServer(binary, folder, tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from _serve(tls=False)


@pytest.fixture(scope="session")
def tls_redis_server() -> Iterator[RedisServer]:
    """Another redis-server, reached over TLS only (``rediss://``)."""
    yield from _serve(tls=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A running, empty Redis (started again if a test killed it)."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    yield redis_server.url
    if redis_server.process is None:
        redis_server.start()
