# Two commands do all the set-up: `make run` and `make test` (both create .venv when missing).
# Both install exactly the lock (requirements.txt / requirements-dev.txt); the ranges a person edits
# live in requirements.in / requirements-dev.in, and `make lock` turns them into the lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
LATEST_VENV := .venv-latest
ARGS ?=
PYTEST_ARGS ?=
# One lock serves Linux, macOS and Windows, Python 3.11 and 3.12, with and without a GPU.
LOCK := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --no-emit-index-url

.PHONY: run test test-latest lock upgrade-lock bench soak screenshot clean

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

# The suite against the newest releases the .in ranges allow, in a venv of its own: drift shows here
# before a user who installs without the lock (or a Space rebuilt tomorrow) meets it.
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --upgrade --upgrade-strategy eager -r requirements-dev.in
	$(LATEST_VENV)/bin/python -m pip list --format=freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Pins for what the .in files gained or lost, keeping every other pin where it is.
lock: $(DEV_STAMP)
	$(LOCK) requirements.in -o requirements.txt
	$(LOCK) requirements-dev.in --constraint requirements.txt -o requirements-dev.txt

# Every pin moved to the newest release the ranges allow; run the suite before committing it.
upgrade-lock: $(DEV_STAMP)
	$(LOCK) --upgrade requirements.in -o requirements.txt
	$(LOCK) --upgrade requirements-dev.in --constraint requirements.txt -o requirements-dev.txt

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/engine_overhead.py
	$(BIN)/python benchmarks/concurrency.py $(ARGS)

soak: $(DEV_STAMP)
	$(BIN)/python benchmarks/soak.py $(ARGS)

screenshot: $(DEV_STAMP)
	$(BIN)/python benchmarks/screenshot.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) .pytest_cache
