# The README's entry points: each sets up what it needs from nothing, then does its job.
# Two environments in one venv, each with its stamp: `make serve` installs the core and the `serve` extra
# only; `make test` (and `make install`) add the `test` extra (training, the suite's tools, the browser test).
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
SERVE_ENV := $(VENV)/.serve-installed
TEST_ENV := $(VENV)/.test-installed

$(SERVE_ENV): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so the project's torch range adds nothing heavy.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[serve]"
	touch $@

$(TEST_ENV): $(SERVE_ENV)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: install serve test lint
install: $(TEST_ENV)

# The built-in model gets a gallery in runs/gallery, so the page's gallery works out of the box; another
# model starts without one (a gallery is tied to the retrieval model that indexed it).
serve: $(SERVE_ENV)
	$(VENV)/bin/blip2-serve $(if $(MODEL),--model $(MODEL),--gallery-dir runs/gallery)

lint: $(TEST_ENV)
	$(VENV)/bin/ruff check blip2 training service tests bench recipes
	$(VENV)/bin/ruff format --check blip2 training service tests bench recipes

test: lint
	$(VENV)/bin/python -m pytest -q -x tests
