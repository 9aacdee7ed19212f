"""LiteLLM's proxy as a peer target: its own venv, a generated config, started pinned like the
others.  Used by ``bench/run.py --peers``; the smoke run never touches it.

The install is pinned and checked, because litellm's PyPI releases were hijacked twice
(1.82.7/1.82.8 in March 2026, 1.107.0 later; both withdrawn) with credential stealers that run
from a ``.pth`` file at interpreter start-up:

- litellm, litellm-proxy-extras and litellm-enterprise are downloaded as wheels and must match
  the sha256 sums recorded below, and contain no ``.pth`` file, before anything is installed;
- every other package is held to ``litellm-constraints.txt`` (binary wheels only);
- after the install, any ``.pth`` file but setuptools' own is refused, before the venv's Python
  runs again;
- LiteLLM runs with a minimal environment (no inherited variables, HOME in the run's temp dir),
  with its cost-map fetch, telemetry, schema updates and other start-up downloads switched off.

1.108.7 is the newest release whose ``[proxy]`` extra installs from the registry reachable here:
later ones pin litellm-enterprise / litellm-proxy-extras builds (and, from 1.110, a
``litellm-proxy`` package) that it does not serve.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from harness import payloads
from harness.procs import spawn
from harness.servers import BENCH, Target, serving, wait_ready

VERSION = "1.108.7"
VENV = BENCH / ".peers" / "litellm-venv"
WHEELS = BENCH / ".peers" / "wheels"
CONSTRAINTS = Path(__file__).resolve().parent / "litellm-constraints.txt"
STAMP = VENV / ".bench-installed"
# The wheels that were inspected (top-level packages only, no .pth file), by file name.
PINNED = {
    "litellm": "1.108.7",
    "litellm-proxy-extras": "0.4.110",
    "litellm-enterprise": "0.1.79.post1",
}
SHA256 = {
    "litellm-1.108.7-cp310-abi3-manylinux_2_28_x86_64.whl": (
        "0c8a062e285b793b110a44bae485a2beb83c21381a9e4c62001547f296b0e5af"
    ),
    "litellm_proxy_extras-0.4.110-py3-none-any.whl": (
        "2a488653b7e5eb97e7a2c84fb67818dfbdbd1d799cd61832f1b5d151c229e907"
    ),
    "litellm_enterprise-0.1.79.post1-py3-none-any.whl": (
        "b6c922298628b7a8bfd459df51d7e0c4e9346ca1dce0fb30be21d572333733e2"
    ),
}
ALLOWED_PTH = {"distutils-precedence.pth"}  # setuptools' own, in every venv
START_TIMEOUT = 120.0  # it imports a lot: ~10 s on an idle 2-core VM, more when it is busy

# Everything LiteLLM fetches by itself at start-up or on a timer, off; no .env file read.
ENV = {
    "LITELLM_MODE": "PRODUCTION",  # DEV (the default) loads a .env found above site-packages
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_OFFLINE_MODE": "true",  # the one switch for all of the above, in newer releases
    "LITELLM_TELEMETRY_DISABLED": "true",
    "DISABLE_SCHEMA_UPDATE": "true",
    "HF_HUB_OFFLINE": "1",
    "LANG": "C.UTF-8",
}


class PeerError(RuntimeError):
    """The peer cannot be installed or run; the message says why."""


# --- install ---


def _site_packages() -> list[Path]:
    return sorted(VENV.glob("lib/python3*/site-packages"))


def installed_version() -> str | None:
    """The litellm version in the venv, read from its dist-info name (runs no code)."""
    for site in _site_packages():
        for info in site.glob("litellm-*.dist-info"):
            return info.name.removeprefix("litellm-").removesuffix(".dist-info")
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip(*args: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    argv = [str(VENV / "bin" / "python"), "-m", "pip", *args]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PeerError(f"pip {args[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def _checked_wheels() -> list[Path]:
    WHEELS.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}=={version}" for name, version in PINNED.items()]
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(WHEELS), *specs)
    wheels = []
    for name, version in PINNED.items():
        stem = f"{name.replace('-', '_')}-{version}-"
        found = sorted(p for p in WHEELS.glob("*.whl") if p.name.startswith(stem))
        known = [p for p in found if p.name in SHA256]
        if not known:
            raise PeerError(
                f"no wheel of {name} {version} with a recorded sha256 (got {[p.name for p in found]}):"
                f" inspect it (no .pth file, only its own packages) and add its sum to {__file__}"
            )
        wheel = known[0]
        if _sha256(wheel) != SHA256[wheel.name]:
            wheel.unlink()
            raise PeerError(f"{wheel.name}: sha256 differs from the recorded one; not installing")
        with zipfile.ZipFile(wheel) as z:
            pth = [n for n in z.namelist() if n.endswith(".pth")]
        if pth:
            raise PeerError(f"{wheel.name} ships {pth}: not installing")
        wheels.append(wheel)
    return wheels


def ensure_installed() -> str:
    """Create or reuse bench/.peers/litellm-venv with the pinned LiteLLM; returns its version."""
    if STAMP.exists() and STAMP.read_text().strip() == VERSION and installed_version() == VERSION:
        return VERSION
    print(f"bench: installing LiteLLM {VERSION} into {VENV} (a minute or two)", flush=True)
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    # The base interpreter of the running Python, not the project's venv.
    base = Path(getattr(sys, "_base_executable", sys.executable))
    made = subprocess.run(
        [str(base), "-m", "venv", str(VENV)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        raise PeerError(f"python -m venv failed: {made.stderr}")
    litellm, *others = _checked_wheels()
    _pip(
        "install",
        "-q",
        "--only-binary=:all:",
        "-c",
        str(CONSTRAINTS),
        f"litellm[proxy] @ {litellm.as_uri()}",
        *(str(w) for w in others),
    )
    pth = {p.name for site in _site_packages() for p in site.glob("*.pth")} - ALLOWED_PTH
    if pth:
        shutil.rmtree(VENV, ignore_errors=True)
        raise PeerError(f"the install brought unexpected .pth files {sorted(pth)}: venv removed")
    version = installed_version()
    if version != VERSION:
        raise PeerError(f"installed litellm is {version}, expected {VERSION}")
    STAMP.write_text(VERSION + "\n")
    print(f"bench: LiteLLM {version} installed", flush=True)
    return version


# --- run ---


def config_yaml(upstream_port: int) -> str:
    """model_list like aioproxy's config: each bench model -> the fake upstream; master key on."""
    base = f"http://127.0.0.1:{upstream_port}"
    lines = ["model_list:"]
    for name, path in payloads.API_BASES.items():
        lines += [
            f"  - model_name: {name}",
            "    litellm_params:",
            f"      model: openai/{payloads.UPSTREAM_MODEL}",
            f"      api_base: {base}{path}",
            f"      api_key: {payloads.UPSTREAM_KEY}",
        ]
    lines += [
        "litellm_settings:",
        "  telemetry: false",
        "general_settings:",
        f"  master_key: {payloads.MASTER_KEY}",
    ]
    return "\n".join(lines) + "\n"


def start_litellm(
    workdir: Path, port: int, upstream_port: int, core: int | None, loop: str = "auto"
) -> Target:
    """``litellm --config … --num_workers 1`` (uvicorn with uvloop, as LiteLLM chooses itself;
    ``--loop`` is not passed on).  Ready at ``GET /health/liveliness`` → 200."""
    del loop
    config = workdir / "litellm.yaml"
    config.write_text(config_yaml(upstream_port))
    home = workdir / "litellm-home"
    home.mkdir(exist_ok=True)
    env = {**ENV, "HOME": str(home), "PATH": f"{VENV / 'bin'}:/usr/bin:/bin"}
    argv = [
        str(VENV / "bin" / "litellm"),
        *serving(config, port),
        "--num_workers",
        "1",
    ]
    proc = spawn(f"LiteLLM {VERSION}", argv, workdir / "litellm.log", core, workdir, env=env)
    target = Target("litellm", proc, port, auth=payloads.MASTER_KEY, peer=True)
    wait_ready(target, "/health/liveliness", START_TIMEOUT)
    return target
