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

# The main job on embedded data (sklearn digits): the theory report, then paper 1's comparison in miniature -- a clean
# DiT-tiny, one trained on 5% flipped labels and one with CEP-U (gamma 1) -- sampled, scored and reported.
# Re-running resumes every step (training and sampling skip what is done). 51.2k images (800 steps, EMA 0.995) per run
# keeps the demo near 15 min on 2 cores; it is far too short to reproduce the paper's FID gaps.
DEMO_RUNS := clean eta0.05 cep-u
DEMO_SAMPLES ?= 500
DEMO_TRAIN := --preset dit-tiny-digits --no-progress --total-images 51200 --ema-decay 0.995
TORCHRUN := OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=2
demo: install
	$(BIN)/python -m gmm_theory.verify --out $(OUT)/theory --no-progress
	$(TORCHRUN) -m training.train $(DEMO_TRAIN) --run-dir $(OUT)/demo/clean
	$(TORCHRUN) -m training.train $(DEMO_TRAIN) --corruption-ratio 0.05 \
		--run-dir $(OUT)/demo/eta0.05
	$(TORCHRUN) -m training.train $(DEMO_TRAIN) --cep uniform --cep-gamma 1.0 \
		--run-dir $(OUT)/demo/cep-u
	for run in $(DEMO_RUNS); do $(BIN)/python -m evaluation.evaluate --run-dir $(OUT)/demo/$$run \
		--num-samples $(DEMO_SAMPLES) --guidance 1.0 2.0 --cache-dir $(OUT)/demo/cache --no-progress || exit 1; done
	$(BIN)/python -m evaluation.report --runs $(addprefix $(OUT)/demo/,$(DEMO_RUNS)) --out $(OUT)/demo/report

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
