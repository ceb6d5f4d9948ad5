# Entry points, each doing all set-up on a fresh machine:
#   make bench      the main job: the benchmark (CPU by default; ARGS="..." adds flags)
#   make test       the test suite on torch 2.14.1 (what .ci/run calls)
#   make test-min   the test suite on torch 2.11.0, the oldest release pyproject.toml accepts
#   make test-min-core  its `core` tests (folds and numerics, tests/conftest.py); .ci/run runs it
#   make gpu-check  on a GPU machine: cuda tests and the GPU benchmark, results in $OUT
#                   (else gpu-check-out/); ARGS=--dry-run runs it on CPU at tiny sizes
#   make gpu-twin   the dry run on a twin of the GPU machine's interpreter (torch 2.11, no
#                   expecttest, this project not installed); .ci/run runs it after the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MIN_VENV ?= .venv-min
MIN_STAMP := $(MIN_VENV)/.installed
TWIN_VENV ?= .venv-twin
TWIN_STAMP := $(TWIN_VENV)/.installed
# gpu-check installs nothing (the GPU machine has no network): it runs on an interpreter
# that already holds torch, this checkout's venv if there is one, else $(PYTHON).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

.PHONY: bench test test-min test-min-core gpu-check gpu-twin install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

# .venv-min starts as a hard-linked copy of .venv-twin, whose torch 2.11 it shares: CI
# holds three venvs, and on a small disk a second 5 GB copy of torch is what runs out
# (CI failed with ENOSPC there). pip only ever replaces files, never writes into them,
# so what it installs here leaves the twin as it was.
$(MIN_STAMP): pyproject.toml constraints-min.txt $(TWIN_STAMP)
	rm -rf $(MIN_VENV)
	cp -al $(TWIN_VENV) $(MIN_VENV) || { rm -rf $(MIN_VENV); cp -a $(TWIN_VENV) $(MIN_VENV); }
	rm -f $(MIN_STAMP)
	grep -rlI -e '$(abspath $(TWIN_VENV))' $(MIN_VENV)/bin $(MIN_VENV)/pyvenv.cfg \
	  | xargs -r sed -i 's|$(abspath $(TWIN_VENV))|$(abspath $(MIN_VENV))|g'
	$(MIN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-min.txt -e '.[test,bench]'
	touch $(MIN_STAMP)

# Installs packages only, never this project: the checkout reaches Python through PYTHONPATH.
$(TWIN_STAMP): constraints-twin.txt
	$(PYTHON) -m venv $(TWIN_VENV)
	$(TWIN_VENV)/bin/pip install --quiet --disable-pip-version-check -r constraints-twin.txt
	touch $(TWIN_STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/python -m compile_affine.bench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -q $(ARGS)

test-min-core: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -q -m core $(ARGS)

gpu-check:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) -m compile_affine.bench gpu-check $(ARGS)

gpu-twin: $(TWIN_STAMP)
	$(MAKE) gpu-check GPU_PYTHON=$(TWIN_VENV)/bin/python ARGS="--dry-run $(ARGS)"

clean:
	rm -rf $(VENV) $(MIN_VENV) $(TWIN_VENV) .pytest_cache .hypothesis gpu-check-out
