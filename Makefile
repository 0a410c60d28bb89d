# Two commands do all the set-up: `make run` and `make test` (both create .venv when missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test bench soak screenshot clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(BIN)/python -m pip install -r requirements-dev.txt
	touch $(DEV_STAMP)

run: $(STAMP)
	$(BIN)/python app.py $(ARGS)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/engine_overhead.py
	$(BIN)/python benchmarks/concurrency.py $(ARGS)

soak: $(DEV_STAMP)
	$(BIN)/python benchmarks/soak.py $(ARGS)

screenshot: $(DEV_STAMP)
	$(BIN)/python benchmarks/screenshot.py

clean:
	rm -rf $(VENV) .pytest_cache
