# Two set-up commands: `make serve` and `make test`. Both create .venv if missing and install
# torch first (CPU build by default; override TORCH_SPEC for other platforms, e.g.
# `make test TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"`), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.bitplan-installed

.PHONY: install serve worker test test-service lint demo docker clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev,hf,highs,redis,postgres,onnx]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/bitplan serve

worker: $(STAMP)
	$(BIN)/bitplan worker

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-service: $(STAMP)
	$(BIN)/python -m pytest -q tests/service

lint: $(STAMP)
	$(BIN)/ruff check .

# Needs a running service: `make serve` in another terminal first.
demo: $(STAMP)
	$(BIN)/bitplan demo

# Needs a Docker engine (none on the machine bitplan was written on: untested).
docker:
	docker build -f docker/Dockerfile -t bitplan .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
