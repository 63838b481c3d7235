# Two commands for a newcomer:  make demo  (run the service and show it working)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install test-data demo serve test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch and torchvision first: the exact CUDA build that the dependency pins name
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

# Fashion-MNIST, the test suite's second real data set, from Debian's dataset-fashion-mnist package.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(FASHION_MNIST)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

test-data: $(FASHION_MNIST)/train-images-idx3-ubyte.gz

demo: install          ## start the embedded service, fine-tune on digits over HTTP, show the result
	$(BIN)/robustify demo

serve: install         ## run the API and one worker on the embedded default (SQLite, no broker server)
	$(BIN)/robustify serve

test: install test-data  ## the whole suite (unit, integration against PostgreSQL/Redis, end to end)
	$(BIN)/python -m pytest -q

bench: install         ## engine throughput against a plain baseline (GPU when present, else a tiny CPU run)
	$(BIN)/python bench/bench_engine.py

clean:
	rm -rf $(VENV) robustify-data .pytest_cache
