# ONFH-FL: two commands do everything on a fresh machine.
#   make demo   -> venv + install + phantoms + four-center Flower simulation + report + inference on real MRI
#   make test   -> venv + install + lint + full test suite (what .ci/run calls)
#   make lint   -> import rules (lint-imports), ruff lint + format check, mypy; `make test` runs it first
PYTHON  ?= python3
VENV    ?= .venv
OUT     ?= runs/demo
PROFILE ?= paper
STRATEGY ?= fedavg
BIN      = $(VENV)/bin

.PHONY: install demo lint test test-fast clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/onfh sim demo --out $(OUT) --profile $(PROFILE) --strategy $(STRATEGY)

lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
