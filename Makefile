# Two commands do all the set-up on a fresh machine:
#   make train   # creates .venv on first use, then trains the default model (4 gloo ranks, CPU)
#   make test    # creates .venv on first use, then runs the test suite
# Anything else: see README.md.

PYTHON ?= python3
VENV ?= .venv
NPROC ?= 4
CONFIG ?= configs/cpu_tiny.yaml
ARGS ?=
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so the
# project's own range requirement (torch>=2.6) is already met and pulls no CUDA build.
# TORCH_PIP_ARGS can point pip elsewhere, e.g. --index-url https://download.pytorch.org/whl/cpu
TORCH_CPU ?= torch==2.13.0
TORCH_PIP_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

NODES ?= 2
PER_NODE ?= 2

.PHONY: install megablocks-reference train simulate sweep bench bench-smoke test test-unit test-distributed test-gpu tensorboard clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# MegaBlocks' Python on reference CPU kernels, for tests/distributed/test_megablocks_reference.py
# (see tests/megablocks_reference): its sdists verified and unpacked by the install script (no
# build), and Triton for its interpreter, kept out of the venv. Needs PyPI the first time; it is
# built beside the old one and swapped in, so a failed rebuild (offline) keeps what was there.
# make test goes on without it (those tests then skip, saying why; under CI=true they fail).
MB_REF := .cache/megablocks-reference
MB_REF_TRITON ?= triton==3.9.0
megablocks-reference: $(MB_REF)/.ready

$(MB_REF)/.ready: scripts/install_megablocks.sh Makefile | $(STAMP)
	rm -rf $(MB_REF).new
	BUILD_DIR=$(MB_REF).new PYTHON=$(BIN)/python scripts/install_megablocks.sh --prepare-only
	$(BIN)/python -m pip install --quiet --no-deps --target $(MB_REF).new/site "$(MB_REF_TRITON)"
	echo "$(MB_REF_TRITON)" > $(MB_REF).new/.ready
	rm -rf $(MB_REF) && mv $(MB_REF).new $(MB_REF)

# launcher.agent is torchrun returning the job's exit code (launcher/exit_codes.py).
train: $(STAMP)
	$(BIN)/python -m launcher.agent --standalone --nproc_per_node=$(NPROC) -m launcher.train --config $(CONFIG) $(ARGS)

# NODES simulated nodes x PER_NODE processes on this machine: one torchrun agent per node.
simulate: $(STAMP)
	$(BIN)/python -m launcher.simulate --nodes $(NODES) --nproc-per-node $(PER_NODE) -- --config $(CONFIG) --logging.run_dir=runs/simulate $(ARGS)

# Strong and weak scaling over SWEEP_NODES simulated nodes x SWEEP_PER_NODE processes:
# runs/sweep/scaling.csv and scaling_{strong,weak}.png. LAUNCHER=slurm submits to Slurm instead.
SWEEP_NODES ?= 1 2
SWEEP_PER_NODE ?= 2
LAUNCHER ?= local
SWEEP_ARGS ?= --train.steps=40 --train.eval_interval=0
sweep: $(STAMP)
	$(BIN)/python -m launcher.sweep --nodes $(SWEEP_NODES) --per-node $(SWEEP_PER_NODE) --launcher $(LAUNCHER) -- --config $(CONFIG) $(SWEEP_ARGS) $(ARGS)

# The README's Performance benchmarks in one command (CUDA): one MoE layer per backend against
# a dense reference, then training per backend on configs/gpu_moe_1b.yaml. Both print their
# tables and write JSON under runs/bench; the second runs even if the first reports a failed
# row. BENCH_ARGS go to e2e.py, e.g. BENCH_ARGS="--steps 100 --variant eager --variant
# compile=--train.compile=true". bench-smoke runs both harnesses at tiny sizes on CPU.
BENCH_ARGS ?=
bench: $(STAMP)
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make bench needs CUDA (make bench-smoke runs the harnesses on CPU)')"
	status=0; $(BIN)/python benchmarks/moe_layer.py --profile native || status=$$?; \
	$(BIN)/python benchmarks/e2e.py $(BENCH_ARGS) || status=$$?; exit $$status

bench-smoke: $(STAMP)
	$(BIN)/python benchmarks/moe_layer.py --smoke --out runs/bench/moe_layer_smoke.json
	$(BIN)/python benchmarks/e2e.py --smoke --backend native --out runs/bench/smoke

MB_REF_SOFT = test -f $(MB_REF)/.ready || echo "make: preparing the MegaBlocks reference kernels in $(MB_REF) (downloads MegaBlocks' sources and Triton from PyPI, once)"; \
	$(MAKE) --no-print-directory megablocks-reference >/dev/null 2>&1 || echo "make: preparing $(MB_REF) failed (offline?): the megablocks reference tests use the one already there, or skip saying why"

# Progress per test file (pytest's default output), the reasons for skips (-ra), the slowest.
test: $(STAMP)
	@$(MB_REF_SOFT)
	$(BIN)/python -m pytest -ra --durations=15 $(ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -ra tests/unit $(ARGS)

test-distributed: $(STAMP)
	@$(MB_REF_SOFT)
	$(BIN)/python -m pytest -ra tests/distributed $(ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -ra -m gpu tests $(ARGS)

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf $(VENV) runs .pytest_cache .cache
