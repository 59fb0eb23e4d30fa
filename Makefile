# The README's two commands (`make bench`, `make test`) and their helpers.
# Each target creates or refreshes the virtual environment first, so a fresh clone just works.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/default.yaml
BASE    := $(VENV)/.stamp-base
DEV     := $(VENV)/.stamp-dev

.PHONY: bench test test-slow test-metal-safe lint install install-dev clean

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

# The code path a Mac runs (profile metal-safe: no donation, no scan, int8 quant fields), on the
# CPU, under the JAX jax-metal needs: its own venv with jax/jaxlib 0.4.38 and the newest equinox
# supporting it (the [metal] extra's pins), the package installed without its dependencies.
METAL_VENV ?= .venv-metal
METAL_BIN  := $(METAL_VENV)/bin
METAL      := $(METAL_VENV)/.stamp-metal
METAL_DEPS := jax==0.4.38 jaxlib==0.4.38 equinox==0.13.8 numpy gguf pyyaml safetensors \
              pytest pytest-timeout hypothesis
# the core files minus the 0.1b sanity run (90 s; tiny runs the same code), two checks of
# the default profile's storage and donation, which metal-safe changes on purpose, and the CUDA
# lowering of the default profile's dense decode matmul (metal-safe keeps the dot)
METAL_TESTS := tests/test_backends.py tests/test_model.py tests/test_prefill.py tests/test_quant.py \
               tests/test_load.py
METAL_SKIP  := not numerically_sane and not donates_state and not dense_decode_matmul_on_cuda

$(METAL): pyproject.toml
	test -x $(METAL_BIN)/python || $(PY) -m venv $(METAL_VENV)
	$(METAL_BIN)/python -m pip install -q --upgrade pip
	$(METAL_BIN)/python -m pip install -q $(METAL_DEPS)
	$(METAL_BIN)/python -m pip install -q --no-deps -e .
	touch $@

test-metal-safe: $(METAL)
	RWKV_JAX_PROFILE=metal-safe JAX_PLATFORMS=cpu $(METAL_BIN)/python -m pytest $(METAL_TESTS) \
		-m "not slow and not oracle" -k "$(METAL_SKIP)" -q

lint: $(DEV)
	$(BIN)/ruff check rwkv_jax tests experiments
	$(BIN)/ruff format --check rwkv_jax tests experiments

clean:
	rm -rf $(VENV) $(METAL_VENV) build *.egg-info .pytest_cache
