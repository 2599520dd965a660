# `make run` starts Drawbridge on its embedded default; `make test` runs the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint openapi clean

run: $(STAMP)
	$(BIN)/drawbridge db upgrade
	DRAWBRIDGE_LOG_FORMAT=text $(BIN)/drawbridge serve --with-worker --simulate

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict app

openapi: $(STAMP)
	$(BIN)/drawbridge openapi --output openapi.yaml

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) drawbridge.db drawbridge.db-shm drawbridge.db-wal
