# bayeszoo: every target creates .venv if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
TUTORIALS := $(sort $(wildcard tutorials/[0-9]*.py))
COURSE := build/course

.PHONY: test lint course bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	MPLBACKEND=Agg $(BIN)/python -m pytest -q

course: $(STAMP)
	$(BIN)/python -m bayeszoo.inference.course --out $(COURSE) $(TUTORIALS)

bench: $(STAMP)
	for script in benchmarks/*.py; do MPLBACKEND=Agg $(BIN)/python $$script || exit 1; done

clean:
	rm -rf build .pytest_cache
