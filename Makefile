# The two entry points of the README: each sets everything up from nothing, then does its job.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so the project's torch range adds nothing heavy.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: install serve test lint
install: $(VENV)/.installed

# The built-in model gets a gallery in runs/gallery, so the page's gallery works out of the box; another
# model starts without one (a gallery is tied to the retrieval model that indexed it).
serve: install
	$(VENV)/bin/blip2-serve $(if $(MODEL),--model $(MODEL),--gallery-dir runs/gallery)

lint: install
	$(VENV)/bin/ruff check training service tests bench recipes
	$(VENV)/bin/ruff format --check training service tests bench recipes

test: lint
	$(VENV)/bin/python -m pytest -q -x tests
