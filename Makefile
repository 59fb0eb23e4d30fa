# The README's two commands (`make bench`, `make test`) and their helpers.
# Each target creates or refreshes the virtual environment first, so a fresh clone just works.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/default.yaml
BASE    := $(VENV)/.stamp-base
DEV     := $(VENV)/.stamp-dev

.PHONY: bench test test-slow lint install install-dev clean

$(BASE): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

# torch is only needed by the oracle tests (BlinkDL's `rwkv` package). Pin the CPU wheel first so
# nothing can pull a CUDA build; the `oracle` extra then brings `rwkv` itself.
$(DEV): $(BASE)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,oracle]'
	touch $@

install: $(BASE)
install-dev: $(DEV)

bench: $(BASE)
	$(BIN)/python -m experiments.bench $(CONFIG)

test: $(DEV)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(DEV)
	$(BIN)/python -m pytest -m slow -q

lint: $(DEV)
	$(BIN)/ruff check rwkv_jax tests experiments
	$(BIN)/ruff format --check rwkv_jax tests experiments

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
