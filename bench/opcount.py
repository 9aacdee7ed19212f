"""Python bytecodes a request costs, by function: a count no load moves, to find what to cut.

    python bench/opcount.py run TARGET KIND N OUT.json [--connections C] [--config TOML]
    python bench/opcount.py compare A.json B.json [--rows 40]

``run`` starts nginx (the bench's fake upstream) and TARGET (aioproxy, aioproxy-keys,
aioproxy-redis or aioproxy-cache, as ``bench/run.py`` starts them) with a bytecode counter in
it (``harness/optrace.py``), then counts N requests of KIND one after another (each batched
piece of work, such as the request log's or the metrics', then holds one request: its worst
case), or with ``--connections`` a wrk run of N seconds (batches as under load). It writes
bytecodes and C calls per request, per function. ``compare`` prints where B differs from A.
Bytecodes follow callgrind's instructions (about 95 a bytecode on this code: ``--only
instructions``) but say where they go; a tracer slows the server ~20x, so time nothing here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from harness import payloads, servers
from harness.loadgen import run_wrk
from harness.procs import free_port

OPTRACE = Path(__file__).parent / "harness" / "optrace.py"
STARTERS = {
    "aioproxy": servers.start_aioproxy,
    "aioproxy-keys": servers.start_aioproxy_keys,
    "aioproxy-redis": servers.start_aioproxy_redis,
    "aioproxy-cache": servers.start_aioproxy_cache,
}


def _one_by_one(target: servers.Target, kind: payloads.Kind, count: int) -> int:
    path = target.url(kind).split(str(target.port), 1)[1]
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {target.auth}"}
    connection = http.client.HTTPConnection("127.0.0.1", target.port)
    for _ in range(count):
        connection.request("POST", path, kind.body, headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{target.name}: {response.status}")
    return count


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.unlink(missing_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="opcount"))
    upstream = servers.start_upstream("nginx", workdir, free_port(), None)
    os.environ["OPTRACE_OUT"] = str(out)
    wrap = ("sh", "-c", f'exec "$0" {OPTRACE} "$@"')
    target = STARTERS[args.target](
        workdir, free_port(), upstream.port, None, wrap=wrap, extra_config=args.config
    )
    try:
        kind = payloads.KINDS[args.kind]
        run_wrk(target.url(kind), kind.body, target.auth, 4, "2s", None, timeout="30s")
        time.sleep(1.5)  # the warm-up's rows written before counting
        os.kill(target.pid, signal.SIGUSR1)
        time.sleep(0.3)
        if args.connections:
            requests = run_wrk(
                target.url(kind), kind.body, target.auth, args.connections, f"{args.n}s", None,
                timeout="30s",
            ).requests  # fmt: skip
        else:
            requests = _one_by_one(target, kind, args.n)
        time.sleep(1.5)  # the request log's writer writes their rows (once a second)
        os.kill(target.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # written whole
        counted = json.loads(out.read_text())
        counted["requests"] = requests
        out.write_text(json.dumps(counted))
        total = sum(counted["ops"].values()) / requests
        print(f"{args.target} {args.kind}: {total:,.0f} bytecodes a request ({requests} requests)")
    finally:
        target.proc.stop()
        upstream.proc.stop()


def compare(args: argparse.Namespace) -> None:
    a, b = (json.loads(Path(name).read_text()) for name in (args.a, args.b))
    per_a = {name: count / a["requests"] for name, count in a["ops"].items()}
    per_b = {name: count / b["requests"] for name, count in b["ops"].items()}
    total_a, total_b = sum(per_a.values()), sum(per_b.values())
    print(f"bytecodes a request: {total_a:,.0f} -> {total_b:,.0f} ({total_b - total_a:+,.0f})")
    rows = sorted(
        ((per_b.get(n, 0.0) - per_a.get(n, 0.0), n) for n in set(per_a) | set(per_b)),
        key=lambda row: -abs(row[0]),
    )
    for delta, name in rows[: args.rows]:
        print(f"{delta:+9.1f} {per_a.get(name, 0.0):9.1f} {per_b.get(name, 0.0):9.1f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True)
    counting = sub.add_parser("run")
    counting.add_argument("target", choices=sorted(STARTERS))
    counting.add_argument("kind", choices=sorted(payloads.KINDS))
    counting.add_argument("n", type=int, help="requests, or seconds with --connections")
    counting.add_argument("out")
    counting.add_argument("--connections", type=int, default=0)
    counting.add_argument("--config", default="", help="TOML appended to the target's config")
    counting.set_defaults(func=run)
    comparing = sub.add_parser("compare")
    comparing.add_argument("a")
    comparing.add_argument("b")
    comparing.add_argument("--rows", type=int, default=40)
    comparing.set_defaults(func=compare)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
