# Every target works on a fresh machine: it creates .venv and installs the pinned dependencies first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cepdiff-installed
OUT ?= results

.PHONY: install demo test bench cuda-check clean

install: $(STAMP)

# Re-installs (and so re-compiles csrc/) whenever packaging or the C++/CUDA sources change.
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 setuptools wheel ninja
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation -e ".[test]"
	touch $@

demo: install
	$(BIN)/python -m gmm_theory.verify --out $(OUT)/theory

# One OpenMP thread per xdist worker: two workers on two cores (oversubscribed threads made the suite ~8x slower).
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile --durations=15 tests

bench: install
	for f in benchmarks/bench_*.py; do $(BIN)/python -m benchmarks.$$(basename $$f .py) || exit 1; done

cuda-check:
	bash csrc/cuda_check.sh

clean:
	rm -rf build *.egg-info models/_C*.so
