# Two commands for a newcomer:  make demo  (run the service and show it working)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install browser test-data demo serve test test-browser test-fast bench gpu-check docs cli-docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch and torchvision first: the exact CUDA build that the dependency pins name
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test,docs]"
	touch $@

install: $(BIN)/.installed

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

test: install browser test-data  ## the whole suite (unit, integration against PostgreSQL/Redis, end to end, browser)
	$(BIN)/python -m pytest -q

test-browser: install browser  ## only the dashboard's tests in a real browser
	$(BIN)/python -m pytest -q tests/e2e/test_dashboard.py tests/service/test_dashboard_static.py

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
