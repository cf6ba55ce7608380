# `make test` and `make demo` work on a fresh machine: they create .venv, install, then run.
# TORCH pins a CPU build for laptops and CI. GPU users: `make test TORCH=torch` (or any CUDA wheel).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: setup test demo clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tokenizer.py

clean:
	rm -rf $(VENV) out .pytest_cache
