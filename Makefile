# Two commands on a fresh machine: `make run` and `make test`. Everything lives in ./.venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PLUGINS := $(wildcard plugins/aioproxy-*)

.PHONY: install run test check bench bench-smoke bench-peers clean

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=25.1"
	$(PY) -m pip install -q -e ".[uvloop]" $(addprefix -e ,$(PLUGINS)) --group dev
	touch $(STAMP)

run: install
	$(PY) run.py

# PYTHONDONTWRITEBYTECODE unset: pytest caches its rewritten test modules (collection 8-14 s -> 1-2 s).
# xdist spreads the tests over the cores; the wall-clock ones share one worker (xdist_group).
PYTEST_ARGS ?= $(if $(filter 1,$(shell nproc 2>/dev/null || echo 1)),,-n auto --dist loadgroup)

test: install
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q $(PYTEST_ARGS)

# Lint, format and strict types on the package and the plugins (config in pyproject.toml).
check: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: install
	$(PY) bench/run.py

bench-smoke: install
	$(PY) bench/run.py --smoke

# Adds LiteLLM's proxy (installed from PyPI into bench/.peers, outside the project's venv).
bench-peers: install
	$(PY) bench/run.py --peers

clean:
	rm -rf $(VENV) *.egg-info plugins/*/*.egg-info
