# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv when missing and install what they need, so they work on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so that a fresh machine takes the CPU build instead of resolving a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project's requirements change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m napari_dense.cli demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check napari_dense tests benchmarks
	$(BIN)/ruff format --check napari_dense tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/bench_modes.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
