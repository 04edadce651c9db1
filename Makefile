# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing (torch/torchvision pinned to the releases this project is tested on).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lightning-norms-installed
PYTEST_ARGS ?=

.PHONY: demo test test-floor lint docs docs-check wheel bench gpu-check venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m recipes.report

test: $(STAMP)
	$(PY) -m ruff check lightning_norms recipes tests bench docs
	$(PY) -m mypy lightning_norms
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# the oldest torch / torchvision / Lightning pair pyproject.toml claims, in .venv-floor (from the
# package index; about 3 GB of wheels): the unit and callback suites, not the slow integration ones
FLOOR_VENV ?= .venv-floor
FLOOR_PINS ?= torch==2.4.1 torchvision==0.19.1 lightning==2.6.1
test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q $(FLOOR_PINS) -e ".[dev]"
	$(FLOOR_VENV)/bin/python -c "import torch, lightning; print('floor:', torch.__version__, lightning.__version__)"
	$(FLOOR_VENV)/bin/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS) tests/test_*.py tests/callbacks tests/data

lint: $(STAMP)
	$(PY) -m ruff check lightning_norms recipes tests bench docs
	$(PY) -m mypy lightning_norms

# the docs site: guides, studies, API reference from the docstrings (mkdocs-material +
# mkdocstrings, math by a vendored KaTeX), warning-free or failing; written to build/site
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# the built site in headless Chromium (Debian's `chromium`): math rendered, pages not blank;
# screenshots under build/screens (not part of `make test`)
docs-check: docs
	$(PY) docs/check_pages.py

# the wheel and sdist, under dist/ (no build isolation: setuptools comes with the dev extra)
wheel: $(STAMP)
	$(PY) -m build --no-isolation --outdir dist .

bench: $(STAMP)
	$(PY) bench/bench_layers.py

# the prepared accelerator check (CUDA when available; prints one summary, exit 1 on a failure)
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) runs lightning_logs build dist
