# Two set-up commands: `make serve` and `make test`. Both create .venv if missing and install
# torch first (CPU build by default; override TORCH_SPEC for other platforms, e.g.
# `make test TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"`), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.bitplan-installed

.PHONY: install serve test lint demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev,highs]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/bitplan serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/bitplan demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
