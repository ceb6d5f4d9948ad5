# Entry points, each doing all set-up on a fresh machine:
#   make bench      the main job: the benchmark (CPU by default; ARGS="..." adds flags)
#   make test       the test suite on torch 2.14.1 (what .ci/run calls)
#   make test-min   the test suite on torch 2.11.0, the oldest release pyproject.toml accepts
#   make test-min-core  its `core` tests (folds and numerics, tests/conftest.py); .ci/run runs it
#   make gpu-check  on a GPU machine: cuda tests and the GPU benchmark, results in $OUT
#                   (else gpu-check-out/); ARGS=--dry-run runs it on CPU at tiny sizes
#   make test-next-core  the `core` tests on torch 2.15.0, the newest release (what a new
#                   user gets), in .venv-next/; .ci/run runs it, then deletes the venv
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
NEXT_VENV ?= .venv-next
NEXT_STAMP := $(NEXT_VENV)/.installed
# gpu-check installs nothing (the GPU machine has no network): it runs on an interpreter
# that already holds torch, this checkout's venv if there is one, else $(PYTHON).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

.PHONY: bench test test-min test-min-core test-next-core gpu-check gpu-twin install clean

# pip is brought up to date first: from 25.1 on, `pip show` prints the licence expression
# (PEP 639) the wheel carries; the wheel test reads it there.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -U pip
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
	$(MIN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-min.txt -e '.[test,bench]' \
	  'setuptools>=77'
	touch $(MIN_STAMP)

# Installs packages only, never this project: the checkout reaches Python through PYTHONPATH.
$(TWIN_STAMP): constraints-twin.txt
	$(PYTHON) -m venv $(TWIN_VENV)
	$(TWIN_VENV)/bin/pip install --quiet --disable-pip-version-check -r constraints-twin.txt
	touch $(TWIN_STAMP)

# torch 2.15.0 lies above this machine's global pip cap (torch<=2.14.1, /etc/xdg/pip):
# PIP_CONSTRAINT replaces the configured constraint file for this one install, and on a
# machine without the cap it changes nothing. No torchvision or timm: none pairs with 2.15.
# numpy: Triton's interpreter (the GPU twin's tests) needs it, and torch does not bring it.
$(NEXT_STAMP): pyproject.toml constraints-next.txt
	$(PYTHON) -m venv $(NEXT_VENV)
	PIP_CONSTRAINT="$(CURDIR)/constraints-next.txt" $(NEXT_VENV)/bin/pip install --quiet --disable-pip-version-check \
	  -e . 'pytest>=8' 'expecttest>=0.2' 'hypothesis>=6.100' numpy
	touch $(NEXT_STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/python -m compile_affine.bench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -q $(ARGS)

test-min-core: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -q -m core $(ARGS)

test-next-core: $(NEXT_STAMP)
	$(NEXT_VENV)/bin/python -m pytest -q -m core $(ARGS)

gpu-check:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) -m compile_affine.bench gpu-check $(ARGS)

gpu-twin: $(TWIN_STAMP)
	$(MAKE) gpu-check GPU_PYTHON=$(TWIN_VENV)/bin/python ARGS="--dry-run $(ARGS)"

clean:
	rm -rf $(VENV) $(MIN_VENV) $(TWIN_VENV) $(NEXT_VENV) .pytest_cache .hypothesis gpu-check-out
