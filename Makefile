# Two commands for a newcomer:  make demo  (run the service and show it working)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install constraints browser test-data demo serve lint test test-browser bench gpu-check docs cli-docs clean

# The project with the service and engine (server), the test, docs and lint tools, at the exact
# versions of constraints.txt (torch 2.14.1 and torchvision 0.29.1 among them). --no-compile: Python
# compiles what it imports when it first imports it, instead of pip compiling every file of every
# package (about 35 s of one core here, mostly files no test imports).
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile -c constraints.txt -e ".[server,test,docs,dev]"
	touch $@

install: $(BIN)/.installed

constraints: install   ## rewrite constraints.txt from .venv after a dependency changed in pyproject.toml
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --all --exclude-editable | grep -v -e '^-e ' -e ' @ '; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# The dashboard's browser tests drive Debian's Chromium through Playwright (from the test extra);
# Playwright's own browser downloads are never used.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:               ## Chromium for the browser tests (apt-get install when missing)
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the dashboard's browser tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# Fashion-MNIST, the test suite's second real data set, from Debian's dataset-fashion-mnist package.
FASHION_MNIST := /usr/share/datasets/fashion-mnist

$(FASHION_MNIST)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

test-data: $(FASHION_MNIST)/train-images-idx3-ubyte.gz

demo: install          ## start the embedded service, fine-tune on digits over HTTP, show the result
	$(BIN)/robustify demo

serve: install         ## run the API and one worker on the embedded default (SQLite, no broker server)
	$(BIN)/robustify serve

lint: install          ## ruff (rules in pyproject.toml) and mypy (strict on robustify/ and core/engine/)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The suite runs on PYTEST_WORKERS processes (pytest-xdist), a file's tests on one worker, the long
# end-to-end files first (tests/conftest.py says why). PYTEST_ARGS narrows it (files, -k, -m).
# pytest's exit status 5 means it collected nothing: a failure. --durations: the 40 slowest steps, for CI time.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=
test: install browser test-data lint  ## lint, then the whole suite (unit, PostgreSQL/Redis, end to end, browser)
	@$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=40 $(PYTEST_ARGS) || { rc=$$?; \
	  [ $$rc -ne 5 ] || echo "pytest collected no tests (exit status 5): nothing was tested" >&2; exit $$rc; }

test-browser: install browser  ## only the dashboard's tests in a real browser
	$(BIN)/python -m pytest -q tests/e2e/test_dashboard.py tests/e2e/test_dashboard_sweep.py tests/service/test_dashboard_static.py

bench: install         ## engine throughput against the lean and reference-structure baselines (docs/runtimes.md)
	$(BIN)/python bench/bench_engine.py --out bench/results/$$(hostname).json

gpu-check: install     ## the one GPU check (8 minutes on one H100/H200): precision, throughput, a live fine-tune
	$(BIN)/python bench/gpu_check.py --out bench/results/gpu-check.json

cli-docs: install      ## regenerate docs/cli.md from the CLI's own help (a test checks it is current)
	$(BIN)/python -m cli.docgen > docs/cli.md

docs: install          ## build the documentation site into site/ (warnings are errors)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) robustify-data .pytest_cache site
