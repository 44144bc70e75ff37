# The two commands a new clone needs: `make install`, then `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install test test-gpu bench bench-gpu demo

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'

test:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

# The `gpu` tests, then shortened `make bench-gpu` figures, inside ~6 min on one H100/H200: bench/out/gpu/ gets
# test-gpu.log and summary.json (bench/gpu_check.py --help). From a fresh checkout on a lent device: .ci/device-check.
test-gpu:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

bench:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/run_all.py

bench-gpu:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/run_all.py --gpu

demo:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/progan demo --folder ../shared/data/celeba-aligned-2k
