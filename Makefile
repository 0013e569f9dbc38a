# Two commands for a fresh machine:  make run  |  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  ?= torch==2.13.0

.PHONY: venv run test lint format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, so no range below can pull a multi-GB CUDA build.
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(PY) scripts/quickstart.py

test: venv
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts
	$(VENV)/bin/ruff format src tests benchmarks scripts

bench: venv
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/attention_peers.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
