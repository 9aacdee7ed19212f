"""Redis's own time per call of the limits' counters script, as the aioproxy-redis target's
batches make it: one settle and four reservations of the bench caller's key (rpm, tpm and a
budget, no team), on windows holding a minute of one-second buckets.

Redis runs scripts on one thread that shares the bench machine's cores with the proxy: what a
call costs it comes out of the proxy's throughput. Measured by Redis itself (INFO
commandstats: ``usec_per_call`` of EVALSHA), over many calls a round, the median of the rounds.

    .venv/bin/python bench/redis_cost.py [--calls 20000] [--rounds 5] [--url redis://...]

Without ``--url`` it starts a redis-server of its own on a free port (Debian's package).
``--at REV`` measures the script as another commit has it (its text read from git: the
calls' words have been the same since REQUEST_ONLY, f3efa83).
"""

from __future__ import annotations

import argparse
import ast
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from harness.redis_server import RedisProcess

from aioproxy.state.counters import _APPLY, _pack, _unpack

PREFIX = "bench-cost"
ME = "instance-bench"
LEASE_MS = 15_000
BASE = f"{PREFIX}:k:key_bench"
PERIOD = "1800000000.0"
TOKENS, HELD = 60, 2_000  # a request's reserved tokens and nano-USD
# The caller's limits (bench/harness/keys.py): rpm, tpm, max_parallel (none), max_budget.
LIMITS = (10**9, 10**12, -1, 10**6)
BATCH = 100  # calls a pipeline


class Server:
    """A redis-server of this run's own, under callgrind (counting inside EVALSHA only) if
    ``counted``."""

    def __init__(self, counted: bool) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="aioproxy-redis-cost-"))
        self.counts = self.folder / "callgrind.out"
        wrapper = (
            "valgrind", "--tool=callgrind", "--toggle-collect=evalShaCommand",
            f"--callgrind-out-file={self.counts}",
        )  # fmt: skip
        self.redis = RedisProcess(self.folder, wrapper if counted else ())
        self.url = self.redis.url

    def instructions(self) -> int:
        """Stop it (callgrind writes its counts) and read them: EVALSHA's instructions."""
        self.redis.stop()
        for line in self.counts.read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
        raise RuntimeError("callgrind wrote no totals")

    def close(self) -> None:
        if self.redis.proc.poll() is None:
            self.redis.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def redis_server(counted: bool = False) -> Iterator[Server]:
    server = Server(counted)
    try:
        yield server
    finally:
        server.close()


def seed(client: redis.Redis, seconds_counted: int) -> None:
    """The caller's scope as a steady load leaves it: a request and token count in each of the
    last ``seconds_counted`` seconds, requests in flight and their reserved cost, a spend."""
    client.flushdb()
    now = int(client.time()[0])
    seconds = range(now + 1 - seconds_counted, now + 1)
    client.hset(f"{BASE}:r", mapping={str(s): 40 for s in seconds})
    client.hset(f"{BASE}:t", mapping={str(s): 40 * TOKENS for s in seconds})
    client.hset(f"{BASE}:flights", ME, 16)
    client.hset(f"{BASE}:held", ME, 16 * HELD)
    client.set(f"{BASE}:s:{PERIOD}", "12.5")


def call_arguments(number: int) -> tuple[object, ...]:
    """One batch: the settle of four requests, merged, then four reservations."""
    settle = [BASE, -40, 4, 4 * 0.0002, PERIOD, 3600, 4 * HELD]
    reservation = [TOKENS, HELD, 1, BASE, *LIMITS, 0.0, PERIOD]
    return (_pack([[], *settle]), _pack([number, *reservation * 4]), ME, f"{PREFIX}:", LEASE_MS)


def cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def one_round(client: redis.Redis, sha: str, first: int, calls: int) -> tuple[float, float]:
    """EVALSHA's µs per call over ``calls`` calls numbered from ``first``, and Redis's CPU
    time per call (the calls' reading and answering included: a busy machine moves it less
    than the first, a wall-clock time)."""
    client.config_resetstat()
    cpu = cpu_seconds(client)
    for start in range(first, first + calls, BATCH):
        pipe = client.pipeline(transaction=False)
        for number in range(start, min(start + BATCH, first + calls)):
            pipe.evalsha(sha, 0, *call_arguments(number))
        for replies in pipe.execute():
            assert all(reply[0] == 1 for reply in _unpack(replies)), "a reservation refused"
    cpu = cpu_seconds(client) - cpu
    stats = client.info("commandstats")["cmdstat_evalsha"]
    assert stats["calls"] == calls, stats
    return float(stats["usec_per_call"]), cpu * 1e6 / calls


def script_at(revision: str | None) -> str:
    """The counters script at ``revision`` (its module's string assignments, in order)."""
    if revision is None:
        return _APPLY
    source = subprocess.run(
        ["git", "show", f"{revision}:aioproxy/state/counters.py"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout
    names: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id.startswith("_") and target.id.isupper():
                try:
                    names[target.id] = eval(
                        compile(ast.Expression(node.value), "", "eval"), {}, names
                    )
                except NameError:  # not made of strings
                    continue
    return names["_APPLY"]


def measure(
    url: str, calls: int, rounds: int, seconds_counted: int, script: str
) -> list[tuple[float, float]]:
    client = redis.Redis.from_url(url)
    try:
        seed(client, seconds_counted)
        sha = client.script_load(script)
        one_round(client, sha, 1, calls)  # warm-up
        return [one_round(client, sha, (r + 2) * calls, calls) for r in range(rounds)]
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=60, help="buckets in each window")
    parser.add_argument("--url", help="a Redis to use (flushed!); default: one started here")
    parser.add_argument("--at", metavar="REV", help="the script as commit REV has it")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count Redis's instructions per call under callgrind instead (a busy machine does "
        "not move them; slow: use --calls 2000 --rounds 1)",
    )
    args = parser.parse_args()
    script = script_at(args.at)
    if args.instructions:
        with redis_server(counted=True) as server:
            measure(server.url, args.calls, args.rounds, args.seconds, script)
            calls = args.calls * (args.rounds + 1)  # the warm-up's too
            print(f"EVALSHA instructions/call: {server.instructions() / calls:,.0f}")
        return
    if args.url:
        rounds = measure(args.url, args.calls, args.rounds, args.seconds, script)
    else:
        with redis_server() as server:
            rounds = measure(server.url, args.calls, args.rounds, args.seconds, script)
    for name, figures in (
        ("EVALSHA µs/call", [r[0] for r in rounds]),
        ("CPU µs/call", [r[1] for r in rounds]),
    ):
        listed = ", ".join(f"{f:.1f}" for f in figures)
        print(f"{name}: median {statistics.median(figures):.1f} (rounds: {listed})")


if __name__ == "__main__":
    main()
