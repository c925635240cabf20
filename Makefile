# Every target works on a fresh machine: it creates .venv and installs the pinned dependencies first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cepdiff-installed
OUT ?= results

.PHONY: install demo test bench cuda-build-check clean

install: $(STAMP)

# Re-installs (and so re-compiles csrc/) whenever packaging or the C++/CUDA sources change.
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 setuptools wheel ninja
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation -e ".[test]"
	touch $@

# The main job on embedded data (sklearn digits), every step resumable (re-running skips what is done): the theory
# report, a one-minute version of the theory-to-network bridge (configs/studies/gmm-quick.json), then paper 1's
# comparison in miniature (configs/studies/demo-digits.json: a clean DiT-tiny, one on 5% flipped labels, one with
# CEP-U gamma 1, trained until the clean one has learned its condition, sampled, scored and reported).
# Outputs: $(OUT)/theory/report.md, $(OUT)/demo/gmm-quick/report.md, $(OUT)/demo/demo-digits/report.md.
demo: install
	$(BIN)/python -m gmm_theory.verify --out $(OUT)/theory --no-progress
	$(BIN)/python -m evaluation.study configs/studies/gmm-quick.json --out $(OUT)/demo --no-progress
	$(BIN)/python -m evaluation.study configs/studies/demo-digits.json --out $(OUT)/demo --runs-root $(OUT)/demo/runs \
		--no-progress

# One OpenMP thread per xdist worker: two workers on two cores (oversubscribed threads made the suite ~8x slower).
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile --durations=15 tests

bench: install
	for f in benchmarks/bench_*.py; do OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m benchmarks.$$(basename $$f .py) || exit 1; done

# The GPU user's install (README) against a CUDA torch in a cached venv outside the clone, then what a GPU-less machine
# can verify: linked, every op's CUDA kernel registered, fake kernels, SASS per arch (csrc/cuda_build_check.sh).
cuda-build-check:
	bash csrc/cuda_build_check.sh

clean:
	rm -rf build *.egg-info models/_C*.so
