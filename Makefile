# Two commands for a fresh machine:  make run  |  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The tested torch, from PyTorch's CPU index: PyPI's default build on Linux is the CUDA one (several GB).
# On a CUDA machine: make run TORCH_INDEX=https://pypi.org/simple (or a https://download.pytorch.org/whl/cuXXX index).
TORCH       ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv run test lint format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from TORCH_INDEX (its dependencies from the usual index), so that no range below
	# pulls another build.
	$(PIP) install -q --no-deps $(TORCH) --index-url $(TORCH_INDEX)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The tiny preset on the built-in corpus (3-5 minutes on 2 idle CPU cores, install excluded; docs/quality.md);
# runs/make-run is this demo's own folder, replaced on every `make run`. Your own runs: `reformer train --out DIR ...`.
run: venv
	rm -rf runs/make-run
	$(VENV)/bin/reformer train --preset tiny --out runs/make-run

test: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: venv
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/attention_peers.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
