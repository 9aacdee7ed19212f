"""Starting, pinning, probing and measuring the processes under test (Linux /proc only)."""

from __future__ import annotations

import http.client
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Cores(NamedTuple):
    """Where wrk runs and where the target under test runs; None: not pinned."""

    load: int | None
    sut: int | None


def cpu_layout() -> Cores:
    """wrk on the first core we may use, the target on the second; no pinning on one core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or shutil.which("taskset") is None:
        return Cores(None, None)
    return Cores(cores[0], cores[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A server we started: its own session, so stopping it takes its children too."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    started: float  # perf_counter() just before spawning
    ready_ms: float | None = None
    first_ok_ms: float | None = None
    rss_idle_kib: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            code = self.popen.returncode
            raise RuntimeError(f"{self.name} exited with {code}; log {self.log}:\n{tail(self.log)}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def spawn(
    name: str,
    argv: list[str],
    log: Path,
    core: int | None,
    cwd: Path,
    env: dict[str, str] | None = None,
) -> Proc:
    """Start a server in its own session; ``env`` replaces the environment when given."""
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]  # taskset execs: the pid stays the server's
    out = log.open("wb")
    started = time.perf_counter()
    popen = subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    out.close()
    return Proc(name, popen, log, started)


def wait_until(proc: Proc, probe: Callable[[], tuple[int, bytes]], timeout: float = 30.0) -> float:
    """Poll ``probe`` until it answers 200; the milliseconds since the process was spawned.

    Refused connections are retried until ``timeout``; a server that answers, but not 200,
    gets 3 more seconds (a misconfiguration does not heal, and CI should not wait 30 s).
    """
    deadline = time.perf_counter() + timeout
    status, body = 0, b""
    while time.perf_counter() < deadline:
        proc.check_alive()
        try:
            status, body = probe()
        except (OSError, http.client.HTTPException):
            status = 0  # not listening yet
        if status == 200:
            return (time.perf_counter() - proc.started) * 1000
        if status:
            deadline = min(deadline, time.perf_counter() + 3)
        time.sleep(0.005)
    seen = f"last answer {status}: {body[:300]!r}" if status else "no answer"
    raise RuntimeError(f"{proc.name} not ready ({seen}); log {proc.log}:\n{tail(proc.log)}")


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    """One plain HTTP/1.1 request: (status, content-type, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


# --- /proc readers: summed over the process and its descendants (workers, helpers) ---


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # comm may hold spaces; fields from `state` on


def tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (OSError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_seconds_each(pid: int) -> dict[int, float]:
    """utime+stime of each process in the tree (e.g. the workers of `run.py --workers N`)."""
    each = {}
    for p in tree(pid):
        try:
            fields = _stat_fields(p)
        except OSError:
            continue  # exited meanwhile
        each[p] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return each


def cpu_seconds(pid: int) -> float:
    """utime+stime of the whole tree; /proc/PID/stat already sums a process's threads."""
    return sum(cpu_seconds_each(pid).values())


def wait_idle(pid: int, timeout: float = 30.0, quiet: float = 0.25) -> float:
    """Wait until the tree uses no CPU for ``quiet`` seconds (a gateway may go on working on
    requests whose client is gone); the seconds waited.  Gives up after ``timeout``."""
    start = time.perf_counter()
    last = cpu_seconds(pid)
    while time.perf_counter() - start < timeout:
        time.sleep(quiet)
        now = cpu_seconds(pid)
        if now - last <= 1 / CLK_TCK:  # one tick of noise is idle
            break
        last = now
    return time.perf_counter() - start


def system_busy_seconds() -> float:
    """CPU time all cores spent busy so far (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU of our waited-for children (wrk), to tell the benchmark's load from anyone else's."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def memory_kib(pid: int, key: str = "VmRSS") -> int:
    """VmRSS (or VmHWM, the peak) of the tree, in KiB."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def pin(pid: int, core: int | None) -> None:
    """Move a running tree to one core (used to give nginx core 1 for the direct runs)."""
    if core is not None:
        for p in tree(pid):
            os.sched_setaffinity(p, {core})


@contextmanager
def pinned_here(core: int | None) -> Iterator[None]:
    """Run the calling thread on one core meanwhile (the first-event client, on the load core)."""
    if core is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def unpin(pid: int) -> None:
    """Let a running tree use every core we may use (the --workers comparison)."""
    cores = os.sched_getaffinity(0)
    for p in tree(pid):
        os.sched_setaffinity(p, cores)


def listeners(port: int) -> int:
    """Sockets listening on ``port`` (one per worker under SO_REUSEPORT), from /proc/net/tcp*."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port  # 0A: LISTEN
    return count
