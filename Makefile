# pfa_jax: two commands matter, `make demo` and `make test`. Both build .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TFDS_DATA_DIR ?= $(HOME)/tensorflow_datasets
SHARED ?= ../shared
DEMO_DIR ?= workdirs/demo

.PHONY: install demo test test-all lint format data bench bench-deps gpu-prepare figures clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	# The statistics' SSYRK FFI kernel (g++ + jaxlib headers); without a
	# compiler the library falls back to a host callback.
	$(BIN)/python -m pfa_jax.native || echo "native kernel not built: using the fallback"
	$(BIN)/python -m pfa_jax.native onednn || echo "oneDNN conv kernel not built: conv_impl='onednn' uses pfa_jax.conv"
	touch $(STAMP)

install: $(STAMP)

# Builds the offline CIFAR TFDS data_dir from ../shared/datasets (once per machine).
data: $(STAMP)
	@if [ -d "$(TFDS_DATA_DIR)/cifar10/3.0.2" ]; then echo "CIFAR-10 already in $(TFDS_DATA_DIR)"; \
	else $(BIN)/python $(SHARED)/datasets/make_tfds_data_dir.py \
	  --input $(SHARED)/datasets/cifar10_jpeg.npz --data-dir $(TFDS_DATA_DIR); fi

demo: $(STAMP) data
	TFDS_DATA_DIR=$(TFDS_DATA_DIR) $(BIN)/python -m experiments.demo --workdir $(DEMO_DIR) $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

lint: $(STAMP)
	$(BIN)/ruff check pfa_jax tests configs experiments benchmarks
	$(BIN)/ruff format --check pfa_jax tests configs experiments benchmarks

format: $(STAMP)
	$(BIN)/ruff format pfa_jax tests configs experiments benchmarks

# Benchmark-only dependency; never in requirements.txt (an unpinned torch pulls CUDA).
# Wheels and data for the GPU device run (benchmarks/gpu/run.sh).
gpu-prepare:
	bash benchmarks/gpu/prepare.sh $(SHARED)

bench-deps: $(STAMP)
	$(BIN)/pip install -q torch==2.13.0

bench: $(STAMP)
	$(BIN)/python -m benchmarks.pfa_core
	$(BIN)/python -m benchmarks.slicing

figures: $(STAMP)
	$(BIN)/python -m experiments.figures.demo_plots --workdir $(DEMO_DIR)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
