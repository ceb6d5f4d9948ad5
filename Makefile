# Two entry points, each doing all set-up on a fresh machine:
#   make bench   the main job: the benchmark (CPU by default; ARGS="..." adds flags)
#   make test    the test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: bench test install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/python -m compile_affine.bench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
